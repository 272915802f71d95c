"""BYOL: an online network predicts a slow-moving target network's projection of the other view."""

import keras
import tensorflow as tf

from keras_pcl import losses
from keras_pcl.models.base import ContrastiveModel, deserialize_sub_model, dimension_std, register_method
from keras_pcl.models.momentum import check_momentum, momentum_copy


@register_method("byol")
@keras.saving.register_keras_serializable(package="keras_pcl")
class BYOL(ContrastiveModel):
    """Bootstrap Your Own Latent.

    Online network: `backbone -> projector -> predictor`. Target network: the
    EMA of `backbone -> projector`, its momentum following BYOL's cosine
    schedule from `momentum` at the first step to 1 at the last step of `fit`
    (`keras_pcl.models.momentum.momentum_at`). Loss, symmetrised over the two
    views as in the paper (their sum):
    `(2 - 2 cos(p_1, sg(z'_2))) + (2 - 2 cos(p_2, sg(z'_1)))`, with `z'` the
    target's projections. No negatives: the predictor and the slow target
    are what keep it from collapsing; `output_std` logs the per-dimension std
    of the L2-normalised online projections (about `1/sqrt(d)` when healthy,
    falling to 0 on collapse) and `target_momentum` the EMA coefficient.

    Args:
        backbone: `keras.Model` from images to features `[B, D]`.
        projector: head from features to projections, e.g.
            `keras_pcl.models.heads.mlp(256, (4096,), batch_norm=True)`.
        predictor: head from projections to predictions of the same width, e.g.
            `keras_pcl.models.heads.mlp(256, (4096,), batch_norm=True)`.
        momentum: base EMA coefficient, in `[0, 1)` (0.99 for CIFAR, 0.996 for ImageNet).
        momentum_schedule: `"cosine"` (the paper's) or `"constant"`.
        **kwargs: passed to `keras.Model`.

    Example:
    >>> from keras_pcl import backbones
    >>> from keras_pcl.models import heads
    >>> model = BYOL(backbones.small_cnn((8, 8, 1)), heads.mlp(32, (64,), batch_norm=True),
    ...              heads.mlp(32, (64,), batch_norm=True))
    >>> model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9))

    Reference: Grill et al., "Bootstrap Your Own Latent: A New Approach to
    Self-Supervised Learning", NeurIPS 2020.
    """

    loss_names = ("normalized_mse",)
    metric_names = ("output_std", "target_momentum")
    collapse_monitors = ("output_std",)

    def __init__(self, backbone, projector, predictor, momentum=0.99, momentum_schedule="cosine", **kwargs):
        super().__init__(**kwargs)
        self.backbone = deserialize_sub_model(backbone)
        self.projector, self.predictor = deserialize_sub_model(projector), deserialize_sub_model(predictor)
        check_momentum(momentum, momentum_schedule)
        self.momentum, self.momentum_schedule = float(momentum), momentum_schedule
        if not self.projector.built:
            self.projector.build(self.backbone.output_shape)
        projection_shape = self.projector.compute_output_shape(self.backbone.output_shape)
        if not self.predictor.built:
            self.predictor.build(projection_shape)
        self.target_backbone, self.target_projector = momentum_copy(self.backbone), momentum_copy(self.projector)
        self.built = True

    def momentum_pairs(self):
        return [(self.backbone, self.target_backbone), (self.projector, self.target_projector)]

    def call(self, images, training=False):
        """Online projections `[B, d]`."""
        return self.projector(self.backbone(images, training=training), training=training)

    def _target(self, images, training):
        return tf.stop_gradient(self.target_projector(self.target_backbone(images, training=training),
                                                      training=training))

    def forward(self, batch, training):
        view1, view2 = batch.views
        z1, z2 = self(view1, training=training), self(view2, training=training)
        p1, p2 = self.predictor(z1, training=training), self.predictor(z2, training=training)
        t1, t2 = self._target(view1, training), self._target(view2, training)
        per_sample = (2.0 + 2.0 * losses.negative_cosine(p1, t2)) + (2.0 + 2.0 * losses.negative_cosine(p2, t1))
        return {"normalized_mse": per_sample}, {"output_std": dimension_std(z1),
                                                "target_momentum": self.current_momentum(self.optimizer_step())}

    def get_config(self):
        config = super().get_config()
        config.update(backbone=keras.saving.serialize_keras_object(self.backbone),
                      projector=keras.saving.serialize_keras_object(self.projector),
                      predictor=keras.saving.serialize_keras_object(self.predictor),
                      momentum=self.momentum, momentum_schedule=self.momentum_schedule)
        return config
