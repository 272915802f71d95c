"""PaCo: MoCo with a queue of labelled keys and learnable class centres, for long-tailed labels."""

import keras
import numpy as np
import tensorflow as tf

from keras_pcl import losses
from keras_pcl.distributed import gather_across_replicas, replica_id
from keras_pcl.errors import InvalidInputError, check_count, check_non_negative, check_positive
from keras_pcl.models.base import ContrastiveModel, deserialize_sub_model, l2_normalize, register_method
from keras_pcl.models.momentum import check_momentum, key_encoder_call, momentum_copy
from keras_pcl.models.queue import KeyQueue


def check_class_counts(class_counts, num_classes):
    """`class_counts` as a float list of `num_classes` non-negative counts, not all zero (one-line errors)."""
    counts = np.asarray(class_counts, np.float64).reshape(-1)
    if len(counts) != num_classes:
        raise InvalidInputError(f"class_counts has {len(counts)} entries for {num_classes} classes; give one "
                                "count of training images per class.")
    if not np.isfinite(counts).all() or (counts < 0).any() or counts.sum() <= 0:
        raise InvalidInputError("class_counts must be finite, non-negative and not all zero.")
    return [float(c) for c in counts]


@register_method("paco")
@keras.saving.register_keras_serializable(package="keras_pcl")
class PaCo(ContrastiveModel):
    """Parametric Contrastive Learning, for long-tailed labels.

    MoCo's structure with labels: the query encoder (`backbone -> projector`)
    is trained, the key encoder is its EMA, and a queue keeps past keys **with
    their labels**. Learnable class centres are a linear classifier on the
    backbone features. The loss (`keras_pcl.losses.paco`, the
    official `PaCoLoss`) contrasts each query with the class centres (their
    logits plus the log class prior: the balanced-softmax effect) and with
    `[q; k; queue]`, positives weighted `beta` on the query's centre and
    `alpha` on every same-label key, query and queue entry. The prior is used
    in training only: `class_logits` (and the served `classify`) give plain
    logits. Under a strategy the queries, keys and labels of every replica
    join the contrast (the queries with gradients), so 2 replicas train as 1.
    The query view should be augmented more strongly than the key view
    (`keras_pcl.augment.paco_views`). Batches need `labels`.

    Args:
        backbone: `keras.Model` from images to features `[B, D]`.
        projector: head to the contrast space, e.g.
            `keras_pcl.models.heads.mlp(128, (2048,), batch_norm=True)`.
        num_classes: C, >= 2.
        class_counts: `[C]` training images per class (the prior).
        queue_size: labelled keys kept; a multiple of the global batch (8192 ImageNet-LT, 1024 CIFAR).
        momentum: EMA coefficient of the key encoder, in `[0, 1)` (0.999).
        temperature: > 0 (0.2 ImageNet-LT, 0.05 CIFAR-100-LT).
        alpha: weight of the same-label contrast positives, >= 0 (0.05; 0.01 CIFAR).
        beta: weight of the class-centre positive, >= 0 (1).
        gamma: weight of the contrast columns in the normaliser, >= 0 (1).
        shuffle_keys: permute the key batch before the key encoder (shuffle-BN).
        momentum_schedule: "constant" (the reference) or "cosine".
        normalize_features: L2-normalise the backbone features before the class
            centres, as the official ImageNet builder does; its CIFAR script does
            not (the default here): on small data the centres then learn in far
            fewer steps (with normalised features, 40 epochs of digits left the
            classifier at 15 % while kNN on its features reached 95 %).
        **kwargs: passed to `keras.Model`.

    Example:
    >>> from keras_pcl import backbones
    >>> from keras_pcl.models import heads
    >>> model = PaCo(backbones.small_cnn((8, 8, 1)), heads.mlp(32, (64,), batch_norm=True), num_classes=10,
    ...              class_counts=[100, 60, 36, 22, 13, 8, 5, 3, 2, 1], queue_size=256)
    >>> model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9))

    Reference: Cui, Zhong, Liu, Yu, Jia, "Parametric Contrastive Learning", ICCV 2021.
    """

    loss_names = ("paco",)
    metric_names = ("train_top1",)
    uses_labels = True
    has_classifier = True

    def __init__(self, backbone, projector, num_classes, class_counts, queue_size=8192, momentum=0.999,
                 temperature=0.2, alpha=0.05, beta=1.0, gamma=1.0, shuffle_keys=True, momentum_schedule="constant",
                 normalize_features=False, **kwargs):
        super().__init__(**kwargs)
        self.backbone, self.projector = deserialize_sub_model(backbone), deserialize_sub_model(projector)
        self.num_classes = check_count("num_classes", num_classes, 2)
        self.class_counts = check_class_counts(class_counts, self.num_classes)
        self.queue_size = check_count("queue_size", queue_size)
        check_momentum(momentum, momentum_schedule)
        self.momentum, self.momentum_schedule = float(momentum), momentum_schedule
        self.temperature = check_positive("temperature", temperature)
        self.alpha, self.beta = check_non_negative("alpha", alpha), check_non_negative("beta", beta)
        self.gamma = check_non_negative("gamma", gamma)
        if self.alpha == 0 and self.beta == 0:
            raise InvalidInputError("alpha and beta are both 0: the loss would have no positive.")
        self.shuffle_keys, self.normalize_features = bool(shuffle_keys), bool(normalize_features)
        if not self.projector.built:
            self.projector.build(self.backbone.output_shape)
        self.embedding_dim = self.projector.compute_output_shape(self.backbone.output_shape)[-1]
        # The centres: float32, so the logits and the log prior add in full precision.
        self.classifier = keras.layers.Dense(self.num_classes, dtype="float32", name="classifier")
        self.classifier.build(self.backbone.output_shape)
        self.key_backbone, self.key_projector = momentum_copy(self.backbone), momentum_copy(self.projector)
        self.queue = KeyQueue(self.queue_size, self.embedding_dim, with_labels=True, name="queue")
        self.built = True

    def momentum_pairs(self):
        return [(self.backbone, self.key_backbone), (self.projector, self.key_projector)]

    def embed(self, images, training=False):
        """L2-normalised query projections `[B, d]`."""
        return l2_normalize(self.projector(self.backbone(images, training=training), training=training))

    def embed_keys(self, images, training=False):
        """L2-normalised momentum-encoder projections `[B, d]`."""
        return l2_normalize(key_encoder_call(self.key_backbone, self.key_projector, images, training,
                                             self.shuffle_keys, self.optimizer_step()))

    def _centres(self, features):
        return self.classifier(l2_normalize(features) if self.normalize_features else tf.cast(features, tf.float32))

    def class_logits(self, images, training=False):
        return self._centres(self.backbone(images, training=training))

    def call(self, images, training=False):
        return self.class_logits(images, training=training)

    def check_batch_size(self, global_batch):
        self.queue.check_batch_size(global_batch)

    def forward(self, batch, training):
        query_view, key_view = batch.views
        labels = tf.cast(batch.labels, tf.int32)
        features = self.backbone(query_view, training=training)
        q = l2_normalize(self.projector(features, training=training))
        centre_logits = self._centres(features)
        k = tf.stop_gradient(self.embed_keys(key_view, training=training))
        size = tf.shape(q)[0]
        all_labels = gather_across_replicas(labels)
        rows = tf.concat([gather_across_replicas(q), gather_across_replicas(k), self.queue.keys], axis=0)
        row_labels = tf.concat([all_labels, all_labels, self.queue.labels], axis=0)
        per_sample = losses.paco(rows, row_labels, centre_logits, self.class_counts, size, self.alpha, self.beta,
                                 self.gamma, self.temperature, anchor_offset=replica_id() * size)
        correct = tf.argmax(centre_logits, axis=1, output_type=tf.int32) == labels
        return {"paco": per_sample}, {"keys": k, "labels": labels,
                                      "train_top1": tf.reduce_mean(tf.cast(correct, tf.float32))}

    def after_step(self, outputs):
        self.queue.enqueue(outputs["keys"], outputs["labels"])

    def get_config(self):
        config = super().get_config()
        config.update(backbone=keras.saving.serialize_keras_object(self.backbone),
                      projector=keras.saving.serialize_keras_object(self.projector),
                      num_classes=self.num_classes, class_counts=self.class_counts, queue_size=self.queue_size,
                      momentum=self.momentum, temperature=self.temperature, alpha=self.alpha, beta=self.beta,
                      gamma=self.gamma, shuffle_keys=self.shuffle_keys, momentum_schedule=self.momentum_schedule,
                      normalize_features=self.normalize_features)
        return config
