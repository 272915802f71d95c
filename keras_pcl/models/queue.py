"""A first-in first-out queue of embeddings (and optionally their labels), replica-safe."""

import keras
import tensorflow as tf

from keras_pcl.distributed import apply_once, gather_across_replicas
from keras_pcl.errors import InvalidInputError


@keras.saving.register_keras_serializable(package="keras_pcl")
class KeyQueue(keras.layers.Layer):
    """The last `size` rows enqueued: MoCo's negative keys, PaCo's labelled keys, SwAV's projections.

    State, all non-trainable variables saved with the model: `keys`
    `[size, dim]` float32, `labels` `[size]` int32 (with `with_labels`; -1
    until written, a label no sample has), `pointer` (next row to write) and
    `filled` (rows written so far, at most `size`).

    `enqueue` gathers the rows of every replica first and writes them once per
    global step, so under a distribution strategy every replica holds the same
    queue and the pointer advances by the global batch.

    Args:
        size: rows kept, >= 1.
        dim: width of a row, >= 1.
        with_labels: also keep an int label per row.
        initializer: `"normal"` (unit-norm random rows: a usable queue of
            negatives from the first step, as MoCo starts) or `"zeros"`.
        **kwargs: passed to `keras.layers.Layer`.

    Example:
    >>> queue = KeyQueue(8, 4)
    >>> queue.enqueue(tf.ones([2, 4]))
    >>> int(queue.pointer.numpy())
    2
    """

    def __init__(self, size, dim, with_labels=False, initializer="normal", **kwargs):
        super().__init__(**kwargs)
        if not size or int(size) < 1:
            raise InvalidInputError(f"queue size must be a positive integer, got {size}.")
        if not dim or int(dim) < 1:
            raise InvalidInputError(f"queue dim must be a positive integer, got {dim}.")
        if initializer not in ("normal", "zeros"):
            raise InvalidInputError(f'queue initializer must be "normal" or "zeros", got {initializer!r}.')
        self.size, self.dim, self.with_labels, self.initializer = int(size), int(dim), bool(with_labels), initializer
        self.keys = self.add_weight(
            shape=(self.size, self.dim), name="keys", trainable=False, dtype="float32", autocast=False,
            initializer=keras.initializers.RandomNormal(seed=0) if initializer == "normal" else "zeros")
        if initializer == "normal":
            self.keys.assign(tf.math.l2_normalize(self.keys, axis=1))
        self.labels = self.add_weight(
            shape=(self.size,), dtype="int32", name="labels", trainable=False,
            initializer=keras.initializers.Constant(-1)) if self.with_labels else None
        self.pointer = self.add_weight(shape=(), dtype="int32", name="pointer", trainable=False, initializer="zeros")
        self.filled = self.add_weight(shape=(), dtype="int32", name="filled", trainable=False, initializer="zeros")
        self.built = True

    def check_batch_size(self, global_batch):
        """A one-line error unless `size` is a multiple of the global batch (each write is one block)."""
        if self.size % global_batch:
            raise InvalidInputError(
                f"queue_size={self.size} is not a multiple of the global batch size {global_batch}; "
                f"choose a queue_size divisible by it (e.g. {-(-self.size // global_batch) * global_batch}).")

    def enqueue(self, keys, labels=None, enabled=True):
        """Writes this step's rows (of every replica) at the pointer and advances it.

        `enabled`: a boolean (tensor) scalar; False leaves the queue as it is (SwAV
        fills its queue only from a given epoch), without a branch in the graph.
        """
        if self.with_labels and labels is None:
            raise InvalidInputError("this queue keeps labels: pass labels= to enqueue.")
        keys = tf.cast(gather_across_replicas(keys), self.keys.dtype)
        batch = tf.shape(keys)[0]
        tf.debugging.assert_equal(self.size % batch, 0,
                                  message="queue size must be a multiple of the global batch size")
        rows = ((self.pointer + tf.range(batch)) % self.size)[:, None]
        enabled = tf.convert_to_tensor(enabled, tf.bool)

        def gated(variable, value):
            return variable, tf.where(enabled, value, tf.convert_to_tensor(variable))

        updates = [
            gated(self.keys, tf.tensor_scatter_nd_update(self.keys, rows, keys)),
            gated(self.pointer, (self.pointer + batch) % self.size),
            gated(self.filled, tf.minimum(self.filled + batch, self.size)),
        ]
        if self.with_labels:
            labels = tf.cast(gather_across_replicas(labels), tf.int32)
            updates.append(gated(self.labels, tf.tensor_scatter_nd_update(self.labels, rows, labels)))
        apply_once(updates)

    def call(self, inputs=None):
        """The queue's rows `[size, dim]` (inputs are ignored)."""
        return tf.convert_to_tensor(self.keys)

    def get_config(self):
        config = super().get_config()
        config.update(size=self.size, dim=self.dim, with_labels=self.with_labels, initializer=self.initializer)
        return config
