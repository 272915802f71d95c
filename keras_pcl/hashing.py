"""Seeded permutations from integer hashing: the same result in graph mode, XLA and NumPy.

TensorFlow's stateless random ops draw different streams in TF kernels and under
XLA (and may differ across devices), so a seed alone does not fix their output.
keras_pcl's own random choices — MoCo's key shuffle, k-means' initial centroids
and training subsample — use this instead: integer ops only, identical everywhere.
"""

import tensorflow as tf

_GOLDEN = 0x9E3779B9  # 2^32 / golden ratio: spreads consecutive seeds over 32 bits


def hashed_permutation(size, seed):
    """A pseudo-random permutation of `range(size)`, a function of `seed` only.

    Sorts MurmurHash3's 32-bit finaliser (a bijection, so there are no ties) of
    `index + seed * golden ratio` (mod 2^32).

    Args:
        size: scalar int (tensor or Python), at most 2^32.
        seed: scalar int (tensor or Python); only its value mod 2^32 counts.

    Returns:
        `[size]` int32 permutation.
    """
    if isinstance(seed, int):
        seed = tf.constant(seed % 2**32, tf.int64)
    h = tf.cast(tf.range(size), tf.uint32) + tf.cast(seed, tf.uint32) * tf.constant(_GOLDEN, tf.uint32)
    for shift, multiplier in ((16, 0x85EBCA6B), (13, 0xC2B2AE35)):
        h = tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, tf.constant(shift, tf.uint32)))
        h = h * tf.constant(multiplier, tf.uint32)
    h = tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, tf.constant(16, tf.uint32)))
    return tf.argsort(tf.cast(h, tf.int64))
