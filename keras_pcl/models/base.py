"""The train_step skeleton every method shares, and the cross-replica helpers.

A method subclasses `ContrastiveModel` and writes two things:

* `forward(views, index, training)`: returns `(losses, outputs)` where
  `losses` maps a loss-term name to a per-sample `[B]` tensor (the total loss
  is the sum of their batch means) and `outputs` carries what the method
  needs afterwards (keys to enqueue, accuracies);
* `after_step(outputs)`: state updates done once per global step after the
  gradients are applied (EMA, queue), written with `apply_once`.

The skeleton does the rest: gradient tape, loss scaling under a strategy,
mixed precision, the optimizer step on `query_variables`, and metrics.
"""

import re

import keras
import tensorflow as tf


def num_replicas():
    """Replicas in sync under the current strategy (1 without one)."""
    return tf.distribute.get_strategy().num_replicas_in_sync


def gather_across_replicas(tensor):
    """Concatenates `tensor` from all replicas along axis 0 (identity on one replica).

    Inside `train_step` under a strategy every replica then holds the same
    global tensor, so state derived from it (the queue) stays identical.
    """
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return tensor
    # MultiWorkerMirroredStrategy gathers "to" the tensor's device and refuses an
    # unplaced one, as inputs straight from the dataset (the sample indices) are;
    # an identity op takes the replica's device.
    return context.all_gather(tf.identity(tensor), axis=0)


def _tf_variable(variable):
    return variable.value if isinstance(variable, keras.Variable) else variable


def _update_once(updates):
    """Runs `[(variable, update_fn, args), ...]` once per global step, on every replica.

    Under a strategy, writing a mirrored variable from the replica context
    does not keep the copies equal; this goes through `merge_call` and
    `strategy.extended.update`, so each replica's copy receives that replica's
    `args`. Callers pass args that are already equal across replicas
    (computed from mirrored weights or from `gather_across_replicas`).
    """
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        for variable, update_fn, args in updates:
            update_fn(variable, *args)
        return

    def merge_fn(strategy, *all_args):
        for (variable, update_fn, _), args in zip(updates, all_args):
            strategy.extended.update(_tf_variable(variable), update_fn, args=args)

    context.merge_call(merge_fn, args=tuple(args for _, _, args in updates))


def apply_once(assignments):
    """Assigns `[(variable, new_value), ...]` once per global step, on every replica
    (see `_update_once`)."""
    _update_once([(variable, lambda var, value: var.assign(value), (value,)) for variable, value in assignments])


def scatter_once(variable, indices, updates):
    """Writes `updates [n, ...]` into rows `indices [n]` of `variable`, once per global step.

    The in-place counterpart of `apply_once` for large state (a scatter, not a
    copy of the whole variable); `indices` and `updates` must be equal across
    replicas (from `gather_across_replicas`).
    """
    indices = tf.cast(indices, tf.int64)[:, None]
    _update_once([(variable, lambda var, i, u: _tf_variable(var).scatter_nd_update(i, u), (indices, updates))])


def _multi_worker():
    strategy = tf.distribute.get_strategy()
    # The same test Keras' TF trainer uses to pick its cross-worker reduction.
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and \
        strategy.extended._in_multi_worker_mode()  # noqa: SLF001 (no public accessor)


class WorkerLostError(RuntimeError):
    """A worker of a multi-worker job stopped answering; every worker stops.

    Restart all workers with the same command: they resume from the newest
    checkpoint (`keras_pcl.callbacks.TrainingCheckpoint`).
    """


# What TensorFlow's collectives raise on the survivors when a peer process dies.
_PEER_ERRORS = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.CancelledError,
                tf.errors.AbortedError)


_TASK = re.compile(r"/job:(\w+)(?:/replica:\d+)?/task:(\d+)")
# Where TensorFlow's error names the lost peer, most specific first: the coordination
# service's list of tasks that stopped sending heartbeats, the task an error was
# reported from, the remote end of a failed RPC; then anywhere in the text. The text may
# name this worker's own task too (a CI run's did, before the lost one), so that one is skipped.
_PEER_CONTEXTS = (re.compile(r"stopped sending heartbeats\):([\s\S]{0,400})"),
                  re.compile(r"[Ee]rror reported from (\S+)"),
                  re.compile(r"remote target (\S+)"),
                  re.compile(r"([\s\S]+)"))


def _lost_peer(text, own_task):
    for context in _PEER_CONTEXTS:
        for match in context.finditer(text):
            for task in _TASK.finditer(match.group(1)):
                if (task.group(1), int(task.group(2))) != own_task:
                    return f"/job:{task.group(1)}/task:{task.group(2)}"
    return "another worker"


def _worker_lost(error, own_task=None):
    """`own_task`: this worker's `(task_type, task_id)`, never named as the lost one."""
    text = str(error)
    if "stopped sending heartbeats" in text:
        reason = "it stopped sending heartbeats"
    else:
        aborted = re.search(r"aborted by: (.*)", text)
        reason = aborted.group(1).strip() if aborted else type(error).__name__
    return WorkerLostError(
        f"lost contact with {_lost_peer(text, own_task)} of the multi-worker job "
        f"({reason[:160]}); all workers stop here. Restart every worker with the same command to resume "
        "from the newest checkpoint.")


def l2_normalize(x):
    return tf.math.l2_normalize(tf.cast(x, tf.float32), axis=-1)


class ContrastiveModel(keras.Model):
    """Base of keras_pcl's self-supervised models (not used directly).

    Training data is `((view1, view2), index)`: two augmented views of each
    image and the image's index in the dataset (`keras_pcl.data` builds it).

    Subclasses set `self.loss_names` and `self.metric_names` before calling
    `_create_trackers()`; `query_variables` are the weights the optimizer
    updates. Momentum encoders mark their variables `trainable=False`, so
    Keras (compile, `.keras` loading, checkpoints) builds the optimizer over
    exactly these.
    """

    loss_names = ()
    metric_names = ()

    def _create_trackers(self):
        self._trackers = {
            name: keras.metrics.Mean(name=name) for name in ("loss",) + tuple(self.loss_names)
        }
        self._trackers.update({name: keras.metrics.Mean(name=name) for name in self.metric_names})

    @property
    def metrics(self):
        return list(self._trackers.values())

    @property
    def query_variables(self):
        """The weights gradients update (momentum encoders' variables are non-trainable)."""
        return self.trainable_variables

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
            # A Dataset shuffles itself (contrastive_dataset does); Keras 3.15 warns on
            # every fit that its default shuffle=True is ignored for one.
            kwargs.setdefault("shuffle", False)
        try:
            return super().fit(*args, **kwargs)
        except _PEER_ERRORS as error:
            with self.distribute_strategy.scope():
                if not _multi_worker():
                    raise
            resolver = self.distribute_strategy.cluster_resolver
            raise _worker_lost(error, (resolver.task_type, int(resolver.task_id))) from None

    def forward(self, views, index, training):
        raise NotImplementedError

    @property
    def term_weights(self):
        """Weight of each loss term in the optimised total (absent: 1); terms are logged unweighted."""
        return {}

    def _total(self, terms):
        weights = self.term_weights
        return tf.add_n([value * weights[name] if name in weights else value for name, value in terms.items()])

    def after_step(self, outputs):
        pass

    def _unpack(self, data):
        x, index, _ = keras.utils.unpack_x_y_sample_weight(data)
        if not isinstance(x, (tuple, list)) or len(x) != 2:
            raise ValueError(
                f"{type(self).__name__} trains on ((view1, view2), index) batches; "
                "build the dataset with keras_pcl.data.contrastive_dataset()."
            )
        return tuple(x), index

    def train_step(self, data):
        views, index = self._unpack(data)
        with tf.GradientTape() as tape:
            losses, outputs = self.forward(views, index, training=True)
            terms = {name: tf.reduce_mean(value) for name, value in losses.items()}
            loss = self._total(terms)
            # Keras sums gradients over replicas; the step should average them.
            scaled = loss / num_replicas()
            if hasattr(self.optimizer, "scale_loss"):
                scaled = self.optimizer.scale_loss(scaled)
        variables = self.query_variables
        gradients = tape.gradient(scaled, variables)
        self.optimizer.apply(gradients, variables)
        self.after_step(outputs)
        return self._update_trackers(loss, terms, outputs)

    def test_step(self, data):
        views, index = self._unpack(data)
        losses, outputs = self.forward(views, index, training=False)
        terms = {name: tf.reduce_mean(value) for name, value in losses.items()}
        return self._update_trackers(self._total(terms), terms, outputs)

    def _update_trackers(self, loss, terms, outputs):
        self._trackers["loss"].update_state(loss)
        for name, value in terms.items():
            self._trackers[name].update_state(value)
        for name in self.metric_names:
            self._trackers[name].update_state(outputs[name])
        return self._logs()

    def _logs(self):
        logs = {name: tracker.result() for name, tracker in self._trackers.items()}
        if _multi_worker():
            # Keras reduces logs across workers with `strategy.reduce(..., axis=0)`,
            # which rejects scalars ("Invalid reduction dimension 0"); shape [1]
            # reduces to the same scalar.
            logs = {name: tf.reshape(value, [1]) for name, value in logs.items()}
        return logs

