"""Contrastive losses as pure functions on tensors.

Every function returns the per-sample loss, shape `[B]`, so callers choose
how to reduce it (mean over the batch, divided by the number of replicas
under a distribution strategy). Computation happens in float32 whatever the
input dtype, so the losses stay exact under `mixed_bfloat16`.

Shapes: `B` batch, `d` embedding dim, `r` queue length, `K` prototypes.
"""

import numpy as np
import tensorflow as tf

from keras_pcl.distributed import all_reduce_max, all_reduce_sum, num_replicas
from keras_pcl.errors import InvalidInputError


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

    The softmax runs over all K prototypes (those of clusters the last
    assignment left empty included), each scaled by its own concentration phi.
    It is not quite the reference's loss with `r >= K - 1` negatives: the
    reference's columns are each sample's positive prototype, once per sample,
    plus the negatives, so when samples of a batch share a prototype it appears
    in several columns, and for each sample the other samples' copies of its
    own prototype count as negatives; the reference also draws negatives only
    from ids below the largest assigned one (`range(im2cluster.max())`), so the
    prototype with the highest id is never a negative there.

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
    drawn from all the other prototypes. Unlike the reference, a prototype that
    is positive for several samples appears once, so it is never also a
    negative, and the prototype with the highest id can be drawn (the
    reference samples from `range(im2cluster.max())`, which leaves it out).

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


def _two_view_logits(z1, z2, temperature, all_z1, all_z2, offset):
    """Rows `[z1; z2]` against columns `[all_z1; all_z2]` (all L2-normalised), over `T`, each
    row's own column set to -1e9; returns (logits [2B, 2N], own columns [2B], rows [B], N)."""
    z1, z2 = tf.math.l2_normalize(_f32(z1), axis=-1), tf.math.l2_normalize(_f32(z2), axis=-1)
    if all_z1 is None:
        all_z1, all_z2 = z1, z2
    else:
        all_z1, all_z2 = tf.math.l2_normalize(_f32(all_z1), -1), tf.math.l2_normalize(_f32(all_z2), -1)
    batch, total = tf.shape(z1)[0], tf.shape(all_z1)[0]
    anchors = tf.concat([z1, z2], axis=0)
    candidates = tf.concat([all_z1, all_z2], axis=0)
    logits = tf.matmul(anchors, candidates, transpose_b=True) / temperature
    rows = offset + tf.range(batch)
    own = tf.concat([rows, total + rows], axis=0)
    is_own = tf.one_hot(own, 2 * total, on_value=True, off_value=False)
    return tf.where(is_own, tf.constant(-1e9, tf.float32), logits), own, rows, total


def nt_xent_logits(z1, z2, temperature, all_z1=None, all_z2=None, offset=0):
    """Masked logits and positive columns of NT-Xent (see `nt_xent`).

    Args:
        z1, z2: `[B, d]` embeddings of the two views (L2-normalised here).
        temperature: positive float `T`.
        all_z1, all_z2: `[N, d]` embeddings of the whole global batch (under a
            strategy, gathered from every replica; these rows include `z1`,
            `z2`). None: the batch is `z1`, `z2` themselves.
        offset: row of `z1[0]` within `all_z1` (replica id times `B`).

    Returns:
        `(logits [2B, 2N], positives [2B])`: row `a` of `[z1; z2]` against every
        row of `[all_z1; all_z2]` divided by `T`, its own column set to -1e9
        (removed from the softmax), and the column of its positive.
    """
    logits, _, rows, total = _two_view_logits(z1, z2, temperature, all_z1, all_z2, offset)
    return logits, tf.concat([total + rows, rows], axis=0)


def nt_xent(z1, z2, temperature):
    """NT-Xent of SimCLR (Chen et al., 2020) over the 2B views of a batch.

    Row i of `[z1; z2]` (L2-normalised inside) is contrasted with the other
    `2B - 1` rows: its positive is the other view of the same image, every
    other row (same view or not) a negative. Its mean is SimCLR's loss.

    Args:
        z1, z2: `[B, d]` embeddings of the two views of the same B images.
        temperature: positive float `T`.

    Returns:
        `[2B]` loss `-log softmax_{j != i}(z_i . z_j / T)[positive(i)]`.
    """
    logits, positives = nt_xent_logits(z1, z2, temperature)
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=positives, logits=logits)


def negative_cosine(p, z):
    """`-cos(p, z)` per sample, with the gradient stopped on `z` (BYOL, SimSiam).

    BYOL's `2 - 2 cos(p, z)` is `2 + 2 * negative_cosine(p, z)`.

    Args:
        p: `[B, d]` predictions.
        z: `[B, d]` targets (no gradient flows into them).

    Returns:
        `[B]` loss in `[-1, 1]`.
    """
    p = tf.math.l2_normalize(_f32(p), axis=-1)
    z = tf.math.l2_normalize(tf.stop_gradient(_f32(z)), axis=-1)
    return -tf.reduce_sum(p * z, axis=-1)


def sinkhorn(scores, epsilon=0.05, iterations=3, shared_rows=0, shared_weight=1.0):
    """Equal-partition codes of SwAV (Caron et al., 2020) by Sinkhorn-Knopp, without gradient.

    `Q = exp(scores / epsilon)`, then, `iterations` times, every prototype's
    total mass (a column sum over all samples) is made `1/K` and every
    sample's (a row sum) `1/N`; the result is `N * Q`, each row summing to 1.
    Computed in the log domain (a log-sum-exp per normalisation), so no finite
    input overflows: `scores / epsilon` reaches 20 for unit vectors and far more
    for unnormalised ones.

    Under a distribution strategy the column sums, `N` and the maximum are
    all-reduced across replicas, so each replica's rows are the codes of the
    whole global batch computed on one device.

    Args:
        scores: `[B, K]` prototype scores of this replica's samples.
        epsilon: positive float; smaller is sharper.
        iterations: normalisation rounds, >= 1.
        shared_rows: the first `shared_rows` rows are the same on every replica
            (SwAV's queue of past embeddings) and count once in the sums, not
            once per replica.
        shared_weight: 1, or 0 to leave the shared rows out of the sums (a queue
            not in use yet); a scalar that may be a tensor.

    Returns:
        `[B, K]` float32 codes, no gradient; rows sum to 1.
    """
    scores = tf.stop_gradient(_f32(scores))
    rows = tf.shape(scores)[0]
    # Row weights in the cross-replica sums: 1 for this replica's samples; shared rows
    # 1/R on each of the R replicas, so all-reduced they count once; 0 leaves a row out.
    local = tf.cast(tf.range(rows) >= shared_rows, tf.float32)
    weight = local + (1.0 - local) * tf.cast(shared_weight, tf.float32) / num_replicas()
    counted = (weight > 0)[:, None]
    total = all_reduce_sum(tf.reduce_sum(weight))
    log_weight = tf.math.log(tf.where(counted, weight[:, None], 1.0))
    log_k = tf.math.log(tf.cast(tf.shape(scores)[1], tf.float32))
    # The first step normalises each prototype's column, so a shift per column changes
    # nothing: subtracting each column's maximum over the rows that count keeps every
    # exponent <= 0 there. Halving before subtracting keeps the difference finite for any
    # finite scores; beyond float32's range after dividing by epsilon, it is clipped.
    top = all_reduce_max(tf.reduce_max(tf.where(counted, scores, -np.inf), axis=0))
    log_q = tf.clip_by_value((scores / 2.0 - top / 2.0) * (2.0 / epsilon), -1e37, 1e37)
    for _ in range(iterations):
        # Each prototype's mass over all counted samples of all replicas: 1/K.
        weighted = tf.where(counted, log_q + log_weight, -np.inf)
        peak = all_reduce_max(tf.reduce_max(weighted, axis=0))
        mass = all_reduce_sum(tf.reduce_sum(tf.exp(weighted - peak), axis=0))
        log_q = log_q - (peak + tf.math.log(mass)) - log_k
        # Each sample's mass: 1/N (a row is on one replica only: no collective).
        log_q = log_q - tf.reduce_logsumexp(log_q, axis=1, keepdims=True) - tf.math.log(total)
    return tf.exp(log_q + tf.math.log(total))


def swav(crop_scores, num_large_crops=2, temperature=0.1, epsilon=0.05, sinkhorn_iterations=3,
         queue_scores=None, queue_weight=1.0, return_codes=False):
    """SwAV's swapped prediction loss over multi-crop views, per sample.

    For each large crop i, its codes `q_i = sinkhorn(scores_i)` (detached;
    with `queue_scores[i]`, the queue's scores join the Sinkhorn step and only
    the batch's rows are kept) are the targets of every other crop v's
    prediction `softmax(scores_v / T)`; the loss is the mean over large crops
    i of the mean over the other crops v of `-sum_k q_i log softmax(scores_v / T)`.

    Args:
        crop_scores: list of `[B, K]` prototype scores, large crops first.
        num_large_crops: how many of the first crops are large (get codes).
        temperature: positive float `T` of the predictions.
        epsilon, sinkhorn_iterations: as in `sinkhorn`.
        queue_scores: None or a list (one per large crop) of `[r, K]` scores of
            past embeddings, the same on every replica.
        queue_weight: 1, or 0 to leave the queue out (not filled yet); may be a tensor.
        return_codes: also return the large crops' codes (for monitors).

    Returns:
        `[B]` loss, or `(loss, [codes_i [B, K] per large crop])` with `return_codes`.
    """
    crop_scores = [_f32(s) for s in crop_scores]
    if not 1 <= num_large_crops <= len(crop_scores) or len(crop_scores) < 2:
        raise InvalidInputError(f"swav needs at least 2 crops and 1 to {len(crop_scores)} large ones, "
                         f"got {len(crop_scores)} crops and num_large_crops={num_large_crops}.")
    log_predictions = [tf.nn.log_softmax(s / temperature, axis=1) for s in crop_scores]
    per_sample, all_codes = [], []
    for i in range(num_large_crops):
        scores = crop_scores[i]
        if queue_scores is None:
            codes = sinkhorn(scores, epsilon, sinkhorn_iterations)
        else:
            queued = _f32(queue_scores[i])
            codes = sinkhorn(tf.concat([queued, scores], axis=0), epsilon, sinkhorn_iterations,
                             shared_rows=tf.shape(queued)[0], shared_weight=queue_weight)[tf.shape(queued)[0]:]
        others = [v for v in range(len(crop_scores)) if v != i]
        per_sample.append(tf.add_n([-tf.reduce_sum(codes * log_predictions[v], axis=1) for v in others])
                          / len(others))
        all_codes.append(codes)
    loss = tf.add_n(per_sample) / num_large_crops
    return (loss, all_codes) if return_codes else loss


def supcon(z1, z2, labels, temperature, all_z1=None, all_z2=None, all_labels=None, offset=0):
    """Supervised contrastive loss (SupCon, Khosla et al., 2020) over the 2B views of a batch.

    Anchor i of `[z1; z2]` (L2-normalised inside) is contrasted with the other
    `2B - 1` rows; its positives P(i) are the other rows with its label (its
    other view among them):
    `-(1/|P(i)|) sum_{p in P(i)} log softmax_{a != i}(z_i . z_a / T)[p]`.
    With every label distinct it is `nt_xent`. An anchor without a positive
    (impossible with two views) would get 0.

    Args:
        z1, z2: `[B, d]` embeddings of the two views of the same B images.
        labels: `[B]` int labels.
        temperature: positive float `T`.
        all_z1, all_z2, all_labels, offset: the global batch under a strategy,
            as in `nt_xent_logits` (None: the batch itself).

    Returns:
        `[2B]` per-anchor loss.
    """
    logits, own, _, total = _two_view_logits(z1, z2, temperature, all_z1, all_z2, offset)
    labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
    all_labels = labels if all_labels is None else tf.cast(tf.reshape(all_labels, [-1]), tf.int32)
    anchor_labels = tf.concat([labels, labels], axis=0)
    column_labels = tf.concat([all_labels, all_labels], axis=0)
    positive = tf.cast(tf.equal(anchor_labels[:, None], column_labels[None, :]), tf.float32)
    positive = positive * (1.0 - tf.one_hot(own, 2 * total))
    log_prob = tf.nn.log_softmax(logits, axis=1)
    count = tf.reduce_sum(positive, axis=1)
    return -tf.reduce_sum(positive * log_prob, axis=1) / tf.maximum(count, 1.0)


def paco(features, labels, centre_logits, class_counts, batch_size, alpha=0.05, beta=1.0, gamma=1.0,
         temperature=0.2, anchor_offset=0):
    """The PaCo loss (Cui et al., 2021), per anchor, as the official `PaCoLoss` (supt = 1).

    The anchors are the B queries `features[anchor_offset : anchor_offset + B]`
    (B = `batch_size`; 0 on one replica, where `features` is `[q; k; queue]`).
    Each anchor's logits are `[centre_logits + log(prior + 1e-9) | q . features / T]`
    (prior = `class_counts / sum`), less their row maximum (no gradient through
    it); its own column is masked out. Positives: weight `beta` on its class's
    centre and `alpha` on every other column with its label; the normaliser
    weights the centre columns 1 and the contrast columns `gamma`. The loss is
    `-sum(positive * log_prob) / sum(positive)`.

    Args:
        features: `[2B + r, d]` rows `[q; k; queue]` (L2-normalised queries, keys,
            queue), under a strategy `[Q; K; queue]` of the global batch.
        labels: `[2B + r]` int labels of those rows.
        centre_logits: `[B, C]` class-centre logits of the anchors, before the prior.
        class_counts: `[C]` training images per class.
        batch_size: B, the anchors.
        alpha, beta, gamma: the weights above (the official CIFAR scripts: alpha 0.01-0.05).
        temperature: positive float `T`.
        anchor_offset: row of the first anchor in `features` (replica id times B).

    Returns:
        `[B]` per-anchor loss.
    """
    features = _f32(features)
    labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
    centre_logits = _f32(centre_logits)
    counts = _f32(class_counts)
    num_classes = tf.shape(centre_logits)[1]
    anchors = features[anchor_offset:anchor_offset + batch_size]
    anchor_labels = labels[anchor_offset:anchor_offset + batch_size]
    contrast = tf.matmul(anchors, features, transpose_b=True) / temperature  # [B, 2B + r]
    prior = counts / tf.reduce_sum(counts)
    logits = tf.concat([centre_logits + tf.math.log(prior + 1e-9)[None, :], contrast], axis=1)
    logits = logits - tf.stop_gradient(tf.reduce_max(logits, axis=1, keepdims=True))
    not_self = 1.0 - tf.one_hot(anchor_offset + tf.range(batch_size), tf.shape(features)[0])
    same = tf.cast(tf.equal(anchor_labels[:, None], labels[None, :]), tf.float32) * not_self
    positive = tf.concat([beta * tf.one_hot(anchor_labels, num_classes), alpha * same], axis=1)
    normaliser = tf.concat([tf.ones_like(centre_logits), gamma * not_self], axis=1)
    log_prob = logits - tf.math.log(tf.reduce_sum(tf.exp(logits) * normaliser, axis=1, keepdims=True) + 1e-12)
    return -tf.reduce_sum(positive * log_prob, axis=1) / tf.reduce_sum(positive, axis=1)
