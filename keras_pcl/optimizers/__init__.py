"""Optimizers Keras core lacks: LARS."""

from keras_pcl.optimizers.lars import LARS

__all__ = ["LARS"]
