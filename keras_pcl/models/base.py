"""The train_step skeleton every method shares, and the interface a method declares.

One step: batch -> `before_step` -> `forward` (per-sample losses) -> gradients
-> `adjust_gradients` -> optimizer update -> EMA of the momentum pairs ->
`after_step`. A method subclasses `ContrastiveModel` and declares:

* `loss_names`, `metric_names`: the loss terms `forward` returns (each a
  per-sample `[B]` tensor; the optimised loss is the sum of their batch means,
  weighted by `term_weights`) and the scalar metrics it reports. Callbacks
  (the NaN guard), the runner and the curves read these, never log-name patterns.
* `collapse_monitors`: those of `metric_names` whose fall means the method is
  collapsing (SwAV's prototype use, BYOL's and SimSiam's output spread); the
  runner reports each one's last and lowest epoch in results.json.
* `min_views`, `max_views`, `uses_index`, `uses_labels`: what a batch must hold.
* `forward(batch, training)`: `(losses, outputs)` for a `Batch`.

and, where it needs them:

* `momentum_pairs()` with `momentum` and `momentum_schedule`: `(online,
  target)` sub-models; the base applies the EMA after each step.
* `before_step(batch)`: before the forward pass (SwAV re-normalises its prototypes).
* `adjust_gradients(gradients, variables)`: between the gradients and the
  update (SwAV freezes its prototypes, SimSiam fixes its predictor's rate).
* `after_step(outputs)`: state updates once per global step (queues, banks).
* `prototype_space()`: the prototypes a model has, for the `assign`
  endpoint and the prototype gallery; `serving_endpoints()`: what the
  SavedModel serves (`embed` for every method).

Batches are dicts `{"views": (v_1, ..., v_n), "index": [B] int, "labels": [B]
int}` (index and labels optional; `keras_pcl.data` builds them). The older
`((view1, view2), index)` tuples are accepted too.
"""

import copy
from typing import Callable, NamedTuple, Optional

import keras
import tensorflow as tf

from keras_pcl.distributed import (
    _PEER_ERRORS,
    _multi_worker,
    _worker_lost,
    gather_across_replicas,
    num_replicas,
)
from keras_pcl.errors import InvalidInputError
from keras_pcl.models.momentum import ema_pairs, ema_update, momentum_at

METHODS = {}


def register_method(name):
    """Adds a `ContrastiveModel` subclass to `METHODS` under `name` (the runner's `--method`)."""

    def register(cls):
        cls.method_name = name
        METHODS[name] = cls
        return cls

    return register


class Batch(NamedTuple):
    """One training batch: `views` (a tuple of `[B, H_i, W_i, C]` image tensors), the
    samples' `index` `[B]` in the dataset and their `labels` `[B]` (either may be None)."""

    views: tuple
    index: Optional[tf.Tensor] = None
    labels: Optional[tf.Tensor] = None


class PrototypeSpace(NamedTuple):
    """What a model with prototypes exposes: `embed(images)` -> unit `[B, d]` embeddings
    and `prototypes()` -> a list (one per granularity) of unit `[K_m, d]` prototypes, in
    the same space; `ready()` (eager) is False while the prototypes hold nothing learnt yet
    (PCL before its first E-step). The exporter's `assign` endpoint and the gallery use it."""

    embed: Callable
    prototypes: Callable
    ready: Callable = lambda: True


def l2_normalize(x):
    return tf.math.l2_normalize(tf.cast(x, tf.float32), axis=-1)


def dimension_std(embeddings):
    """Mean over dimensions of the per-dimension std of L2-normalised embeddings over the
    global batch (SimSiam's collapse monitor: about 1/sqrt(d) when healthy, 0 when collapsed)."""
    z = gather_across_replicas(tf.stop_gradient(l2_normalize(embeddings)))
    return tf.reduce_mean(tf.math.reduce_std(z, axis=0))


def deserialize_sub_model(value):
    """A sub-model passed to a constructor, or its serialised dict (from `get_config`)."""
    return keras.saving.deserialize_keras_object(value) if isinstance(value, dict) else value


class _TrainingLength(keras.callbacks.Callback):
    """Tells the model how long this `fit` trains (for schedules that end with training)."""

    def on_train_begin(self, logs=None):
        steps, epochs = self.params.get("steps"), self.params.get("epochs")
        model = self.model
        if not steps and model.needs_training_length:
            raise InvalidInputError(
                f"{type(model).__name__} schedules by the length of training, but this dataset's length is "
                "unknown; pass steps_per_epoch to fit().")
        model.epoch_steps.assign(int(steps or 0))
        model.total_steps.assign(int(steps or 0) * int(epochs or 0))


class ContrastiveModel(keras.Model):
    """Base of keras_pcl's self-supervised and supervised contrastive models (not used directly).

    See the module docstring for what a method declares. State every model
    has: `epoch_steps` and `total_steps` (int64), the steps per epoch and in
    all of the current `fit` (0 outside one), which schedules that end with
    training (BYOL's momentum, SwAV's prototype freeze) read; a resumed `fit`
    sets the same values, so those schedules resume exactly.
    """

    loss_names = ()
    metric_names = ()
    collapse_monitors = ()
    min_views, max_views = 2, 2
    uses_index = False
    uses_labels = False
    momentum = None
    momentum_schedule = "constant"
    method_name = None

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.epoch_steps = self.add_weight(shape=(), dtype="int64", name="epoch_steps", trainable=False,
                                           initializer="zeros")
        self.total_steps = self.add_weight(shape=(), dtype="int64", name="total_steps", trainable=False,
                                           initializer="zeros")
        self._trackers = {name: keras.metrics.Mean(name=name)
                          for name in ("loss",) + tuple(self.loss_names) + tuple(self.metric_names)}

    def set_metric(self, name, metric):
        """Reports the declared metric `name` with `metric` (a `keras.metrics.Metric` fed
        `outputs[name]` each step, e.g. an epoch-level count) instead of a running mean."""
        if name not in self.metric_names:
            raise InvalidInputError(f"{name!r} is not one of {type(self).__name__}'s metric_names {self.metric_names}.")
        self._trackers[name] = metric

    # What a method declares ---------------------------------------------------
    def forward(self, batch, training):
        """`(losses, outputs)`: per-sample `[B]` loss terms named by `loss_names`, and a dict
        holding the `metric_names` scalars plus whatever `after_step` needs."""
        raise NotImplementedError

    @property
    def term_weights(self):
        """Weight of each loss term in the optimised total (absent: 1); terms are logged unweighted."""
        return {}

    def momentum_pairs(self):
        """`(online, target)` sub-models whose target is the EMA of the online one (none here)."""
        return []

    @property
    def needs_training_length(self):
        """True when a schedule needs `total_steps` (a non-constant momentum schedule)."""
        return bool(self.momentum_pairs()) and self.momentum_schedule != "constant"

    def check_batch_size(self, global_batch):
        """Raises `InvalidInputError` if the method cannot train on this global batch size."""

    def before_step(self, batch):
        """State changes before the forward pass of a training step (none here)."""

    def adjust_gradients(self, gradients, variables):
        """Returns the gradients to apply; `gradients[i]` belongs to `variables[i]`."""
        return gradients

    def after_step(self, outputs):
        """State updates after the optimizer step, once per global step (none here)."""

    def prototype_space(self):
        """A `PrototypeSpace` for models with prototypes (PCL, SwAV); None here."""
        return None

    has_classifier = False

    def class_logits(self, images):
        """`[B, C]` class logits as served (no training-time prior), for a model with
        `has_classifier` (PaCo, the supervised baselines)."""
        raise NotImplementedError(f"{type(self).__name__} has no classifier.")

    def serving_endpoints(self):
        """`{name: fn(images) -> {output: tensor}}` for the SavedModel; images are float
        `[B, H, W, C]` in `[0, 1]` at the encoder's input size. `embed` for every method,
        `assign` for a model with a `prototype_space()`, `classify` for one with a classifier."""
        endpoints = {"embed": self._serve_embed}
        if self.prototype_space() is not None:
            endpoints["assign"] = self._serve_assign
        if self.has_classifier:
            endpoints["classify"] = self._serve_classify
        return endpoints

    def _serve_classify(self, images):
        logits = tf.cast(self.class_logits(images), tf.float32)
        return {"probabilities": tf.nn.softmax(logits, axis=1),
                "label": tf.argmax(logits, axis=1, output_type=tf.int32)}

    # Serving --------------------------------------------------------------------
    def _serve_embed(self, images):
        return {"features": l2_normalize(self.backbone(images, training=False))}

    def _serve_assign(self, images):
        space = self.prototype_space()
        embeddings = space.embed(images)
        ids, similarities = [], []
        for prototypes in space.prototypes():
            scores = tf.matmul(embeddings, tf.cast(prototypes, embeddings.dtype), transpose_b=True)
            ids.append(tf.argmax(scores, axis=1, output_type=tf.int32))
            similarities.append(tf.reduce_max(scores, axis=1))
        return {"prototype": tf.stack(ids, axis=1), "similarity": tf.stack(similarities, axis=1)}

    # The step ------------------------------------------------------------------
    def optimizer_step(self):
        """The optimizer's step counter (0 before `compile`), what step-keyed schedules read."""
        optimizer = getattr(self, "optimizer", None)  # Keras sets it in compile()
        return optimizer.iterations if optimizer is not None else tf.constant(0, tf.int64)

    def current_momentum(self, step):
        """The EMA coefficient at optimizer step `step` (see `keras_pcl.models.momentum.momentum_at`)."""
        return momentum_at(self.momentum, self.momentum_schedule, step, self.total_steps)

    def unpack_batch(self, data):
        """A `Batch` from what the dataset yields, checked against what the method declares."""
        name = type(self).__name__
        if isinstance(data, dict):
            unknown = sorted(set(data) - {"views", "index", "labels"})
            if unknown or "views" not in data:
                raise InvalidInputError(
                    f"{name} batches are dicts with 'views' and optionally 'index' and 'labels', got keys "
                    f"{sorted(data)}; build them with keras_pcl.data.multiview_dataset().")
            views = data["views"]
            batch = Batch(tuple(views) if isinstance(views, (tuple, list)) else (views,),
                          data.get("index"), data.get("labels"))
        elif isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], (tuple, list)):
            batch = Batch(tuple(data[0]), data[1])
        else:
            raise InvalidInputError(
                f"{name} trains on batches {{'views': (...), 'index': ..., 'labels': ...}}; build the dataset "
                "with keras_pcl.data.multiview_dataset() or contrastive_dataset().")
        count = len(batch.views)
        if count < self.min_views or (self.max_views is not None and count > self.max_views):
            wanted = (f"{self.min_views}" if self.min_views == self.max_views else
                      f"at least {self.min_views}" if self.max_views is None else
                      f"{self.min_views} to {self.max_views}")
            raise InvalidInputError(f"{name} trains on {wanted} views per image, the batch has {count}.")
        if self.uses_index and batch.index is None:
            raise InvalidInputError(f"{name} needs each sample's dataset index in the batch ('index').")
        if self.uses_labels and batch.labels is None:
            raise InvalidInputError(f"{name} is supervised: the batch needs 'labels' (pass labels= to the "
                                    "dataset helper).")
        local_batch = batch.views[0].shape[0]
        if local_batch is not None:  # static when batches drop their remainder
            self.check_batch_size(local_batch * num_replicas())
        return batch

    def train_step(self, data):
        batch = self.unpack_batch(data)
        self.before_step(batch)
        step = tf.identity(self.optimizer.iterations)
        with tf.GradientTape() as tape:
            losses, outputs = self.forward(batch, training=True)
            terms = {name: tf.reduce_mean(losses[name]) for name in self.loss_names}
            loss = self._total(terms)
            # Keras sums gradients over replicas; the step should average them.
            scaled = loss / num_replicas()
            if hasattr(self.optimizer, "scale_loss"):
                scaled = self.optimizer.scale_loss(scaled)
        variables = self.trainable_variables
        gradients = self.adjust_gradients(tape.gradient(scaled, variables), variables)
        self.optimizer.apply(gradients, variables)
        pairs = [pair for online, target in self.momentum_pairs() for pair in ema_pairs(online, target)]
        if pairs:
            ema_update(pairs, self.current_momentum(step))
        self.after_step(outputs)
        return self._update_trackers(loss, terms, outputs)

    def test_step(self, data):
        batch = self.unpack_batch(data)
        losses, outputs = self.forward(batch, training=False)
        terms = {name: tf.reduce_mean(losses[name]) for name in self.loss_names}
        return self._update_trackers(self._total(terms), terms, outputs)

    def _total(self, terms):
        weights = self.term_weights
        return tf.add_n([value * weights.get(name, 1.0) for name, value in terms.items()])

    @property
    def metrics(self):
        return list(self._trackers.values())

    def _update_trackers(self, loss, terms, outputs):
        self._trackers["loss"].update_state(loss)
        for name, value in terms.items():
            self._trackers[name].update_state(value)
        for name in self.metric_names:
            self._trackers[name].update_state(outputs[name])
        logs = {name: tracker.result() for name, tracker in self._trackers.items()}
        if _multi_worker():
            # Keras reduces logs across workers with `strategy.reduce(..., axis=0)`,
            # which rejects scalars ("Invalid reduction dimension 0"); shape [1]
            # reduces to the same scalar.
            logs = {name: tf.reshape(value, [1]) for name, value in logs.items()}
        return logs

    # Keras plumbing --------------------------------------------------------------
    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras probes a data batch here to build the model under a strategy.
        # These models are built in __init__, so only the optimizer is left to
        # build; skipping the probe also avoids keras-team/keras#20585, where the
        # probe fails under MultiWorkerMirroredStrategy (tested in test_multiworker).
        if self.optimizer is not None and not self.optimizer.built:
            with self.distribute_strategy.scope():
                self.optimizer.build(self.trainable_variables)

    def fit(self, *args, **kwargs):
        """`keras.Model.fit`. Under MultiWorkerMirroredStrategy, a worker that dies
        makes the others raise `WorkerLostError` (one line, naming the lost task)
        instead of a TensorFlow graph-execution traceback."""
        if isinstance(args[0] if args else kwargs.get("x"), tf.data.Dataset):
            # A Dataset shuffles itself (the data helpers do); Keras 3.15 warns on
            # every fit that its default shuffle=True is ignored for one.
            kwargs.setdefault("shuffle", False)
        callbacks = kwargs.get("callbacks")
        if callbacks is None or isinstance(callbacks, (list, tuple)):
            kwargs["callbacks"] = [_TrainingLength()] + list(callbacks or [])
        try:
            return super().fit(*args, **kwargs)
        except _PEER_ERRORS as error:
            with self.distribute_strategy.scope():
                if not _multi_worker():
                    raise
            resolver = self.distribute_strategy.cluster_resolver
            raise _worker_lost(error, (resolver.task_type, int(resolver.task_id))) from None

    @classmethod
    def from_config(cls, config):
        # Deserialising the sub-models consumes their dicts: keep the caller's intact.
        return cls(**copy.deepcopy(config))

