"""SimSiam: a Siamese encoder whose predictor regresses the other view, with a stop-gradient."""

import keras
import tensorflow as tf

from keras_pcl import losses
from keras_pcl.errors import check_positive
from keras_pcl.models.base import ContrastiveModel, deserialize_sub_model, dimension_std, register_method


@register_method("simsiam")
@keras.saving.register_keras_serializable(package="keras_pcl")
class SimSiam(ContrastiveModel):
    """Exploring Simple Siamese Representation Learning.

    `z = projector(backbone(x))`, `p = predictor(z)`; the loss is
    `D(p_1, sg(z_2)) / 2 + D(p_2, sg(z_1)) / 2` with `D = -cos`
    (`keras_pcl.losses.negative_cosine`): no negatives, no momentum encoder;
    the stop-gradient is what prevents collapse. `output_std` logs the paper's
    collapse monitor, the per-dimension std of the L2-normalised `z` (about
    `1/sqrt(d)` when healthy, 0 when collapsed). SimSiam is known to be brittle
    on small data: watch that number.

    Args:
        backbone: `keras.Model` from images to features `[B, D]`.
        projector: e.g. `keras_pcl.models.heads.mlp(2048, (2048, 2048), batch_norm=True,
            output_norm="batch_no_affine")` (3 layers, BatchNorm on the output).
        predictor: a bottleneck of the projection's width, e.g.
            `keras_pcl.models.heads.mlp(2048, (512,), batch_norm=True)`.
        predictor_learning_rate: None (the predictor follows the optimizer's
            schedule) or a float > 0 at which its rate is held (the paper fixes it
            at the base rate: its finding is that this works better). Done by
            scaling the predictor's gradients by this rate over the current one,
            which is exact for Keras' SGD (its velocity holds `rate * gradient`);
            Keras' decoupled weight decay still follows the schedule.
        **kwargs: passed to `keras.Model`.

    Example:
    >>> from keras_pcl import backbones
    >>> from keras_pcl.models import heads
    >>> model = SimSiam(backbones.small_cnn((8, 8, 1)),
    ...                 heads.mlp(64, (64, 64), batch_norm=True, output_norm="batch_no_affine"),
    ...                 heads.mlp(64, (16,), batch_norm=True), predictor_learning_rate=0.05)
    >>> model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9))

    Reference: Chen, He, "Exploring Simple Siamese Representation Learning", CVPR 2021.
    """

    loss_names = ("negative_cosine",)
    metric_names = ("output_std",)
    collapse_monitors = ("output_std",)

    def __init__(self, backbone, projector, predictor, predictor_learning_rate=None, **kwargs):
        super().__init__(**kwargs)
        self.backbone = deserialize_sub_model(backbone)
        self.projector, self.predictor = deserialize_sub_model(projector), deserialize_sub_model(predictor)
        self.predictor_learning_rate = (None if predictor_learning_rate is None else
                                        check_positive("predictor_learning_rate", predictor_learning_rate))
        if not self.projector.built:
            self.projector.build(self.backbone.output_shape)
        if not self.predictor.built:
            self.predictor.build(self.projector.compute_output_shape(self.backbone.output_shape))
        self.built = True

    def call(self, images, training=False):
        """Projections `z` `[B, d]`."""
        return self.projector(self.backbone(images, training=training), training=training)

    def forward(self, batch, training):
        view1, view2 = batch.views
        z1, z2 = self(view1, training=training), self(view2, training=training)
        p1, p2 = self.predictor(z1, training=training), self.predictor(z2, training=training)
        per_sample = 0.5 * losses.negative_cosine(p1, z2) + 0.5 * losses.negative_cosine(p2, z1)
        return {"negative_cosine": per_sample}, {"output_std": dimension_std(z1)}

    def adjust_gradients(self, gradients, variables):
        if self.predictor_learning_rate is None:
            return gradients
        current = tf.cast(self.optimizer.learning_rate, tf.float32)
        # Guarded: a schedule may reach 0 at its last step.
        scale = self.predictor_learning_rate / tf.maximum(current, 1e-12)
        predictor = {id(v) for v in self.predictor.trainable_variables}
        return [g * tf.cast(scale, g.dtype) if g is not None and id(v) in predictor else g
                for g, v in zip(gradients, variables)]

    def get_config(self):
        config = super().get_config()
        config.update(backbone=keras.saving.serialize_keras_object(self.backbone),
                      projector=keras.saving.serialize_keras_object(self.projector),
                      predictor=keras.saving.serialize_keras_object(self.predictor),
                      predictor_learning_rate=self.predictor_learning_rate)
        return config
