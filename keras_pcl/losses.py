"""Contrastive losses as pure functions on tensors.

Every function returns the per-sample loss, shape `[B]`, so callers choose
how to reduce it (mean over the batch, divided by the number of replicas
under a distribution strategy). Computation happens in float32 whatever the
input dtype, so the losses stay exact under `mixed_bfloat16`.

Shapes: `B` batch, `d` embedding dim, `r` queue length, `K` prototypes.
"""

import tensorflow as tf


def _f32(x):
    return tf.cast(x, tf.float32)


def info_nce(query, key, queue, temperature):
    """InfoNCE of MoCo (He et al., 2020): the key is the positive, the queue the negatives.

    Args:
        query: `[B, d]` L2-normalised query embeddings.
        key: `[B, d]` L2-normalised key embeddings (the positive of each query).
        queue: `[r, d]` L2-normalised negative keys.
        temperature: positive float `T`.

    Returns:
        `[B]` loss `-log softmax([q.k, q.queue] / T)[0]`.
    """
    logits = info_nce_logits(query, key, queue, temperature)
    return tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=tf.zeros(tf.shape(logits)[0], tf.int32), logits=logits
    )


def info_nce_logits(query, key, queue, temperature):
    """`[B, 1 + r]` logits of InfoNCE; column 0 is the positive."""
    query, key, queue = _f32(query), _f32(key), _f32(queue)
    positive = tf.reduce_sum(query * key, axis=-1, keepdims=True)
    negatives = tf.matmul(query, queue, transpose_b=True)
    return tf.concat([positive, negatives], axis=1) / temperature


def proto_nce_logits(query, prototypes, concentration):
    """`[B, K]` logits `q . c_j / phi_j` of ProtoNCE over all K prototypes."""
    query, prototypes = _f32(query), _f32(prototypes)
    return tf.matmul(query, prototypes, transpose_b=True) / _f32(concentration)[None, :]


def proto_nce(query, prototypes, concentration, assignments):
    """ProtoNCE of PCL (Li et al., 2021) for one granularity, exact form.

    The softmax runs over all K prototypes, each scaled by its own
    concentration phi; this is the reference's loss with `r >= K - 1`.

    Args:
        query: `[B, d]` L2-normalised query embeddings.
        prototypes: `[K, d]` L2-normalised prototypes (cluster centroids).
        concentration: `[K]` positive concentrations phi.
        assignments: `[B]` int, each sample's prototype id in `[0, K)`.

    Returns:
        `[B]` loss `-log softmax_j(q . c_j / phi_j)[assignment]`.
    """
    logits = proto_nce_logits(query, prototypes, concentration)
    return tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=tf.cast(assignments, tf.int32), logits=logits
    )


def sample_negative_prototypes(assignments, num_prototypes, num_negatives, seed=None):
    """Draws negatives among the prototypes that are positive for no sample in the batch.

    Vectorised and on device: each prototype gets a uniform random score,
    the batch's positives get -inf, and the top `num_negatives` are kept.

    Args:
        assignments: `[B]` int prototype id of each sample.
        num_prototypes: `K`.
        num_negatives: `r`, the number of negatives to draw.
        seed: optional `[2]` int seed for stateless sampling.

    Returns:
        `(ids, valid)`: `[min(r, K)]` int ids and bool flags, False where
        fewer non-positive prototypes exist (those ids must be masked out).
    """
    assignments = tf.cast(assignments, tf.int32)
    is_positive = tf.scatter_nd(
        assignments[:, None], tf.ones_like(assignments), [num_prototypes]
    ) > 0
    if seed is None:
        scores = tf.random.uniform([num_prototypes])
    else:
        scores = tf.random.stateless_uniform([num_prototypes], seed=seed)
    scores = tf.where(is_positive, -tf.ones_like(scores), scores)
    best, ids = tf.math.top_k(scores, k=tf.minimum(num_negatives, num_prototypes))
    return ids, best >= 0.0


def sampled_proto_nce(query, prototypes, concentration, assignments, num_negatives, seed=None):
    """ProtoNCE with `r` sampled negative prototypes, as the reference trains it.

    Columns are the batch's distinct positive prototypes plus `r` negatives
    drawn from the other prototypes. Unlike the reference, a prototype that is
    positive for several samples appears once, so it is never also a negative.

    Args:
        query, prototypes, concentration, assignments: as in `proto_nce`.
        num_negatives: `r`, negatives per step (shared by the batch).
        seed: optional `[2]` int seed for stateless sampling.

    Returns:
        `[B]` per-sample loss.
    """
    query = _f32(query)
    prototypes, concentration = _f32(prototypes), _f32(concentration)
    assignments = tf.cast(assignments, tf.int32)
    num_prototypes = tf.shape(prototypes)[0]
    negative_ids, negative_valid = sample_negative_prototypes(
        assignments, num_prototypes, num_negatives, seed
    )
    # A positive column is kept only at its first occurrence in the batch:
    # column j is a duplicate when some earlier column j' < j has its prototype.
    same = tf.equal(assignments[:, None], assignments[None, :])
    batch = tf.shape(assignments)[0]
    strictly_earlier = tf.linalg.band_part(tf.ones([batch, batch], tf.bool), -1, 0) & ~tf.eye(
        batch, dtype=tf.bool
    )
    duplicate = tf.reduce_any(same & strictly_earlier, axis=1)
    column_ids = tf.concat([assignments, negative_ids], axis=0)
    column_valid = tf.concat([~duplicate, negative_valid], axis=0)
    logits = tf.matmul(query, tf.gather(prototypes, column_ids), transpose_b=True)
    logits = logits / tf.gather(concentration, column_ids)[None, :]
    logits = tf.where(column_valid[None, :], logits, tf.fill(tf.shape(logits), -1e9))
    # Target: the first column holding the sample's own prototype.
    targets = tf.argmax(tf.cast(same, tf.int32), axis=1, output_type=tf.int32)
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=targets, logits=logits)
