"""MoCo: a momentum (EMA) key encoder, a queue of keys, and InfoNCE."""

import keras
import tensorflow as tf

from keras_pcl import losses
from keras_pcl.errors import InvalidInputError, check_positive
from keras_pcl.models.base import ContrastiveModel, deserialize_sub_model, l2_normalize, register_method
from keras_pcl.models.momentum import check_momentum, key_encoder_call, momentum_copy
from keras_pcl.models.queue import KeyQueue


@register_method("moco")
@keras.saving.register_keras_serializable(package="keras_pcl")
class MoCo(ContrastiveModel):
    """Momentum Contrast (v1 with a linear head, v2 with an MLP head).

    The query encoder (`backbone` then `head`) is trained; the key encoder is
    its exponential moving average. Keys from the second view are the
    positives; a queue of past keys gives `queue_size` negatives. After each
    step the keys of the whole global batch are enqueued, so under a
    distribution strategy the negatives are global and every replica holds
    the same queue.

    Args:
        backbone: `keras.Model` from images to features `[B, D]` (its input
            shape must be known, e.g. from `keras_pcl.backbones`).
        head: projection from features to embeddings `[B, d]`
            (`keras_pcl.models.heads.mlp`).
        queue_size: number of negative keys `r`; a multiple of the global batch.
        momentum: EMA coefficient of the key encoder, in `[0, 1)`.
        temperature: InfoNCE temperature, > 0.
        shuffle_keys: permute the key batch before the key encoder (the
            shuffle-BN replacement; useful with `norm="split"`).
        symmetric: also use view 2 as query against view 1's keys, averaging
            both losses (MoCo v3 / SimCLR style); off in the reference. About
            twice the step's cost. The queue still receives one batch of keys
            (view 2's) per step.
        momentum_schedule: `"constant"` (the reference) or `"cosine"` (BYOL's,
            from `momentum` to 1 over training).
        **kwargs: passed to `keras.Model`.

    Example:
    >>> from keras_pcl import backbones
    >>> model = MoCo(backbones.small_cnn((8, 8, 1)), backbones.mlp_head(32, 64), queue_size=256)
    >>> model.compile(optimizer=keras.optimizers.SGD(0.03, momentum=0.9))

    Reference: He et al., "Momentum Contrast for Unsupervised Visual
    Representation Learning", CVPR 2020; Chen et al., "Improved Baselines with
    Momentum Contrastive Learning" (v2), 2020.
    """

    loss_names = ("info_nce",)
    metric_names = ("instance_acc",)

    def __init__(self, backbone, head, queue_size=65536, momentum=0.999, temperature=0.2,
                 shuffle_keys=True, symmetric=False, momentum_schedule="constant", **kwargs):
        super().__init__(**kwargs)
        backbone, head = deserialize_sub_model(backbone), deserialize_sub_model(head)
        if not queue_size or queue_size < 1:
            raise InvalidInputError(f"queue_size must be a positive integer, got {queue_size}.")
        check_momentum(momentum, momentum_schedule)
        self.backbone, self.head = backbone, head
        self.queue_size, self.momentum = int(queue_size), float(momentum)
        self.temperature = check_positive("temperature", temperature)
        self.shuffle_keys, self.symmetric = bool(shuffle_keys), bool(symmetric)
        self.momentum_schedule = momentum_schedule
        if not head.built:
            head.build(backbone.output_shape)
        self.embedding_dim = head.compute_output_shape(backbone.output_shape)[-1]
        self.key_backbone, self.key_head = momentum_copy(backbone), momentum_copy(head)
        self.queue = KeyQueue(self.queue_size, self.embedding_dim, name="queue")
        self.built = True  # every sublayer and state variable exists now

    # The encoders ---------------------------------------------------------
    def embed(self, images, training=False):
        """L2-normalised query embeddings `[B, d]`."""
        return l2_normalize(self.head(self.backbone(images, training=training), training=training))

    def embed_keys(self, images, training=False):
        """L2-normalised momentum-encoder embeddings `[B, d]` (what PCL clusters)."""
        return l2_normalize(key_encoder_call(self.key_backbone, self.key_head, images, training, self.shuffle_keys,
                                             self.optimizer_step()))

    def call(self, images, training=False):
        """Query embeddings of images, or of each view when given `(view1, view2)`."""
        if isinstance(images, (tuple, list)):
            return tuple(self.embed(view, training=training) for view in images)
        return self.embed(images, training=training)

    def momentum_pairs(self):
        return [(self.backbone, self.key_backbone), (self.head, self.key_head)]

    # One step -------------------------------------------------------------
    def check_batch_size(self, global_batch):
        self.queue.check_batch_size(global_batch)

    def forward(self, batch, training):
        view1, view2 = batch.views
        pairs = [(view1, view2), (view2, view1)] if self.symmetric else [(view1, view2)]
        queries, keys, per_sample, accuracy = [], [], [], []
        for q_view, k_view in pairs:
            q = self.embed(q_view, training=training)
            k = tf.stop_gradient(self.embed_keys(k_view, training=training))
            # The logits serve the loss (== losses.info_nce) and the accuracy: one matmul.
            logits = losses.info_nce_logits(q, k, self.queue.keys, self.temperature)
            per_sample.append(tf.nn.sparse_softmax_cross_entropy_with_logits(
                labels=tf.zeros(tf.shape(logits)[0], tf.int32), logits=logits))
            accuracy.append(tf.reduce_mean(tf.cast(tf.argmax(logits, axis=1) == 0, tf.float32)))
            queries.append(q)
            keys.append(k)
        # Only view 2's keys are enqueued, so the queue advances one batch per step in both modes.
        outputs = {"queries": queries, "keys": keys[0], "instance_acc": tf.add_n(accuracy) / len(accuracy)}
        return {"info_nce": tf.add_n(per_sample) / len(per_sample)}, outputs

    def after_step(self, outputs):
        self.queue.enqueue(outputs["keys"])

    # Saving ---------------------------------------------------------------
    def get_config(self):
        config = super().get_config()
        config.update(
            backbone=keras.saving.serialize_keras_object(self.backbone),
            head=keras.saving.serialize_keras_object(self.head),
            queue_size=self.queue_size, momentum=self.momentum, temperature=self.temperature,
            shuffle_keys=self.shuffle_keys, symmetric=self.symmetric, momentum_schedule=self.momentum_schedule,
        )
        return config
