"""SimCLR: two views through one encoder and projector, NT-Xent over the global batch."""

import keras
import tensorflow as tf

from keras_pcl import losses
from keras_pcl.distributed import gather_across_replicas, replica_id
from keras_pcl.errors import InvalidInputError, check_positive
from keras_pcl.models.base import ContrastiveModel, deserialize_sub_model, l2_normalize, register_method


@register_method("simclr")
@keras.saving.register_keras_serializable(package="keras_pcl")
class SimCLR(ContrastiveModel):
    """A Simple Framework for Contrastive Learning of Visual Representations.

    Both views go through the same encoder (`backbone` then `projector`) in
    one pass over the `2B` images, so BatchNorm sees both views, as in the
    reference. Each of the `2B` embeddings is contrasted with the other
    `2N - 1` of the **global** batch (`N` images over all replicas):
    `keras_pcl.losses.nt_xent`. Under a strategy the embeddings are gathered
    from every replica with gradients flowing back through the gather, so 2
    replicas train exactly as 1 with the same global batch. SimCLR trains with
    LARS (`keras_pcl.optimizers.LARS`), a linear warm-up and cosine decay.

    Args:
        backbone: `keras.Model` from images to features `[B, D]`.
        projector: head from features to embeddings, e.g.
            `keras_pcl.models.heads.mlp(128, (2048,), batch_norm=True,
            output_norm="batch")`: ending in BatchNorm, as lightly's head and
            the paper's code (scale only there), it scored higher on
            Fashion-MNIST than a head ending in a biased Dense.
        temperature: NT-Xent temperature, > 0 (0.5 in lightly, 0.1-0.5 in the paper).
        **kwargs: passed to `keras.Model`.

    Example:
    >>> from keras_pcl import backbones, optimizers
    >>> from keras_pcl.models import heads
    >>> model = SimCLR(backbones.small_cnn((8, 8, 1)),
    ...                heads.mlp(32, (64,), batch_norm=True, output_norm="batch"))
    >>> model.compile(optimizer=optimizers.LARS(0.3))

    Reference: Chen, Kornblith, Norouzi, Hinton, "A Simple Framework for
    Contrastive Learning of Visual Representations", ICML 2020.
    """

    loss_names = ("nt_xent",)
    metric_names = ("instance_acc",)

    def __init__(self, backbone, projector, temperature=0.5, **kwargs):
        super().__init__(**kwargs)
        self.backbone, self.projector = deserialize_sub_model(backbone), deserialize_sub_model(projector)
        self.temperature = check_positive("temperature", temperature)
        if not self.projector.built:
            self.projector.build(self.backbone.output_shape)
        self.built = True

    def embed(self, images, training=False):
        """L2-normalised projections `[B, d]`."""
        return l2_normalize(self.projector(self.backbone(images, training=training), training=training))

    def call(self, images, training=False):
        return self.embed(images, training=training)

    def check_batch_size(self, global_batch):
        if global_batch < 2:
            raise InvalidInputError(f"{type(self).__name__} needs a global batch of at least 2 images (each "
                                    f"image's negatives are the others), got {global_batch}.")

    def embed_views(self, batch, training):
        """Both views' embeddings `(z1, z2)` from one pass over the `2B` images, and `B`."""
        view1, view2 = batch.views
        size = tf.shape(view1)[0]
        z = self.embed(tf.concat([view1, view2], axis=0), training=training)
        return z[:size], z[size:], size

    def forward(self, batch, training):
        z1, z2, size = self.embed_views(batch, training)
        logits, positives = losses.nt_xent_logits(
            z1, z2, self.temperature, gather_across_replicas(z1), gather_across_replicas(z2),
            offset=replica_id() * size)  # == losses.nt_xent on one replica
        per_sample = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=positives, logits=logits)
        correct = tf.argmax(logits, axis=1, output_type=tf.int32) == positives
        return {"nt_xent": per_sample}, {"instance_acc": tf.reduce_mean(tf.cast(correct, tf.float32))}

    def get_config(self):
        config = super().get_config()
        config.update(backbone=keras.saving.serialize_keras_object(self.backbone),
                      projector=keras.saving.serialize_keras_object(self.projector),
                      temperature=self.temperature)
        return config
