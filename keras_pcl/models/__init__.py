"""keras_pcl's models: one shared train_step skeleton, one short subclass per method."""

from keras_pcl.models.base import ContrastiveModel, WorkerLostError
from keras_pcl.models.moco import MoCo
from keras_pcl.models.pcl import PCL

__all__ = ["ContrastiveModel", "MoCo", "PCL", "WorkerLostError"]
