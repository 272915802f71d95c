"""The supervised baselines: an encoder and a linear classifier, cross-entropy or balanced softmax."""

import keras
import numpy as np
import tensorflow as tf

from keras_pcl.errors import InvalidInputError, check_count
from keras_pcl.models.base import ContrastiveModel, deserialize_sub_model, register_method
from keras_pcl.models.paco import check_class_counts

LOSSES = ("ce", "balanced_softmax")


@register_method("supervised")
@keras.saving.register_keras_serializable(package="keras_pcl")
class Supervised(ContrastiveModel):
    """A classifier trained on labels: the baseline every long-tailed method is read against.

    One augmented view per image through `backbone` and a linear classifier.
    `classification_loss="ce"` is cross-entropy; `"balanced_softmax"` is cross-entropy on
    `logits + log(prior)` (Ren et al., 2020), prior = `class_counts / sum`,
    which makes the classifier's plain logits (served by `classify`) fit a
    balanced test distribution. Batches need `labels` and one view.

    Args:
        backbone: `keras.Model` from images to features `[B, D]`.
        num_classes: C, >= 2.
        classification_loss: "ce" or "balanced_softmax".
        class_counts: `[C]` training images per class; needed by "balanced_softmax".
        **kwargs: passed to `keras.Model`.

    Example:
    >>> from keras_pcl import backbones
    >>> model = Supervised(backbones.small_cnn((8, 8, 1)), 10, classification_loss="balanced_softmax",
    ...                    class_counts=[100, 60, 36, 22, 13, 8, 5, 3, 2, 1])
    >>> model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9))

    Reference: Ren et al., "Balanced Meta-Softmax for Long-Tailed Visual Recognition", NeurIPS 2020.
    """

    loss_names = ("cross_entropy",)
    metric_names = ("train_top1",)
    min_views, max_views = 1, 1
    uses_labels = True
    has_classifier = True

    def __init__(self, backbone, num_classes, classification_loss="ce", class_counts=None, **kwargs):
        super().__init__(**kwargs)
        self.backbone = deserialize_sub_model(backbone)
        self.num_classes = check_count("num_classes", num_classes, 2)
        if classification_loss not in LOSSES:
            raise InvalidInputError(f"classification_loss must be one of {LOSSES}, got {classification_loss!r}.")
        if classification_loss == "balanced_softmax" and class_counts is None:
            raise InvalidInputError("the balanced softmax needs class_counts (training images per class).")
        # Not `loss`: Keras' compile() sets that attribute.
        self.classification_loss = classification_loss
        self.class_counts = None if class_counts is None else check_class_counts(class_counts, self.num_classes)
        self.classifier = keras.layers.Dense(self.num_classes, dtype="float32", name="classifier")
        self.classifier.build(self.backbone.output_shape)
        self.built = True

    def class_logits(self, images, training=False):
        return self.classifier(self.backbone(images, training=training))

    def call(self, images, training=False):
        return self.class_logits(images, training=training)

    def forward(self, batch, training):
        labels = tf.cast(batch.labels, tf.int32)
        logits = self.class_logits(batch.views[0], training=training)
        trained = logits
        if self.classification_loss == "balanced_softmax":
            prior = np.asarray(self.class_counts, np.float64) / np.sum(self.class_counts)
            trained = logits + tf.constant(np.log(prior + 1e-9), tf.float32)[None, :]
        per_sample = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=trained)
        correct = tf.argmax(logits, axis=1, output_type=tf.int32) == labels
        return {"cross_entropy": per_sample}, {"train_top1": tf.reduce_mean(tf.cast(correct, tf.float32))}

    def get_config(self):
        config = super().get_config()
        config.update(backbone=keras.saving.serialize_keras_object(self.backbone), num_classes=self.num_classes,
                      classification_loss=self.classification_loss, class_counts=self.class_counts)
        return config
