"""SupCon: supervised contrastive learning, every same-label view of the global batch a positive."""

import keras
import tensorflow as tf

from keras_pcl import losses
from keras_pcl.distributed import gather_across_replicas, replica_id
from keras_pcl.errors import InvalidInputError, check_positive
from keras_pcl.models.base import ContrastiveModel, deserialize_sub_model, l2_normalize, register_method


@register_method("supcon")
@keras.saving.register_keras_serializable(package="keras_pcl")
class SupCon(ContrastiveModel):
    """Supervised Contrastive Learning.

    SimCLR's model (both views through one encoder and projector in one pass)
    trained with `keras_pcl.losses.supcon`: each of the `2B` embeddings is
    contrasted with the other `2N - 1` of the global batch, every view with its
    label a positive. Under a strategy the embeddings and labels are gathered
    from every replica (gradients flow back through the gather). The method
    is two-stage: pretrain this, then train a classifier on the frozen
    features (`keras_pcl.evaluation.balanced_linear_classifier` for long-tailed
    labels). Batches need `labels`.

    Args:
        backbone: `keras.Model` from images to features `[B, D]`.
        projector: head to the contrast space, e.g.
            `keras_pcl.models.heads.mlp(128, (2048,), batch_norm=True)`.
        temperature: > 0 (0.1 in the paper).
        **kwargs: passed to `keras.Model`.

    Example:
    >>> from keras_pcl import backbones
    >>> from keras_pcl.models import heads
    >>> model = SupCon(backbones.small_cnn((8, 8, 1)), heads.mlp(32, (64,), batch_norm=True))
    >>> model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9))

    Reference: Khosla et al., "Supervised Contrastive Learning", NeurIPS 2020.
    """

    loss_names = ("supcon",)
    uses_labels = True

    def __init__(self, backbone, projector, temperature=0.1, **kwargs):
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
            raise InvalidInputError(f"SupCon needs a global batch of at least 2 images, got {global_batch}.")

    def forward(self, batch, training):
        view1, view2 = batch.views
        size = tf.shape(view1)[0]
        z = self.embed(tf.concat([view1, view2], axis=0), training=training)
        z1, z2 = z[:size], z[size:]
        per_sample = losses.supcon(z1, z2, batch.labels, self.temperature, gather_across_replicas(z1),
                                   gather_across_replicas(z2), gather_across_replicas(batch.labels),
                                   offset=replica_id() * size)  # == losses.supcon on one replica
        return {"supcon": per_sample}, {}

    def get_config(self):
        config = super().get_config()
        config.update(backbone=keras.saving.serialize_keras_object(self.backbone),
                      projector=keras.saving.serialize_keras_object(self.projector),
                      temperature=self.temperature)
        return config
