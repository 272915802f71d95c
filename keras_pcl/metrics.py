"""Epoch-level monitors a method reports beside its loss (Keras resets them each epoch)."""

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="keras_pcl")
class PrototypeUsage(keras.metrics.Metric):
    """How many of `num_prototypes` prototypes were the assignment of at least one sample.

    Fed each step's `[B]` int assignments (argmax of the codes); the count covers
    every step since the last reset (an epoch in `fit`) and every replica. A
    collapsed SwAV puts every sample on a few prototypes.
    """

    def __init__(self, num_prototypes, name="prototypes_used", **kwargs):
        super().__init__(name=name, **kwargs)
        self.num_prototypes = int(num_prototypes)
        self.counts = self.add_variable(shape=(self.num_prototypes,), initializer="zeros", name="counts",
                                        aggregation="sum")

    def update_state(self, assignments, sample_weight=None):
        ids = tf.cast(tf.reshape(assignments, [-1]), tf.int32)
        # A segment sum, not bincount: XLA compiles it (bincount needs a constant size input).
        counts = tf.math.unsorted_segment_sum(tf.ones_like(ids, tf.float32), ids, self.num_prototypes)
        self.counts.assign_add(counts)

    def result(self):
        return tf.reduce_sum(tf.cast(tf.convert_to_tensor(self.counts) > 0, tf.float32))

    def get_config(self):
        return {**super().get_config(), "num_prototypes": self.num_prototypes}


@keras.saving.register_keras_serializable(package="keras_pcl")
class MeanCodeEntropy(keras.metrics.Metric):
    """Entropy (nats) of the mean of the `[B, K]` codes fed since the last reset.

    `ln K` when the prototypes share the samples equally (what Sinkhorn's
    equal-partition constraint aims at), lower when a few take most of the mass.
    """

    def __init__(self, num_prototypes, name="code_entropy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.num_prototypes = int(num_prototypes)
        self.mass = self.add_variable(shape=(self.num_prototypes,), initializer="zeros", name="mass",
                                      aggregation="sum")

    def update_state(self, codes, sample_weight=None):
        self.mass.assign_add(tf.reduce_sum(tf.cast(codes, tf.float32), axis=0))

    def result(self):
        mass = tf.convert_to_tensor(self.mass)
        p = mass / tf.maximum(tf.reduce_sum(mass), 1e-12)
        return -tf.reduce_sum(tf.where(p > 0, p * tf.math.log(tf.maximum(p, 1e-30)), 0.0))

    def get_config(self):
        return {**super().get_config(), "num_prototypes": self.num_prototypes}
