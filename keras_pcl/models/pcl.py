"""PCL: MoCo plus prototypes found by k-means, trained with ProtoNCE."""

import keras
import tensorflow as tf

from keras_pcl import losses
from keras_pcl.distributed import gather_across_replicas, scatter_once
from keras_pcl.errors import InvalidInputError
from keras_pcl.models.base import PrototypeSpace, register_method
from keras_pcl.models.moco import MoCo


@register_method("pcl")
@keras.saving.register_keras_serializable(package="keras_pcl")
class PCL(MoCo):
    """Prototypical Contrastive Learning, an EM loop around MoCo.

    E-step (the `keras_pcl.callbacks.PrototypeUpdate` callback, at the start
    of every epoch from `warmup_epochs` on): cluster the momentum-encoder
    embeddings of all N training images into `num_clusters[m]` prototypes for
    each granularity m, with a concentration phi per prototype.
    M-step (this model's `train_step`): minimise
    `InfoNCE + w (1/M) sum_m ProtoNCE_m` (w = `prototype_weight`, 1 in the
    reference), where ProtoNCE_m is a softmax of
    `q . c_j / phi_j` whose target is the sample's own prototype (with
    `symmetric=True` both views' queries, averaged, as InfoNCE's). Until the
    first E-step the model trains as MoCo (the warm-up).

    State, all non-trainable weights saved with the model: `prototypes_{m}`
    `[K_m, d]`, `concentration_{m}` `[K_m]`, `assignments` `[M, N]` int,
    `prototypes_ready` (0 until the first E-step) and, with
    `use_feature_bank`, `feature_bank` `[N, d]`.

    Args:
        backbone, head: as in `MoCo`.
        num_samples: N, the number of training images (indices are `[0, N)`).
        num_clusters: K per granularity, e.g. `(250, 500, 1000)`; each <= N.
        warmup_epochs: epochs of pure InfoNCE before the first E-step.
        num_negative_prototypes: None for the exact softmax over all K
            prototypes; an int r to sample r negatives per step on device from
            the prototypes that are positive for no sample of the batch.
        use_feature_bank: keep each sample's latest training key (the momentum
            encoder's embedding of its second view, written every step) in a
            `[N, d]` bank. The E-step then clusters the bank instead of
            re-embedding the dataset -- after the first E-step, which embeds
            and fills it -- so it costs k-means only. The bank's keys come from
            augmented views and from the encoder as it was when each sample was
            last seen (up to an epoch old), not from the reference's fresh
            unaugmented pass. `N x d` floats per replica.
        prototype_temperature: the mean of phi, which sets how sharp ProtoNCE's
            softmax is. None (the reference) uses the InfoNCE `temperature`;
            a float > 0 decouples the two, so the prototype term can be made
            sharper or softer without changing the instance term.
        prototype_weight: weight of the ProtoNCE term against InfoNCE (the
            reference: 1). Logged `proto_nce` stays the unweighted mean over
            granularities; `loss` is the weighted total that is minimised.
        **kwargs: `MoCo` arguments (queue_size, momentum, temperature, ...).

    Example:
    >>> from keras_pcl import backbones
    >>> model = PCL(backbones.small_cnn((8, 8, 1)), backbones.mlp_head(32, 64),
    ...             num_samples=1024, num_clusters=(10, 20), queue_size=256)
    >>> model.compile(optimizer=keras.optimizers.SGD(0.03, momentum=0.9))

    Reference: Li, Zhou, Xiong, Hoi, "Prototypical Contrastive Learning of
    Unsupervised Representations", ICLR 2021.
    """

    loss_names = ("info_nce", "proto_nce")
    metric_names = ("instance_acc", "proto_acc")
    uses_index = True

    def __init__(self, backbone, head, num_samples, num_clusters=(250, 500, 1000), warmup_epochs=10,
                 num_negative_prototypes=None, use_feature_bank=False, prototype_temperature=None,
                 prototype_weight=1.0, **kwargs):
        super().__init__(backbone, head, **kwargs)
        num_clusters = tuple(int(k) for k in (
            num_clusters if isinstance(num_clusters, (list, tuple)) else [num_clusters]))
        if not num_clusters:
            raise InvalidInputError("num_clusters needs at least one granularity.")
        if num_samples is None or int(num_samples) < 1:
            raise InvalidInputError(f"num_samples must be a positive integer, got {num_samples}.")
        for k in num_clusters:
            if not 2 <= k <= num_samples:
                raise InvalidInputError(
                    f"num_clusters has {k}, but each must be between 2 and the number of "
                    f"samples ({num_samples}); use fewer clusters."
                )
        if warmup_epochs < 0:
            raise InvalidInputError(f"warmup_epochs must be >= 0, got {warmup_epochs}.")
        if num_negative_prototypes is not None and int(num_negative_prototypes) < 1:
            raise InvalidInputError(
                f"num_negative_prototypes must be None (exact) or >= 1, got {num_negative_prototypes}."
            )
        if prototype_temperature is not None and not float(prototype_temperature) > 0:
            raise InvalidInputError(
                f"prototype_temperature must be None (use temperature) or > 0, got {prototype_temperature}."
            )
        if not float(prototype_weight) >= 0:
            raise InvalidInputError(f"prototype_weight must be >= 0 (1 is the reference's), got {prototype_weight}.")
        self.num_samples, self.num_clusters = int(num_samples), num_clusters
        self.prototype_weight = float(prototype_weight)
        self.prototype_temperature = (
            None if prototype_temperature is None else float(prototype_temperature)
        )
        self.warmup_epochs = int(warmup_epochs)
        self.num_negative_prototypes = (
            None if num_negative_prototypes is None else int(num_negative_prototypes)
        )
        self.use_feature_bank = bool(use_feature_bank)
        # One attribute per variable (the lists below are derived): TensorFlow's
        # checkpoints follow attributes, not Python lists, in Keras 3 layers.
        for m, k in enumerate(num_clusters):
            setattr(self, f"prototypes_{m}", self.add_weight(
                shape=(k, self.embedding_dim), name=f"prototypes_{m}", trainable=False, initializer="zeros"))
            setattr(self, f"concentration_{m}", self.add_weight(
                shape=(k,), name=f"concentration_{m}", trainable=False, initializer="ones"))
        self.assignments = self.add_weight(
            shape=(len(num_clusters), self.num_samples), dtype="int32", name="assignments",
            trainable=False, initializer="zeros",
        )
        self.prototypes_ready = self.add_weight(
            shape=(), dtype="int32", name="prototypes_ready", trainable=False, initializer="zeros"
        )
        self.feature_bank = self.add_weight(
            shape=(self.num_samples, self.embedding_dim), dtype="float32", name="feature_bank",
            trainable=False, initializer="zeros") if self.use_feature_bank else None

    @property
    def term_weights(self):
        return {"proto_nce": self.prototype_weight}

    @property
    def prototypes(self):
        """Per granularity, the `[K_m, d]` prototype variable."""
        return [getattr(self, f"prototypes_{m}") for m in range(len(self.num_clusters))]

    @property
    def concentrations(self):
        """Per granularity, the `[K_m]` concentration (phi) variable."""
        return [getattr(self, f"concentration_{m}") for m in range(len(self.num_clusters))]

    @property
    def phi_mean(self):
        """The mean the E-step scales phi to: `prototype_temperature` or `temperature`."""
        return self.temperature if self.prototype_temperature is None else self.prototype_temperature

    def set_prototypes(self, results):
        """Writes the E-step's output into the model (from outside `fit`'s step).

        Args:
            results: per granularity `(prototypes [K_m, d], phi [K_m], assignments [N])`,
                as returned by `keras_pcl.clustering.prototype_estep`.
        """
        if len(results) != len(self.num_clusters):
            raise InvalidInputError(f"expected {len(self.num_clusters)} granularities, got {len(results)}.")
        for variable, phi_variable, (prototypes, phi, _) in zip(
                self.prototypes, self.concentrations, results):
            variable.assign(tf.cast(prototypes, variable.dtype))
            phi_variable.assign(tf.cast(phi, phi_variable.dtype))
        self.assignments.assign(tf.stack([tf.cast(a, tf.int32) for _, _, a in results]))
        self.prototypes_ready.assign(1)

    def prototype_space(self):
        # The momentum encoder's embeddings: the space the E-step clustered.
        return PrototypeSpace(self.embed_keys, lambda: [tf.convert_to_tensor(p) for p in self.prototypes],
                              lambda: bool(int(self.prototypes_ready.numpy())))

    def forward(self, batch, training):
        loss_terms, outputs = super().forward(batch, training)
        index = tf.cast(batch.index, tf.int32)

        def prototype_terms():
            # Each query (both views' with `symmetric`) against its image's prototype.
            per_sample, correct = [], []
            for m, (prototypes, phi) in enumerate(zip(self.prototypes, self.concentrations)):
                target = tf.gather(self.assignments[m], index)
                for q, query in enumerate(outputs["queries"]):
                    logits = losses.proto_nce_logits(query, prototypes, phi)
                    if self.num_negative_prototypes is None:
                        per_sample.append(tf.nn.sparse_softmax_cross_entropy_with_logits(
                            labels=target, logits=logits))  # == losses.proto_nce
                    else:
                        seed = tf.stack([tf.cast(self.optimizer.iterations, tf.int32), m + q * len(self.num_clusters)])
                        per_sample.append(losses.sampled_proto_nce(
                            query, prototypes, phi, target, self.num_negative_prototypes, seed))
                    # Accuracy over all K prototypes, comparable with and without sampling.
                    correct.append(tf.argmax(logits, axis=1, output_type=tf.int32) == target)
            loss = tf.add_n(per_sample) / len(per_sample)
            accuracy = tf.reduce_mean(tf.cast(tf.stack(correct), tf.float32))
            return loss, accuracy

        def warmup_terms():
            return tf.zeros_like(loss_terms["info_nce"]), tf.constant(0.0)

        proto_loss, proto_acc = tf.cond(self.prototypes_ready > 0, prototype_terms, warmup_terms)
        loss_terms["proto_nce"] = proto_loss
        outputs["proto_acc"] = proto_acc
        outputs["index"] = index
        return loss_terms, outputs

    def after_step(self, outputs):
        super().after_step(outputs)
        if self.use_feature_bank:
            scatter_once(self.feature_bank, gather_across_replicas(outputs["index"]),
                         tf.cast(gather_across_replicas(outputs["keys"]), tf.float32))

    def fit(self, *args, **kwargs):
        from keras_pcl.callbacks import PrototypeUpdate

        callbacks = kwargs.get("callbacks") or []
        epochs = kwargs.get("epochs", 1)
        if epochs > self.warmup_epochs and not any(isinstance(c, PrototypeUpdate) for c in callbacks):
            raise InvalidInputError(
                "PCL.fit needs a keras_pcl.callbacks.PrototypeUpdate callback to run the "
                "E-step after the warm-up; without it training is plain MoCo. Pass "
                "callbacks=[PrototypeUpdate(eval_dataset)], or use keras_pcl.MoCo."
            )
        return super().fit(*args, **kwargs)

    def get_config(self):
        config = super().get_config()
        config.update(num_samples=self.num_samples, num_clusters=list(self.num_clusters),
                      warmup_epochs=self.warmup_epochs,
                      num_negative_prototypes=self.num_negative_prototypes,
                      use_feature_bank=self.use_feature_bank,
                      prototype_temperature=self.prototype_temperature,
                      prototype_weight=self.prototype_weight)
        return config
