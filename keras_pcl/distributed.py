"""Cross-replica helpers: gathers (with gradients), apply-once state updates, worker loss.

Under a `tf.distribute` strategy each replica runs `train_step` on its part
of the global batch. State that must stay identical on every replica (queues,
momentum encoders, banks) is updated from tensors that are already equal
across replicas (mirrored weights, or `gather_across_replicas`), once per
global step, through `apply_once` / `scatter_once`. `all_reduce_sum` is the
collective Sinkhorn and the collapse monitors need.
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
    Gradients flow back through the gather (TensorFlow's `all_gather` sums the
    replicas' upstream gradients and hands each replica its own rows), so a
    loss over the global batch (SimCLR's negatives) trains every replica's rows.
    """
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return tensor
    # MultiWorkerMirroredStrategy gathers "to" the tensor's device and refuses an
    # unplaced one, as inputs straight from the dataset (the sample indices) are;
    # an identity op takes the replica's device.
    return context.all_gather(tf.identity(tensor), axis=0)


def replica_id():
    """This replica's position in the global batch (0 without a strategy), an int32 tensor."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return tf.constant(0, tf.int32)
    return tf.cast(context.replica_id_in_sync_group, tf.int32)


def all_reduce_sum(tensor):
    """Sums `tensor` over all replicas (identity on one replica); every replica gets the sum."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return tensor
    return context.all_reduce(tf.distribute.ReduceOp.SUM, tensor)


def all_reduce_max(tensor):
    """Elementwise maximum of `tensor` over all replicas (identity on one replica)."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return tensor
    # tf.distribute reduces by SUM or MEAN only: gather the replicas' values, then take the max.
    return tf.reduce_max(context.all_gather(tf.identity(tensor)[None], axis=0), axis=0)


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
