"""SupCon: supervised contrastive learning, every same-label view of the global batch a positive."""

import keras

from keras_pcl import losses
from keras_pcl.distributed import gather_across_replicas, replica_id
from keras_pcl.models.base import register_method
from keras_pcl.models.simclr import SimCLR


@register_method("supcon")
@keras.saving.register_keras_serializable(package="keras_pcl")
class SupCon(SimCLR):
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
    metric_names = ()
    uses_labels = True

    def __init__(self, backbone, projector, temperature=0.1, **kwargs):
        super().__init__(backbone, projector, temperature=temperature, **kwargs)

    def forward(self, batch, training):
        z1, z2, size = self.embed_views(batch, training)
        per_sample = losses.supcon(z1, z2, batch.labels, self.temperature, gather_across_replicas(z1),
                                   gather_across_replicas(z2), gather_across_replicas(batch.labels),
                                   offset=replica_id() * size)  # == losses.supcon on one replica
        return {"supcon": per_sample}, {}
