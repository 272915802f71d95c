"""Seeded permutations and uniforms from integer hashing: the same in graph mode, XLA and NumPy.

TensorFlow's stateless random ops draw different streams in TF kernels and under
XLA (and may differ across devices), so a seed alone does not fix their output.
keras_pcl's own random choices — MoCo's key shuffle, k-means' initial centroids (random
and k-means++) and training subsample — use this instead: integer ops only, identical
everywhere.
"""

import tensorflow as tf

_GOLDEN = 0x9E3779B9  # 2^32 / golden ratio: spreads consecutive seeds over 32 bits


def _mixed_bits(size, seed):
    """MurmurHash3's 32-bit finaliser of `index + seed * golden ratio` (mod 2^32), `[size]` uint32.

    The finaliser is a bijection of 32-bit words, so distinct indices never collide.
    """
    if isinstance(seed, int):
        seed = tf.constant(seed % 2**32, tf.int64)
    h = tf.cast(tf.range(size), tf.uint32) + tf.cast(seed, tf.uint32) * tf.constant(_GOLDEN, tf.uint32)
    for shift, multiplier in ((16, 0x85EBCA6B), (13, 0xC2B2AE35)):
        h = tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, tf.constant(shift, tf.uint32)))
        h = h * tf.constant(multiplier, tf.uint32)
    return tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, tf.constant(16, tf.uint32)))


def hashed_permutation(size, seed):
    """A pseudo-random permutation of `range(size)`, a function of `seed` only.

    Sorts the hashed indices (no ties: the hash is a bijection).

    Args:
        size: scalar int (tensor or Python), at most 2^32.
        seed: scalar int (tensor or Python); only its value mod 2^32 counts.

    Returns:
        `[size]` int32 permutation.
    """
    return tf.argsort(tf.cast(_mixed_bits(size, seed), tf.int64))


def hashed_uniform(size, seed):
    """`[size]` float32 numbers in [0, 1), a function of `seed` only: the top 24 bits
    of each hashed index (exactly representable in float32) times 2^-24."""
    top_bits = tf.bitwise.right_shift(_mixed_bits(size, seed), tf.constant(8, tf.uint32))
    return tf.cast(top_bits, tf.float32) * (1.0 / 2**24)
