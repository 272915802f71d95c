"""SwAV: online clustering into learnable prototypes, codes by Sinkhorn, swapped prediction over multi-crop."""

import keras
import tensorflow as tf

from keras_pcl import losses
from keras_pcl.distributed import apply_once
from keras_pcl.errors import InvalidInputError, check_count, check_positive
from keras_pcl.metrics import MeanCodeEntropy, PrototypeUsage
from keras_pcl.models.base import (ContrastiveModel, PrototypeSpace, deserialize_sub_model, dimension_std,
                                   l2_normalize, register_method)
from keras_pcl.models.queue import KeyQueue


@register_method("swav")
@keras.saving.register_keras_serializable(package="keras_pcl")
class SwAV(ContrastiveModel):
    """Swapping Assignments between Views.

    Each view is embedded (`backbone -> projector`, L2-normalised) and scored
    against `num_prototypes` learnable prototypes (a bias-free linear layer whose
    columns are re-normalised before every step). The codes of each large crop
    are computed from its detached scores by Sinkhorn-Knopp
    (`keras_pcl.losses.sinkhorn`: equal partition over the global batch,
    all-reduced across replicas); every other crop predicts them with
    `softmax(scores / temperature)` (`keras_pcl.losses.swav`). The prototypes'
    gradients are zeroed for the first `freeze_prototypes_steps` steps.

    Multi-crop: batches hold `num_large_crops` views at the encoder's size, then
    any number of smaller views (`keras_pcl.augment.multi_crop`); views of one
    size go through the encoder together. Small batches give Sinkhorn too few
    samples per prototype: the optional queue keeps each large crop's last
    `queue_size` embeddings, filled from epoch `queue_start_epoch` on and, once
    full, scored with the current prototypes to join the Sinkhorn step only.

    Monitors, per epoch: `prototypes_used` (prototypes nearest to at least one
    large crop's embedding), `code_entropy` (entropy of the mean code; `ln K` is
    an equal share, which Sinkhorn enforces per batch) and `output_std` (the
    per-dimension std of the embeddings, as BYOL's and SimSiam's: about
    `1/sqrt(d)` when spread, 0 when collapsed). SwAV's known failure is a loss
    stuck at `ln K`: the embeddings collapse towards one direction (seen on 8x8
    digits at `epsilon` 0.05, where `output_std` fell while `prototypes_used`
    stayed at K and `code_entropy` at `ln K`: the codes stay spread even then),
    or a few prototypes take every sample (`prototypes_used` falls). The SwAV
    authors' remedies: a lower `epsilon`, a longer freeze, a later or shorter queue.

    Args:
        backbone: `keras.Model` from images to features `[B, D]`; convolutional
            and globally pooled, so it takes small crops too.
        projector: head to the embedding space, e.g.
            `keras_pcl.models.heads.mlp(128, (2048,), batch_norm=True)`.
        num_prototypes: K, >= 2 (3000 for ImageNet-scale data).
        temperature: of the predictions, > 0 (0.1).
        epsilon: Sinkhorn's entropic regularisation, > 0 (0.05).
        sinkhorn_iterations: >= 1 (3).
        num_large_crops: views that get codes, >= 1 (2); the first views of a batch.
        freeze_prototypes_steps: steps at the start with the prototypes frozen;
            None (default) is one epoch's worth of the current `fit`.
        queue_size: embeddings kept per large crop (0: no queue); a multiple of
            the global batch.
        queue_start_epoch: epoch from which the queue is filled (>= 0).
        **kwargs: passed to `keras.Model`.

    Example:
    >>> from keras_pcl import backbones, optimizers
    >>> from keras_pcl.models import heads
    >>> model = SwAV(backbones.small_cnn((8, 8, 1)), heads.mlp(32, (64,), batch_norm=True), num_prototypes=30)
    >>> model.compile(optimizer=optimizers.LARS(0.6, weight_decay=1e-6))

    Reference: Caron, Misra, Mairal, Goyal, Bojanowski, Joulin, "Unsupervised
    Learning of Visual Features by Contrasting Cluster Assignments", NeurIPS 2020.
    """

    loss_names = ("swav",)
    metric_names = ("prototypes_used", "code_entropy", "output_std")
    collapse_monitors = metric_names  # the failure: a few prototypes take every sample
    max_views = None

    def __init__(self, backbone, projector, num_prototypes=3000, temperature=0.1, epsilon=0.05,
                 sinkhorn_iterations=3, num_large_crops=2, freeze_prototypes_steps=None, queue_size=0,
                 queue_start_epoch=15, **kwargs):
        super().__init__(**kwargs)
        self.backbone, self.projector = deserialize_sub_model(backbone), deserialize_sub_model(projector)
        self.num_prototypes = check_count("num_prototypes", num_prototypes, 2)
        self.temperature = check_positive("temperature", temperature)
        self.epsilon = check_positive("epsilon", epsilon)
        self.sinkhorn_iterations = check_count("sinkhorn_iterations", sinkhorn_iterations)
        self.num_large_crops = check_count("num_large_crops", num_large_crops)
        self.min_views = max(2, self.num_large_crops)
        self.freeze_prototypes_steps = (None if freeze_prototypes_steps is None else
                                        check_count("freeze_prototypes_steps", freeze_prototypes_steps, 0))
        self.queue_size = check_count("queue_size", queue_size, 0)
        self.queue_start_epoch = check_count("queue_start_epoch", queue_start_epoch, 0)
        # Small crops pass through the same convolutional encoder: any height and width.
        self.backbone.input_spec = keras.InputSpec(ndim=4, axes={-1: self.backbone.input_shape[-1]})
        if not self.projector.built:
            self.projector.build(self.backbone.output_shape)
        self.embedding_dim = self.projector.compute_output_shape(self.backbone.output_shape)[-1]
        # Float32 whatever the policy: scores / epsilon amplify bfloat16's rounding 20-fold.
        self.prototypes = keras.layers.Dense(self.num_prototypes, use_bias=False, dtype="float32",
                                             name="prototypes")
        self.prototypes.build((None, self.embedding_dim))
        for i in range(self.num_large_crops if self.queue_size else 0):
            # One attribute each: checkpoints follow attributes, not lists.
            setattr(self, f"queue_{i}", KeyQueue(self.queue_size, self.embedding_dim, initializer="zeros",
                                                  name=f"queue_{i}"))
        self.set_metric("prototypes_used", PrototypeUsage(self.num_prototypes))
        self.set_metric("code_entropy", MeanCodeEntropy(self.num_prototypes))
        self.built = True

    @property
    def queues(self):
        return [getattr(self, f"queue_{i}") for i in range(self.num_large_crops if self.queue_size else 0)]

    @property
    def needs_training_length(self):
        return self.freeze_prototypes_steps is None or (bool(self.queue_size) and self.queue_start_epoch > 0)

    def embed(self, images, training=False):
        """L2-normalised embeddings `[B, d]` (the space of the prototypes)."""
        return l2_normalize(self.projector(self.backbone(images, training=training), training=training))

    def call(self, images, training=False):
        return self.embed(images, training=training)

    def prototype_space(self):
        return PrototypeSpace(self.embed, lambda: [l2_normalize(tf.transpose(self.prototypes.kernel))])

    def check_batch_size(self, global_batch):
        for queue in self.queues:
            queue.check_batch_size(global_batch)

    def _epoch(self):
        steps = tf.maximum(self.epoch_steps, 1)
        return tf.where(self.epoch_steps > 0, self.optimizer_step() // steps, tf.zeros_like(steps))

    # One step -----------------------------------------------------------------
    def before_step(self, batch):
        kernel = self.prototypes.kernel  # [d, K]: one prototype per column
        apply_once([(kernel, tf.math.l2_normalize(kernel, axis=0))])

    def forward(self, batch, training):
        embeddings, start = [], 0
        views = batch.views
        while start < len(views):  # consecutive views of one size: one pass through the encoder
            end = start + 1
            while end < len(views) and views[end].shape[1:] == views[start].shape[1:]:
                end += 1
            size = tf.shape(views[start])[0]
            z = self.embed(tf.concat(views[start:end], axis=0), training=training)
            embeddings += [z[i * size:(i + 1) * size] for i in range(end - start)]
            start = end
        scores = [self.prototypes(z) for z in embeddings]
        queue_scores, queue_weight = None, 1.0
        if self.queues:
            queue_scores = [self.prototypes(tf.convert_to_tensor(q.keys)) for q in self.queues]
            full = tf.reduce_all(tf.stack([q.filled >= q.size for q in self.queues]))
            queue_weight = tf.cast(full, tf.float32)
        loss, codes = losses.swav(scores, self.num_large_crops, self.temperature, self.epsilon,
                                  self.sinkhorn_iterations, queue_scores, queue_weight, return_codes=True)
        # Usage counts each embedding's nearest prototype (what `assign` serves): collapsed embeddings
        # share one. The codes cannot show it: Sinkhorn spreads them evenly even then.
        nearest = tf.argmax(tf.concat(scores[:self.num_large_crops], axis=0), axis=1, output_type=tf.int32)
        outputs = {"large_embeddings": embeddings[:self.num_large_crops], "code_entropy": tf.concat(codes, axis=0),
                   "prototypes_used": nearest, "output_std": dimension_std(embeddings[0]),
                   # Read before the update moves the step: this step's epoch decides.
                   "queue_filling": self._epoch() >= self.queue_start_epoch}
        return {"swav": loss}, outputs

    def adjust_gradients(self, gradients, variables):
        freeze = self.epoch_steps if self.freeze_prototypes_steps is None else self.freeze_prototypes_steps
        learning = tf.cast(self.optimizer_step() >= tf.cast(freeze, tf.int64), tf.float32)
        kernel = id(self.prototypes.kernel)
        return [g * tf.cast(learning, g.dtype) if g is not None and id(v) == kernel else g
                for g, v in zip(gradients, variables)]

    def after_step(self, outputs):
        for queue, z in zip(self.queues, outputs["large_embeddings"]):
            queue.enqueue(tf.stop_gradient(z), enabled=outputs["queue_filling"])

    def get_config(self):
        config = super().get_config()
        config.update(backbone=keras.saving.serialize_keras_object(self.backbone),
                      projector=keras.saving.serialize_keras_object(self.projector),
                      num_prototypes=self.num_prototypes, temperature=self.temperature, epsilon=self.epsilon,
                      sinkhorn_iterations=self.sinkhorn_iterations, num_large_crops=self.num_large_crops,
                      freeze_prototypes_steps=self.freeze_prototypes_steps, queue_size=self.queue_size,
                      queue_start_epoch=self.queue_start_epoch)
        return config
