"""Losses against slow, obvious NumPy references on random inputs."""

import numpy as np
import pytest
import tensorflow as tf

from keras_pcl import losses


def normalized(rng, *shape):
    x = rng.normal(size=shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def log_softmax_at(logits, target):
    m = logits.max()
    return logits[target] - m - np.log(np.exp(logits - m).sum())


def reference_info_nce(q, k, queue, t):
    out = []
    for i in range(len(q)):
        logits = np.array([q[i] @ k[i]] + [q[i] @ n for n in queue]) / t
        out.append(-log_softmax_at(logits, 0))
    return np.array(out)


def reference_proto_nce(q, prototypes, phi, assignments):
    out = []
    for i in range(len(q)):
        logits = np.array([q[i] @ prototypes[j] / phi[j] for j in range(len(prototypes))])
        out.append(-log_softmax_at(logits, assignments[i]))
    return np.array(out)


@pytest.mark.parametrize("batch,dim,queue_len", [(4, 8, 16), (7, 3, 5), (1, 16, 64)])
@pytest.mark.parametrize("temperature", [0.07, 0.2, 1.0])
def test_info_nce_matches_reference(rng, batch, dim, queue_len, temperature):
    q, k, queue = normalized(rng, batch, dim), normalized(rng, batch, dim), normalized(rng, queue_len, dim)
    got = losses.info_nce(q, k, queue, temperature).numpy()
    assert got.shape == (batch,)
    np.testing.assert_allclose(got, reference_info_nce(q, k, queue, temperature), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch,dim,num_prototypes", [(5, 8, 6), (16, 4, 30), (1, 3, 2)])
@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_proto_nce_matches_reference(rng, batch, dim, num_prototypes, temperature):
    q, prototypes = normalized(rng, batch, dim), normalized(rng, num_prototypes, dim)
    phi = rng.uniform(0.5, 1.5, num_prototypes).astype(np.float32) * temperature
    assignments = rng.integers(0, num_prototypes, batch)
    got = losses.proto_nce(q, prototypes, phi, assignments).numpy()
    np.testing.assert_allclose(got, reference_proto_nce(q, prototypes, phi, assignments), rtol=1e-5, atol=1e-5)


def test_losses_run_in_float32_for_bfloat16_inputs(rng):
    q, k, queue = normalized(rng, 4, 8), normalized(rng, 4, 8), normalized(rng, 8, 8)
    got = losses.info_nce(tf.cast(q, tf.bfloat16), tf.cast(k, tf.bfloat16), queue, 0.2)
    assert got.dtype == tf.float32


def test_negative_prototypes_exclude_batch_positives(rng):
    assignments = np.array([3, 3, 7, 0, 12])
    ids, valid = losses.sample_negative_prototypes(assignments, 20, 10, seed=[1, 2])
    ids, valid = ids.numpy(), valid.numpy()
    assert valid.all() and len(set(ids)) == 10
    assert not set(ids) & set(assignments)
    # More negatives asked than exist: the surplus is flagged invalid.
    small = np.array([3, 3, 7, 0])
    ids, valid = losses.sample_negative_prototypes(small, 8, 8, seed=[1, 2])
    assert valid.numpy().sum() == 8 - len(set(small))
    assert not set(ids.numpy()[valid.numpy()]) & set(small)


def reference_sampled_proto_nce(q, prototypes, phi, assignments, negatives):
    """Softmax over the batch's distinct positives plus the given negatives."""
    columns = list(dict.fromkeys(assignments.tolist())) + list(negatives)
    out = []
    for i in range(len(q)):
        logits = np.array([q[i] @ prototypes[j] / phi[j] for j in columns])
        out.append(-log_softmax_at(logits, columns.index(assignments[i])))
    return np.array(out)


@pytest.mark.parametrize("num_negatives", [1, 4, 50])
def test_sampled_proto_nce_matches_reference(rng, num_negatives):
    q, prototypes = normalized(rng, 12, 6), normalized(rng, 20, 6)
    phi = rng.uniform(0.05, 0.3, 20).astype(np.float32)
    assignments = rng.integers(0, 6, 12)  # many duplicate positives
    seed = tf.constant([5, 1])
    ids, valid = losses.sample_negative_prototypes(assignments, 20, num_negatives, seed)
    negatives = ids.numpy()[valid.numpy()]
    got = losses.sampled_proto_nce(q, prototypes, phi, assignments, num_negatives, seed).numpy()
    want = reference_sampled_proto_nce(q, prototypes, phi, assignments, negatives)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_sampled_proto_nce_with_all_negatives_is_exact(rng):
    q, prototypes = normalized(rng, 9, 5), normalized(rng, 15, 5)
    phi = rng.uniform(0.1, 0.3, 15).astype(np.float32)
    assignments = rng.integers(0, 15, 9)
    exact = losses.proto_nce(q, prototypes, phi, assignments).numpy()
    sampled = losses.sampled_proto_nce(q, prototypes, phi, assignments, 15, seed=[0, 0]).numpy()
    np.testing.assert_allclose(sampled, exact, rtol=1e-5, atol=1e-5)


# --- NT-Xent (SimCLR) and negative cosine (BYOL, SimSiam) -------------------------------------

from keras_pcl import distributed  # noqa: E402


def unit64(v):
    v = np.asarray(v, np.float64)
    return v / np.sqrt(sum(x * x for x in v))


def reference_nt_xent(z1, z2, t):
    """Row i of [z1; z2] against the other 2B - 1 rows; its positive is the other view of image i."""
    batch = len(z1)
    z = [unit64(v) for v in list(z1) + list(z2)]
    out = []
    for i in range(2 * batch):
        positive = (i + batch) % (2 * batch)
        others = [j for j in range(2 * batch) if j != i]
        logits = np.array([z[i] @ z[j] / t for j in others])
        out.append(-log_softmax_at(logits, others.index(positive)))
    return np.array(out)


def reference_negative_cosine(p, z):
    return np.array([-(unit64(p[i]) @ unit64(z[i])) for i in range(len(p))])


def cross_entropy(logits, positives):
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=positives, logits=logits)


@pytest.mark.parametrize("batch,dim", [(1, 4), (2, 3), (5, 8), (16, 32)])
@pytest.mark.parametrize("temperature", [0.05, 0.2, 1.0])
def test_nt_xent_matches_reference(rng, batch, dim, temperature):
    # Unnormalised, of different norms per row: the loss normalises them itself.
    z1 = (rng.normal(size=(batch, dim)) * rng.uniform(0.1, 10, (batch, 1))).astype(np.float32)
    z2 = (rng.normal(size=(batch, dim)) * rng.uniform(0.1, 10, (batch, 1))).astype(np.float32)
    got = losses.nt_xent(z1, z2, temperature).numpy()
    assert got.shape == (2 * batch,) and got.dtype == np.float32
    np.testing.assert_allclose(got, reference_nt_xent(z1, z2, temperature), rtol=1e-5, atol=1e-5)
    if batch == 1:  # one negative-free softmax: the positive is the only other row
        np.testing.assert_allclose(got, 0.0, atol=1e-6)


def test_nt_xent_is_symmetric_in_the_views_and_asymmetric_in_rows(rng):
    z1, z2 = normalized(rng, 6, 5), normalized(rng, 6, 5)
    a = losses.nt_xent(z1, z2, 0.3).numpy()
    b = losses.nt_xent(z2, z1, 0.3).numpy()
    np.testing.assert_allclose(b, np.concatenate([a[6:], a[:6]]), rtol=1e-6, atol=1e-6)
    # Pairing matters: shuffling z2 against z1 changes the loss (the positives are row-aligned).
    shuffled = losses.nt_xent(z1, z2[::-1], 0.3).numpy()
    assert not np.allclose(shuffled, a, atol=1e-3)
    np.testing.assert_allclose(shuffled, reference_nt_xent(z1, z2[::-1], 0.3), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scale", [1e4, 1e10, 1e-4, 1e-2])
def test_nt_xent_normalises_large_and_tiny_norms(rng, scale):
    z1, z2 = normalized(rng, 6, 8), normalized(rng, 6, 8)
    unit = losses.nt_xent(z1, z2, 0.1).numpy()
    # Each row at its own scale around `scale`, so normalisation must be per row.
    s1 = (scale * rng.uniform(0.5, 2.0, (6, 1))).astype(np.float32)
    s2 = (scale * rng.uniform(0.5, 2.0, (6, 1))).astype(np.float32)
    got = losses.nt_xent(z1 * s1, z2 * s2, 0.1).numpy()
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, unit, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, reference_nt_xent(z1, z2, 0.1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("temperature", [0.01, 0.5])
def test_nt_xent_of_identical_rows_is_log_of_negatives_plus_one(rng, batch, temperature):
    v = rng.normal(size=(1, 7)).astype(np.float32) * 3.0
    z = np.repeat(v, batch, axis=0)
    got = losses.nt_xent(z, z, temperature).numpy()
    np.testing.assert_allclose(got, np.full(2 * batch, np.log(2 * batch - 1)), rtol=1e-5, atol=1e-5)


def test_nt_xent_is_finite_at_low_temperature_with_near_collinear_vectors(rng):
    base = rng.normal(size=(1, 16))
    z1 = (base + 1e-3 * rng.normal(size=(8, 16))).astype(np.float32)
    z2 = (base + 1e-3 * rng.normal(size=(8, 16))).astype(np.float32)
    got = losses.nt_xent(z1, z2, 0.01).numpy()
    assert np.isfinite(got).all()
    # Logits ~100 / T-scaled float32 rounding of the dot products: loose but real tolerance.
    np.testing.assert_allclose(got, reference_nt_xent(z1, z2, 0.01), rtol=1e-3, atol=1e-3)
    # Far apart at T = 0.01 the logits span +-100: still finite, still exact.
    far1, far2 = normalized(rng, 8, 16), normalized(rng, 8, 16)
    got = losses.nt_xent(far1, far2, 0.01).numpy()
    assert np.isfinite(got).all() and got.max() > 10
    np.testing.assert_allclose(got, reference_nt_xent(far1, far2, 0.01), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("replicas", [1, 2, 3, 4])
def test_nt_xent_logits_split_batch_reproduces_nt_xent(rng, replicas):
    batch, local = 12, 12 // replicas
    z1 = rng.normal(size=(batch, 6)).astype(np.float32) * 4
    z2 = rng.normal(size=(batch, 6)).astype(np.float32) * 4
    full = losses.nt_xent(z1, z2, 0.2).numpy()
    parts, order = [], []
    for r in range(replicas):
        rows = slice(r * local, (r + 1) * local)
        offset = tf.constant(r * local, tf.int32) if r % 2 else r * local  # int or tensor offset
        logits, positives = losses.nt_xent_logits(z1[rows], z2[rows], 0.2, all_z1=z1, all_z2=z2, offset=offset)
        assert logits.shape == (2 * local, 2 * batch) and positives.shape == (2 * local,)
        own = np.concatenate([np.arange(r * local, (r + 1) * local), batch + np.arange(r * local, (r + 1) * local)])
        # Rows of replica r: z1[r], then z2[r]; own column masked, positive the other view's column.
        np.testing.assert_array_equal(positives.numpy(), np.concatenate([own[local:], own[:local]]))
        np.testing.assert_array_equal(logits.numpy()[np.arange(2 * local), own], -1e9)
        parts.append(cross_entropy(logits, positives).numpy())
        order.append(own)
    np.testing.assert_allclose(np.concatenate(parts), full[np.concatenate(order)], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.mean([p.mean() for p in parts]), full.mean(), rtol=1e-5)
    # Without all_z1/all_z2 the logits are those of the local batch alone.
    logits, positives = losses.nt_xent_logits(z1, z2, 0.2)
    np.testing.assert_allclose(cross_entropy(logits, positives).numpy(), full, rtol=1e-6, atol=1e-6)


def test_nt_xent_gradient_through_gather_matches_one_device(rng, mirrored):
    strategy = mirrored
    batch, local, d_in, d_out, temperature = 8, 4, 5, 6, 0.2
    assert strategy.num_replicas_in_sync == 2
    x1 = tf.constant(rng.normal(size=(batch, d_in)).astype(np.float32))
    x2 = tf.constant(rng.normal(size=(batch, d_in)).astype(np.float32))
    w0 = rng.normal(size=(d_in, d_out)).astype(np.float32)
    with strategy.scope():
        w = tf.Variable(w0)

    def replica_step(stop_gather_gradient):
        index = distributed.replica_id()
        start = index * local
        with tf.GradientTape() as tape:
            z1, z2 = x1[start:start + local] @ w, x2[start:start + local] @ w
            all_z1, all_z2 = distributed.gather_across_replicas(z1), distributed.gather_across_replicas(z2)
            if stop_gather_gradient:  # what a gather that drops the other replicas' gradients would give
                all_z1, all_z2 = tf.stop_gradient(all_z1), tf.stop_gradient(all_z2)
            logits, positives = losses.nt_xent_logits(z1, z2, temperature, all_z1, all_z2, offset=start)
            rows = cross_entropy(logits, positives)
            loss = tf.reduce_mean(rows) / distributed.num_replicas()
        return loss, tape.gradient(loss, w), rows

    @tf.function
    def distributed_step(stop_gather_gradient):
        loss, grad, rows = strategy.run(replica_step, args=(stop_gather_gradient,))
        return (strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None),
                strategy.reduce(tf.distribute.ReduceOp.SUM, grad, axis=None),
                strategy.experimental_local_results(rows))

    loss, grad, rows = distributed_step(False)
    one_device = tf.Variable(w0)
    with tf.GradientTape() as tape:
        full = losses.nt_xent(x1 @ one_device, x2 @ one_device, temperature)
        want_loss = tf.reduce_mean(full)
    want_grad = tape.gradient(want_loss, one_device).numpy()
    np.testing.assert_allclose(loss.numpy(), want_loss.numpy(), rtol=1e-5)
    np.testing.assert_allclose(grad.numpy(), want_grad, rtol=1e-4, atol=1e-6)
    # Each replica's rows are the global loss's rows z1[r], z2[r].
    order = [np.r_[r * local:(r + 1) * local, batch + r * local:batch + (r + 1) * local] for r in range(2)]
    np.testing.assert_allclose(np.concatenate([r.numpy() for r in rows]), full.numpy()[np.concatenate(order)],
                               rtol=1e-5, atol=1e-5)
    # The check has teeth: dropping the gathered rows' gradients gives a clearly different gradient.
    _, local_only, _ = distributed_step(True)
    assert np.abs(local_only.numpy() - want_grad).max() > 1e-2 * np.abs(want_grad).max()


@pytest.mark.parametrize("batch,dim", [(1, 3), (6, 8), (32, 2)])
def test_negative_cosine_matches_reference(rng, batch, dim):
    p = (rng.normal(size=(batch, dim)) * rng.uniform(0.01, 100, (batch, 1))).astype(np.float32)
    z = (rng.normal(size=(batch, dim)) * rng.uniform(0.01, 100, (batch, 1))).astype(np.float32)
    got = losses.negative_cosine(p, z).numpy()
    assert got.shape == (batch,) and got.dtype == np.float32
    want = reference_negative_cosine(p, z)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert (got >= -1 - 1e-6).all() and (got <= 1 + 1e-6).all()
    # BYOL's 2 - 2 cos is the squared distance of the unit vectors.
    byol = [np.sum((unit64(p[i]) - unit64(z[i])) ** 2) for i in range(batch)]
    np.testing.assert_allclose(2 + 2 * got, byol, rtol=1e-4, atol=1e-5)
    # Scale-invariant in both arguments, per row.
    scaled = losses.negative_cosine(p * np.float32(1e3), z * np.float32(1e-3)).numpy()
    np.testing.assert_allclose(scaled, got, rtol=1e-5, atol=1e-6)


def test_negative_cosine_extremes(rng):
    p = rng.normal(size=(5, 4)).astype(np.float32)
    np.testing.assert_allclose(losses.negative_cosine(p, 7.5 * p).numpy(), -1.0, atol=1e-6)
    np.testing.assert_allclose(losses.negative_cosine(p, -0.5 * p).numpy(), 1.0, atol=1e-6)
    orthogonal = np.array([[1.0, 0.0], [0.0, 3.0]], np.float32), np.array([[0.0, 2.0], [5.0, 0.0]], np.float32)
    np.testing.assert_allclose(losses.negative_cosine(*orthogonal).numpy(), 0.0, atol=1e-7)


def test_negative_cosine_stops_the_gradient_on_the_target(rng):
    p = tf.constant(rng.normal(size=(4, 6)).astype(np.float32))
    z = tf.constant(rng.normal(size=(4, 6)).astype(np.float32))
    with tf.GradientTape() as tape:
        tape.watch([p, z])
        loss = tf.reduce_sum(losses.negative_cosine(p, z))
    grad_p, grad_z = tape.gradient(loss, [p, z], unconnected_gradients=tf.UnconnectedGradients.ZERO)
    np.testing.assert_array_equal(grad_z.numpy(), np.zeros((4, 6)))
    # d(-cos)/dp = -(z_hat - cos * p_hat) / |p|, row by row.
    want = []
    for pi, zi in zip(p.numpy().astype(np.float64), z.numpy().astype(np.float64)):
        ph, zh = unit64(pi), unit64(zi)
        want.append(-(zh - (ph @ zh) * ph) / np.sqrt(pi @ pi))
    assert np.abs(grad_p.numpy()).max() > 1e-3
    np.testing.assert_allclose(grad_p.numpy(), np.array(want), rtol=1e-4, atol=1e-6)


def test_nt_xent_and_negative_cosine_run_in_float32_for_bfloat16_inputs(rng):
    z1 = tf.cast(rng.normal(size=(4, 8)).astype(np.float32), tf.bfloat16)
    z2 = tf.cast(rng.normal(size=(4, 8)).astype(np.float32), tf.bfloat16)
    exact1, exact2 = tf.cast(z1, tf.float32).numpy(), tf.cast(z2, tf.float32).numpy()
    got = losses.nt_xent(z1, z2, 0.1)
    assert got.dtype == tf.float32
    np.testing.assert_allclose(got.numpy(), reference_nt_xent(exact1, exact2, 0.1), rtol=1e-5, atol=1e-5)
    logits, positives = losses.nt_xent_logits(z1[:2], z2[:2], 0.1, all_z1=z1, all_z2=z2, offset=0)
    assert logits.dtype == tf.float32 and positives.dtype == tf.int32
    cosine = losses.negative_cosine(z1, z2)
    assert cosine.dtype == tf.float32
    np.testing.assert_allclose(cosine.numpy(), reference_negative_cosine(exact1, exact2), rtol=1e-5, atol=1e-6)


# --- Sinkhorn-Knopp codes and SwAV's swapped prediction ---------------------------------------

from scipy.special import logsumexp  # noqa: E402

import keras_pcl  # noqa: E402


def reference_sinkhorn(scores, epsilon, iterations, weights=None):
    """SwAV's official Sinkhorn-Knopp in float64 with plain loops: Q = exp(S / eps), then `iterations`
    times every prototype's mass over the samples is made 1/K and every sample's 1/N; returns N * Q.

    `weights`: each row's weight in the column sums and in N (1 by default; 0 leaves a row out)."""
    s = np.asarray(scores, np.float64)
    rows, k = s.shape
    w = np.ones(rows) if weights is None else np.asarray(weights, np.float64)
    n = w.sum()
    q = np.exp(s / epsilon)
    q /= q.sum()
    for _ in range(iterations):
        for j in range(k):
            q[:, j] /= sum(w[b] * q[b, j] for b in range(rows)) * k
        for b in range(rows):
            q[b] /= q[b].sum() * n
    return q * n


def reference_sinkhorn_log(scores, epsilon, iterations):
    """The same algorithm in the float64 log domain, for scores whose exp overflows (|S / eps| up to 7e39)."""
    log_q = np.asarray(scores, np.float64) / epsilon
    rows, k = log_q.shape
    for _ in range(iterations):
        log_q = log_q - logsumexp(log_q, axis=0, keepdims=True) - np.log(k)
        log_q = log_q - logsumexp(log_q, axis=1, keepdims=True) - np.log(rows)
    return np.exp(log_q + np.log(rows))


def log_softmax64(logits):
    logits = np.asarray(logits, np.float64)
    return np.array([log_softmax_at(logits, j) for j in range(len(logits))])


def prototype_scores(rng, batch, num_prototypes, dim=8):
    """Cosines in [-1, 1] of unit embeddings with unit prototypes, float32."""
    return normalized(rng, batch, dim) @ normalized(rng, num_prototypes, dim).T


def column_violation(codes):
    """L1 distance of the column sums of `codes` [N, K] from the equal partition N / K."""
    codes = np.asarray(codes, np.float64)
    return np.abs(codes.sum(0) - len(codes) / codes.shape[1]).sum()


@pytest.mark.parametrize("batch,num_prototypes", [(3, 7), (8, 5), (16, 16), (20, 3)])
@pytest.mark.parametrize("epsilon", [0.05, 0.1])
@pytest.mark.parametrize("iterations", [1, 3])
def test_sinkhorn_matches_reference(rng, batch, num_prototypes, epsilon, iterations):
    scores = prototype_scores(rng, batch, num_prototypes)
    got = losses.sinkhorn(scores, epsilon, iterations)
    assert got.dtype == tf.float32 and got.shape == (batch, num_prototypes)
    got = got.numpy()
    want = reference_sinkhorn(scores, epsilon, iterations)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-5)
    # Loose balance check (3 rounds are far from converged): every prototype's mass within 75% of N / K.
    if iterations == 3 and batch >= num_prototypes:
        np.testing.assert_allclose(got.sum(0), batch / num_prototypes, rtol=0.75)
    # The defaults are epsilon 0.05 and 3 iterations.
    if epsilon == 0.05 and iterations == 3:
        np.testing.assert_array_equal(losses.sinkhorn(scores).numpy(), got)


def test_sinkhorn_converges_to_the_equal_partition(rng):
    scores = prototype_scores(rng, 16, 5)
    violations = [column_violation(losses.sinkhorn(scores, 0.1, n).numpy()) for n in (1, 3, 10, 30, 100)]
    assert all(a > b for a, b in zip(violations, violations[1:])), violations
    codes = losses.sinkhorn(scores, 0.1, 100).numpy()
    np.testing.assert_allclose(codes.sum(0), 16 / 5, rtol=1e-4)
    np.testing.assert_allclose(codes.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(codes, reference_sinkhorn(scores, 0.1, 100), rtol=1e-4, atol=1e-6)


def assert_valid_codes(codes, shape):
    codes = np.asarray(codes)
    assert codes.shape == shape and codes.dtype == np.float32
    assert np.isfinite(codes).all(), codes
    assert (codes >= 0).all() and (codes <= 1 + 1e-6).all(), codes
    np.testing.assert_allclose(codes.sum(1), 1.0, atol=1e-5)


@pytest.mark.parametrize("scale", [1e3, 1e10])
@pytest.mark.parametrize("epsilon", [0.05, 0.1])
@pytest.mark.parametrize("shape", [(8, 5), (5, 8)])
def test_sinkhorn_of_unnormalised_scores_matches_log_domain_reference(rng, scale, epsilon, shape):
    # scale 1e3, epsilon 0.05: exponents up to 2e4, far past float32's (and float64's) exp range.
    scores = (prototype_scores(rng, *shape) * np.float32(scale)).astype(np.float32)
    got = losses.sinkhorn(scores, epsilon, 3).numpy()
    assert_valid_codes(got, shape)
    np.testing.assert_allclose(got, reference_sinkhorn_log(scores, epsilon, 3), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("epsilon", [0.05, 0.1])
def test_sinkhorn_is_finite_for_extreme_scores(rng, epsilon):
    big = np.float32(3.4e38)
    # Scores of order 1e30: exponents ~2e31.
    huge = (prototype_scores(rng, 8, 5) * np.float32(1e30)).astype(np.float32)
    assert_valid_codes(losses.sinkhorn(huge, epsilon, 3).numpy(), (8, 5))
    # Rows at +-float32 max among ordinary ones.
    mixed = prototype_scores(rng, 6, 4)
    mixed[2, 1], mixed[4, 3] = big, -big
    got = losses.sinkhorn(mixed, epsilon, 3).numpy()
    assert_valid_codes(got, (6, 4))
    assert got[2].argmax() == 1  # by 3.4e38 / eps, this sample's prototype
    for scores in ([[big, -big], [-big, big]], [[big, -big], [0.0, 1.0], [1.0, 0.0]], [[big, big, -big]] * 3,
                   [[-big, -big, 0.5, 3.0e38]], [[-big, 0.0, big], [big, -big, -big], [1e-30, -1e-30, 0.0]]):
        scores = np.array(scores, np.float32)
        assert_valid_codes(losses.sinkhorn(scores, epsilon, 3).numpy(), scores.shape)
    # Both diagonals at the extremes: the exact codes are the identity.
    np.testing.assert_allclose(losses.sinkhorn(np.array([[big, -big], [-big, big]], np.float32), epsilon).numpy(),
                               np.eye(2), atol=1e-6)


@pytest.mark.parametrize("value", [0.7, -1.0, 1e30, 3.4e38, -3.4e38])
@pytest.mark.parametrize("shape", [(6, 4), (3, 9)])
def test_sinkhorn_of_equal_scores_is_uniform(value, shape):
    got = losses.sinkhorn(np.full(shape, value, np.float32), 0.05, 3).numpy()
    assert_valid_codes(got, shape)
    np.testing.assert_allclose(got, 1.0 / shape[1], rtol=1e-6)


def test_sinkhorn_of_one_row_or_one_prototype(rng):
    # One sample: each prototype's mass is that one entry, so the codes are uniform whatever the scores.
    for scores in (prototype_scores(rng, 1, 6), np.array([[5e3, -2e3, 0.0, 1e30]], np.float32)):
        got = losses.sinkhorn(scores, 0.05, 3).numpy()
        assert_valid_codes(got, scores.shape)
        np.testing.assert_allclose(got, 1.0 / scores.shape[1], rtol=1e-6)
    one = prototype_scores(rng, 1, 6)
    np.testing.assert_allclose(losses.sinkhorn(one, 0.1, 1).numpy(), reference_sinkhorn(one, 0.1, 1), rtol=1e-5)
    # One prototype: every sample's whole mass is on it.
    for scores in (prototype_scores(rng, 7, 1), np.array([[3.4e38], [-3.4e38], [0.0]], np.float32)):
        got = losses.sinkhorn(scores, 0.05, 3).numpy()
        assert_valid_codes(got, scores.shape)
        np.testing.assert_allclose(got, 1.0, rtol=1e-6)


def test_sinkhorn_has_no_gradient(rng):
    scores = tf.constant(prototype_scores(rng, 6, 4) * 3.0)
    weights = tf.constant(rng.normal(size=(6, 4)).astype(np.float32))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(scores)
        codes = losses.sinkhorn(scores, 0.05, 3)
        target = tf.reduce_sum(codes * weights)
        with_queue = tf.reduce_sum(losses.sinkhorn(scores, 0.1, 2, shared_rows=2, shared_weight=0.0) * weights)
    for value in (target, with_queue):
        grad = tape.gradient(value, scores)
        assert grad is None or not np.any(grad.numpy()), grad
    # A plain softmax in its place does have a gradient: the check can fail.
    with tf.GradientTape() as tape:
        tape.watch(scores)
        softmax = tf.reduce_sum(tf.nn.softmax(scores / 0.05) * weights)
    assert np.abs(tape.gradient(softmax, scores).numpy()).max() > 1e-3


@pytest.mark.parametrize("queue_len,batch", [(4, 6), (10, 3), (1, 1)])
def test_sinkhorn_shared_rows_on_one_device(rng, queue_len, batch):
    queue, scores = prototype_scores(rng, queue_len, 5), prototype_scores(rng, batch, 5)
    both = np.concatenate([queue, scores])
    plain = losses.sinkhorn(both, 0.05, 3).numpy()
    np.testing.assert_allclose(plain, reference_sinkhorn(both, 0.05, 3), rtol=1e-4, atol=1e-7)
    # One replica: nothing to share, the shared rows count once as ordinary rows do.
    for shared_rows in (queue_len, tf.constant(queue_len)):
        shared = losses.sinkhorn(both, 0.05, 3, shared_rows=shared_rows).numpy()
        np.testing.assert_allclose(shared, plain, rtol=1e-6, atol=1e-7)
    # Weight 0: the queue is out of the sums, the batch's codes are those of the batch alone.
    alone = losses.sinkhorn(scores, 0.05, 3).numpy()
    for weight in (0.0, tf.constant(0.0)):
        without = losses.sinkhorn(both, 0.05, 3, shared_rows=queue_len, shared_weight=weight).numpy()
        assert_valid_codes(without, both.shape)
        np.testing.assert_allclose(without[queue_len:], alone, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(without, reference_sinkhorn(both, 0.05, 3, [0.0] * queue_len + [1.0] * batch),
                                   rtol=1e-4, atol=1e-7)
    if batch > 1:  # with the queue in the sums the batch's codes differ: the check can fail
        assert np.abs(plain[queue_len:] - alone).max() > 1e-3


def sinkhorn_on_replicas(strategy, batch_scores, split, queue=None, shared_weight=1.0, epsilon=0.05, iterations=3):
    """Replica 0 gets batch rows [:split], replica 1 [split:], both the same queue rows first; returns
    each replica's codes (queue rows included)."""
    parts = [batch_scores[:split], batch_scores[split:]]
    local = strategy.experimental_distribute_values_from_function(
        lambda context: tf.constant(parts[context.replica_id_in_sync_group]))
    queue_len = 0 if queue is None else len(queue)

    @tf.function
    def step(scores):
        def replica_fn(scores):
            if queue is not None:
                scores = tf.concat([tf.constant(queue), scores], axis=0)
            return losses.sinkhorn(scores, epsilon, iterations, shared_rows=queue_len, shared_weight=shared_weight)

        return strategy.run(replica_fn, args=(scores,))

    return [codes.numpy() for codes in strategy.experimental_local_results(step(local))]


@pytest.mark.parametrize("split", [4, 5])  # even and uneven halves of the global batch of 8
def test_sinkhorn_on_two_replicas_matches_the_global_batch(rng, mirrored, split):
    assert mirrored.num_replicas_in_sync == 2
    batch, queue = prototype_scores(rng, 8, 5), prototype_scores(rng, 6, 5)
    r = len(queue)
    # No queue: the replicas' rows are the one-device codes of the whole batch.
    codes = sinkhorn_on_replicas(mirrored, batch, split)
    assert [len(c) for c in codes] == [split, 8 - split]
    want = losses.sinkhorn(batch, 0.05, 3).numpy()
    np.testing.assert_allclose(np.concatenate(codes), want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(want, reference_sinkhorn(batch, 0.05, 3), rtol=1e-4, atol=1e-7)
    # Teeth: each half's own Sinkhorn is different.
    halves = np.concatenate([losses.sinkhorn(batch[:split]).numpy(), losses.sinkhorn(batch[split:]).numpy()])
    assert np.abs(halves - want).max() > 1e-3
    # A queue on both replicas counts once: the codes of [queue; whole batch] on one device.
    codes = sinkhorn_on_replicas(mirrored, batch, split, queue=queue)
    assert [len(c) for c in codes] == [r + split, r + 8 - split]
    both = np.concatenate([queue, batch])
    want = losses.sinkhorn(both, 0.05, 3).numpy()
    np.testing.assert_allclose(np.concatenate([c[r:] for c in codes]), want[r:], rtol=1e-5, atol=1e-7)
    for c in codes:  # the queue rows too, identically on both replicas
        np.testing.assert_allclose(c[:r], want[:r], rtol=1e-5, atol=1e-7)
    # Teeth: the queue counted once per replica (weight 2) gives other codes.
    twice = reference_sinkhorn(both, 0.05, 3, [2.0] * r + [1.0] * 8)
    assert np.abs(twice[r:] - want[r:]).max() > 1e-3
    # Queue weight 0: the codes of the whole batch alone.
    codes = sinkhorn_on_replicas(mirrored, batch, split, queue=queue, shared_weight=0.0, epsilon=0.1, iterations=2)
    np.testing.assert_allclose(np.concatenate([c[r:] for c in codes]), losses.sinkhorn(batch, 0.1, 2).numpy(),
                               rtol=1e-5, atol=1e-7)


def test_sinkhorn_on_two_replicas_with_unnormalised_scores(rng, mirrored):
    # The maximum is all-reduced: a replica whose scores are 1e3 above the other's still matches one device.
    batch = prototype_scores(rng, 8, 5) * np.float32(30.0)
    batch[4:] += np.float32(1e3)
    codes = np.concatenate(sinkhorn_on_replicas(mirrored, batch, 4))
    want = losses.sinkhorn(batch, 0.05, 3).numpy()
    assert_valid_codes(codes, (8, 5))
    np.testing.assert_allclose(codes, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(want, reference_sinkhorn_log(batch, 0.05, 3), rtol=1e-4, atol=1e-5)


def reference_swav(crop_scores, num_large_crops, temperature, epsilon, iterations, queue_scores=None,
                   queue_weight=1.0):
    """Per-sample loss and codes: mean over large crops i of the mean over the other crops v of
    -q_i . log softmax(s_v / T), q_i the Sinkhorn codes of crop i (its queue rows first, then dropped)."""
    crops = [np.asarray(s, np.float64) for s in crop_scores]
    batch = len(crops[0])
    codes = []
    for i in range(num_large_crops):
        if queue_scores is None:
            codes.append(reference_sinkhorn(crops[i], epsilon, iterations))
        else:
            r = len(queue_scores[i])
            weights = [queue_weight] * r + [1.0] * batch
            both = np.concatenate([np.asarray(queue_scores[i], np.float64), crops[i]])
            codes.append(reference_sinkhorn(both, epsilon, iterations, weights)[r:])
    loss = np.zeros(batch)
    for b in range(batch):
        for i in range(num_large_crops):
            others = [v for v in range(len(crops)) if v != i]
            terms = [-(codes[i][b] @ log_softmax64(crops[v][b] / temperature)) for v in others]
            loss[b] += sum(terms) / len(others) / num_large_crops
    return loss, codes


def reference_swav_gradient(crop_scores, codes, temperature, row_weights):
    """d sum_b w_b loss_b / d s_v with the codes held constant: over large crops i != v,
    w_b (softmax(s_vb / T) sum_k q_ibk - q_ib) / T / (num_large_crops * (num_crops - 1))."""
    crops = [np.asarray(s, np.float64) for s in crop_scores]
    num_large, num_crops = len(codes), len(crops)
    grads = []
    for v in range(num_crops):
        grad = np.zeros_like(crops[v])
        for b in range(len(crops[v])):
            p = np.exp(log_softmax64(crops[v][b] / temperature))
            for i in range(num_large):
                if i != v:
                    q = codes[i][b]
                    grad[b] += row_weights[b] * (p * q.sum() - q) / temperature / (num_large * (num_crops - 1))
        grads.append(grad)
    return grads


SWAV_CASES = {  # num_crops, num_large_crops, queue length, queue weight
    "two_large": (2, 2, 0, None),
    "two_large_three_small": (5, 2, 0, None),
    "one_large_two_small": (3, 1, 0, None),
    "queue": (4, 2, 7, 1.0),
    "queue_weight_0": (4, 2, 7, 0.0),
    "queue_weight_tensor_0": (2, 2, 3, "tensor0"),
}


@pytest.mark.parametrize("case", list(SWAV_CASES))
@pytest.mark.parametrize("temperature,epsilon,iterations", [(0.1, 0.05, 3), (0.25, 0.1, 1)])
def test_swav_matches_reference(rng, case, temperature, epsilon, iterations):
    num_crops, num_large, queue_len, queue_weight = SWAV_CASES[case]
    batch, num_prototypes = 6, 5
    crops = [prototype_scores(rng, batch, num_prototypes) for _ in range(num_crops)]
    queue = None if not queue_len else [prototype_scores(rng, queue_len, num_prototypes) for _ in range(num_large)]
    weight = tf.constant(0.0) if queue_weight == "tensor0" else (1.0 if queue_weight is None else queue_weight)
    kwargs = dict(num_large_crops=num_large, temperature=temperature, epsilon=epsilon,
                  sinkhorn_iterations=iterations, queue_scores=queue, queue_weight=weight)
    want_loss, want_codes = reference_swav(crops, num_large, temperature, epsilon, iterations, queue,
                                           0.0 if queue_weight == "tensor0" else weight)
    loss = losses.swav(crops, **kwargs)
    assert loss.dtype == tf.float32 and loss.shape == (batch,)
    np.testing.assert_allclose(loss.numpy(), want_loss, rtol=1e-4, atol=1e-5)
    loss_again, codes = losses.swav(crops, return_codes=True, **kwargs)
    np.testing.assert_allclose(loss_again.numpy(), loss.numpy(), rtol=1e-6)
    assert len(codes) == num_large
    for got, want in zip(codes, want_codes):
        assert got.shape == (batch, num_prototypes) and got.dtype == tf.float32
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-7)
    if queue_len and queue_weight != 1.0:  # the queue left out: the codes of the batch alone
        for got, crop in zip(codes, crops):
            np.testing.assert_allclose(got.numpy(), losses.sinkhorn(crop, epsilon, iterations).numpy(), rtol=1e-5)
    if queue_len and queue_weight == 1.0:  # teeth: the queue does change the codes
        assert np.abs(codes[0].numpy() - losses.sinkhorn(crops[0], epsilon, iterations).numpy()).max() > 1e-3


@pytest.mark.parametrize("case", ["two_large", "two_large_three_small", "one_large_two_small", "queue"])
def test_swav_gradient_flows_only_through_the_predictions(rng, case):
    num_crops, num_large, queue_len, _ = SWAV_CASES[case]
    batch, num_prototypes, temperature = 6, 5, 0.1
    crops = [tf.constant(prototype_scores(rng, batch, num_prototypes) * 2.0) for _ in range(num_crops)]
    queue = None if not queue_len else [tf.constant(prototype_scores(rng, queue_len, num_prototypes))
                                        for _ in range(num_large)]
    row_weights = rng.uniform(0.5, 2.0, batch)

    @tf.function
    def loss_and_gradients(crops, queue):
        sources = crops + (queue or [])
        with tf.GradientTape() as tape:
            tape.watch(sources)
            loss, codes = losses.swav(crops, num_large, temperature, 0.05, 3, queue_scores=queue, return_codes=True)
            total = tf.reduce_sum(loss * row_weights.astype(np.float32))
        return loss, codes, tape.gradient(total, sources, unconnected_gradients=tf.UnconnectedGradients.ZERO)

    loss, codes, all_grads = loss_and_gradients(crops, queue)
    grads, queue_grads = all_grads[:num_crops], all_grads[num_crops:]
    crops64 = [c.numpy() for c in crops]
    want_loss, want_codes = reference_swav(crops64, num_large, temperature, 0.05, 3,
                                           None if queue is None else [q.numpy() for q in queue])
    np.testing.assert_allclose(loss.numpy(), want_loss, rtol=1e-4, atol=1e-5)
    for got, want in zip(codes, want_codes):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-7)
    want_grads = reference_swav_gradient(crops64, want_codes, temperature, row_weights)
    for v, (got, want) in enumerate(zip(grads, want_grads)):
        if num_large == 1 and v == 0:  # the only large crop predicts nothing: its scores get no gradient
            np.testing.assert_array_equal(got.numpy(), 0.0)
        else:
            assert np.abs(want).max() > 1e-2
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-3, atol=1e-5)
    for grad in queue_grads:  # the queue only enters the (detached) codes
        np.testing.assert_array_equal(grad.numpy(), 0.0)
    # Teeth: were the codes differentiated too, the large crops' gradients would differ.
    with tf.GradientTape() as tape:
        tape.watch(crops)
        probs = [tf.nn.softmax(c / 0.05) for c in crops[:num_large]]  # a differentiable stand-in for the codes
        logp = [tf.nn.log_softmax(c / temperature) for c in crops]
        other = tf.add_n([-tf.reduce_sum(probs[i] * logp[v], 1) / (num_crops - 1)
                          for i in range(num_large) for v in range(num_crops) if v != i]) / num_large
        other = tf.reduce_sum(other * row_weights.astype(np.float32))
    assert np.abs(tape.gradient(other, crops[0]).numpy() - grads[0].numpy()).max() > 1e-3


def test_swav_runs_in_float32_for_bfloat16_scores(rng):
    crops = [tf.cast(prototype_scores(rng, 6, 5), tf.bfloat16) for _ in range(3)]
    queue = [tf.cast(prototype_scores(rng, 4, 5), tf.bfloat16) for _ in range(2)]
    loss, codes = losses.swav(crops, 2, queue_scores=queue, return_codes=True)
    assert loss.dtype == tf.float32 and all(c.dtype == tf.float32 for c in codes)
    exact = [tf.cast(c, tf.float32).numpy() for c in crops]
    exact_queue = [tf.cast(q, tf.float32).numpy() for q in queue]
    want, _ = reference_swav(exact, 2, 0.1, 0.05, 3, exact_queue)
    np.testing.assert_allclose(loss.numpy(), want, rtol=1e-4, atol=1e-5)
    assert losses.sinkhorn(crops[0]).dtype == tf.float32


@pytest.mark.parametrize("num_crops,num_large_crops", [(2, 0), (2, 3), (3, -1), (3, 4), (1, 1)])
def test_swav_rejects_bad_num_large_crops(rng, num_crops, num_large_crops):
    crops = [prototype_scores(rng, 4, 3) for _ in range(num_crops)]
    with pytest.raises(keras_pcl.InvalidInputError):
        losses.swav(crops, num_large_crops=num_large_crops)


# --- SupCon (Khosla et al., 2020) and PaCo (Cui et al., 2021) ---------------------------------


def reference_supcon(z1, z2, labels, t):
    """Anchor i of [z1; z2] (normalised here) against the other 2B - 1 rows; minus the mean over its
    positives (the other rows with its label) of log softmax_{a != i}(z_i . z_a / T)."""
    batch = len(z1)
    z = [unit64(v) for v in list(z1) + list(z2)]
    rows_labels = list(labels) + list(labels)
    out = []
    for i in range(2 * batch):
        others = [j for j in range(2 * batch) if j != i]
        logits = np.array([z[i] @ z[j] / t for j in others])
        positives = [k for k, j in enumerate(others) if rows_labels[j] == rows_labels[i]]
        out.append(-sum(log_softmax_at(logits, k) for k in positives) / len(positives))
    return np.array(out)


def unnormalised(rng, batch, dim):
    """Gaussian rows each at its own scale in [0.1, 10]: the losses must normalise them per row."""
    return (rng.normal(size=(batch, dim)) * rng.uniform(0.1, 10, (batch, 1))).astype(np.float32)


@pytest.mark.parametrize("batch,dim", [(1, 4), (3, 5), (8, 8), (16, 3)])
@pytest.mark.parametrize("temperature", [0.05, 0.2, 1.0])
@pytest.mark.parametrize("label_kind", ["shared", "distinct"])
def test_supcon_matches_reference(rng, batch, dim, temperature, label_kind):
    z1, z2 = unnormalised(rng, batch, dim), unnormalised(rng, batch, dim)
    if label_kind == "shared":  # few classes: most anchors have several positives besides the other view
        labels = rng.integers(0, max(1, batch // 3), batch)
    else:
        labels = rng.permutation(1000)[:batch] - 500  # distinct, arbitrary (also negative) ids
    got = losses.supcon(z1, z2, labels, temperature)
    assert got.shape == (2 * batch,) and got.dtype == tf.float32
    want = reference_supcon(z1, z2, labels, temperature)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)
    if label_kind == "distinct":  # one positive per anchor, its other view: SimCLR's NT-Xent
        np.testing.assert_allclose(got.numpy(), losses.nt_xent(z1, z2, temperature).numpy(), rtol=1e-6,
                                   atol=1e-6)
    elif batch >= 8:  # teeth: the shared labels make it differ from NT-Xent
        assert np.abs(got.numpy() - reference_nt_xent(z1, z2, temperature)).max() > 1e-2


def test_supcon_with_labels_as_column_and_tensor(rng):
    z1, z2 = unnormalised(rng, 6, 4), unnormalised(rng, 6, 4)
    labels = np.array([2, 0, 2, 1, 0, 2])
    want = reference_supcon(z1, z2, labels, 0.1)
    for form in (labels[:, None], tf.constant(labels, tf.int64), labels.astype(np.int32)):
        np.testing.assert_allclose(losses.supcon(z1, z2, form, 0.1).numpy(), want, rtol=1e-5, atol=1e-5)


def test_supcon_anchor_of_a_label_seen_once_has_its_other_view_as_positive(rng):
    batch = 7
    z1, z2 = unnormalised(rng, batch, 6), unnormalised(rng, batch, 6)
    labels = np.array([0, 0, 1, 0, 1, 9, 1])  # label 9 only at image 5
    got = losses.supcon(z1, z2, labels, 0.2).numpy()
    np.testing.assert_allclose(got, reference_supcon(z1, z2, labels, 0.2), rtol=1e-5, atol=1e-5)
    assert np.isfinite(got).all() and (got > 0).all()
    # Its two rows (5 and B + 5) have exactly one positive, the other view: NT-Xent's rows.
    simclr = reference_nt_xent(z1, z2, 0.2)
    np.testing.assert_allclose(got[[5, batch + 5]], simclr[[5, batch + 5]], rtol=1e-5, atol=1e-5)
    # The others have more positives, so their loss is not NT-Xent's.
    assert np.abs(np.delete(got - simclr, [5, batch + 5])).min() > 1e-4
    # Every row the same direction: each anchor's softmax is uniform over the other 2B - 1 rows, so every
    # positive's log-probability, and their mean, is -log(2B - 1), however many positives an anchor has.
    same = np.repeat(rng.normal(size=(1, 6)).astype(np.float32), batch, axis=0)
    np.testing.assert_allclose(losses.supcon(same, same * 3, labels, 0.2).numpy(), np.log(2 * batch - 1),
                               rtol=1e-5)


@pytest.mark.parametrize("scale", [1e-3, 1e4])
def test_supcon_normalises_its_inputs(rng, scale):
    z1, z2 = normalized(rng, 5, 8), normalized(rng, 5, 8)
    labels = np.array([1, 1, 0, 1, 0])
    unit = losses.supcon(z1, z2, labels, 0.1).numpy()
    s1 = (scale * rng.uniform(0.5, 2.0, (5, 1))).astype(np.float32)
    s2 = (scale * rng.uniform(0.5, 2.0, (5, 1))).astype(np.float32)
    got = losses.supcon(z1 * s1, z2 * s2, labels, 0.1).numpy()
    np.testing.assert_allclose(got, unit, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, reference_supcon(z1, z2, labels, 0.1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("replicas", [2, 4])
def test_supcon_split_batch_reproduces_the_full_batch(rng, replicas):
    batch, local, temperature = 8, 8 // replicas, 0.2
    z1, z2 = unnormalised(rng, batch, 5), unnormalised(rng, batch, 5)
    labels = np.array([0, 1, 0, 2, 1, 0, 3, 1])  # positives across the halves, and one label seen once
    full = losses.supcon(z1, z2, labels, temperature).numpy()
    np.testing.assert_allclose(full, reference_supcon(z1, z2, labels, temperature), rtol=1e-5, atol=1e-5)
    parts, order = [], []
    for r in range(replicas):
        rows = slice(r * local, (r + 1) * local)
        offset = tf.constant(r * local, tf.int32) if r % 2 else r * local  # int or tensor offset
        got = losses.supcon(z1[rows], z2[rows], labels[rows], temperature, all_z1=z1, all_z2=z2,
                            all_labels=labels, offset=offset)
        assert got.shape == (2 * local,)
        parts.append(got.numpy())
        order.append(np.r_[r * local:(r + 1) * local, batch + r * local:batch + (r + 1) * local])
    np.testing.assert_allclose(np.concatenate(parts), full[np.concatenate(order)], rtol=1e-5, atol=1e-5)
    # Teeth: each part on its own (no global batch) is a different loss.
    alone = losses.supcon(z1[:local], z2[:local], labels[:local], temperature).numpy()
    assert np.abs(alone - parts[0]).max() > 1e-2


def reference_paco(features, labels, centre_logits, class_counts, batch, alpha, beta, gamma, t, offset=0,
                   self_offset=None):
    """The official PaCoLoss forward (supt = 1, T / base_T = 1) as float64 loops, per anchor.

    Anchor i is row offset + i of features; its own column is self_offset + i (offset unless told: the
    other value exists only to show that the self column matters)."""
    f = np.asarray(features, np.float64)
    labels = np.asarray(labels).reshape(-1)
    sup = np.asarray(centre_logits, np.float64)
    counts = np.asarray(class_counts, np.float64)
    n, num_classes = len(f), sup.shape[1]
    log_prior = [np.log(counts[c] / counts.sum() + 1e-9) for c in range(num_classes)]
    self_offset = offset if self_offset is None else self_offset
    out = []
    for i in range(batch):
        a, own = offset + i, self_offset + i
        logits = [sup[i, c] + log_prior[c] for c in range(num_classes)]
        logits += [sum(f[a, k] * f[j, k] for k in range(f.shape[1])) / t for j in range(n)]
        logits = np.array(logits)
        logits = logits - logits.max()
        not_self = [0.0 if j == own else 1.0 for j in range(n)]
        positive = [beta if c == labels[a] else 0.0 for c in range(num_classes)]
        positive += [alpha * not_self[j] if labels[j] == labels[a] else 0.0 for j in range(n)]
        weight = [1.0] * num_classes + [gamma * not_self[j] for j in range(n)]
        log_norm = np.log(sum(np.exp(logits[j]) * weight[j] for j in range(len(logits))) + 1e-12)
        out.append(-sum(positive[j] * (logits[j] - log_norm) for j in range(len(logits))) / sum(positive))
    return np.array(out)


def paco_inputs(rng, batch, queue_len, num_classes, dim=8, replicas=1, queue_unlabelled=False):
    """Unit [q; k; queue] rows (k a noisy copy of q, as MoCo's keys are), labels with repeats drawn from
    at most num_classes - 1 of the classes, queue labels mixing batch labels, others and (optionally) -1;
    centre logits [replicas * batch, C] and positive class counts."""
    rows = replicas * batch
    q = normalized(rng, rows, dim)
    k = q + 0.3 * rng.normal(size=q.shape).astype(np.float32)
    k /= np.linalg.norm(k, axis=1, keepdims=True)
    queue = normalized(rng, queue_len, dim)
    batch_labels = rng.integers(0, max(1, num_classes - 1), rows)
    queue_labels = rng.integers(0, num_classes, queue_len)
    if queue_len:
        queue_labels[: min(queue_len, rows)] = batch_labels[: min(queue_len, rows)]  # seen in the batch
        if queue_unlabelled:
            queue_labels[::3] = -1
    features = np.concatenate([q, k, queue]).astype(np.float32)
    labels = np.concatenate([batch_labels, batch_labels, queue_labels])
    centre = (rng.normal(size=(rows, num_classes)) * 3).astype(np.float32)
    counts = rng.integers(1, 500, num_classes).astype(np.float32)
    return features, labels, centre, counts


PACO_WEIGHTS = [(0.05, 1.0, 1.0), (0.02, 1.0, 1.0), (1.0, 0.5, 0.0), (0.3, 2.0, 0.5)]


@pytest.mark.parametrize("batch,queue_len,num_classes", [(1, 0, 3), (4, 0, 5), (5, 7, 4), (8, 16, 10)])
@pytest.mark.parametrize("alpha,beta,gamma", PACO_WEIGHTS)
@pytest.mark.parametrize("temperature", [0.05, 0.2])
def test_paco_matches_reference(rng, batch, queue_len, num_classes, alpha, beta, gamma, temperature):
    features, labels, centre, counts = paco_inputs(rng, batch, queue_len, num_classes,
                                                   queue_unlabelled=queue_len > 10)
    got = losses.paco(features, labels, centre, counts, batch, alpha=alpha, beta=beta, gamma=gamma,
                      temperature=temperature)
    assert got.shape == (batch,) and got.dtype == tf.float32
    want = reference_paco(features, labels, centre, counts, batch, alpha, beta, gamma, temperature)
    assert np.isfinite(want).all()
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
    # The official loss is the mean over the anchors.
    np.testing.assert_allclose(tf.reduce_mean(got).numpy(), want.mean(), rtol=1e-5)


def test_paco_defaults_are_the_official_cifar_setting(rng):
    features, labels, centre, counts = paco_inputs(rng, 6, 9, 5)
    got = losses.paco(features, labels, centre, counts, 6).numpy()
    np.testing.assert_allclose(got, reference_paco(features, labels, centre, counts, 6, 0.05, 1.0, 1.0, 0.2),
                               rtol=1e-5, atol=1e-6)


def test_paco_queue_labels_minus_one_are_never_positive(rng):
    batch, queue_len, num_classes = 4, 6, 3
    features, labels, centre, counts = paco_inputs(rng, batch, queue_len, num_classes)
    labels[2 * batch:] = -1
    # Put the unlabelled queue rows right on the anchors: were they positives, the loss would drop.
    features[2 * batch:2 * batch + batch] = features[:batch]
    got = losses.paco(features, labels, centre, counts, batch, alpha=1.0).numpy()
    want = reference_paco(features, labels, centre, counts, batch, 1.0, 1.0, 1.0, 0.2)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # The same queue rows labelled as their anchors: a different (lower) loss, so the -1 did matter.
    relabelled = labels.copy()
    relabelled[2 * batch:3 * batch] = labels[:batch]
    positive = losses.paco(features, relabelled, centre, counts, batch, alpha=1.0).numpy()
    np.testing.assert_allclose(positive, reference_paco(features, relabelled, centre, counts, batch, 1.0, 1.0, 1.0,
                                                        0.2), rtol=1e-5, atol=1e-6)
    assert (positive < got - 1e-3).all()


def test_paco_with_a_class_of_zero_count(rng):
    batch, num_classes = 5, 4
    features, labels, centre, counts = paco_inputs(rng, batch, 6, num_classes)
    counts[1] = 0.0  # prior 0: its centre logits get log(1e-9)
    labels[0] = labels[batch] = 1  # an anchor (and its key) of that class
    got = losses.paco(features, labels, centre, counts.astype(np.int64), batch).numpy()
    want = reference_paco(features, labels, centre, counts, batch, 0.05, 1.0, 1.0, 0.2)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # The prior does enter: with a uniform prior the loss is different.
    uniform = losses.paco(features, labels, centre, np.ones(num_classes, np.float32), batch).numpy()
    assert np.abs(uniform - got).max() > 1e-2


@pytest.mark.parametrize("alpha,beta,gamma", PACO_WEIGHTS)
def test_paco_is_finite_and_exact_for_extreme_logits(rng, alpha, beta, gamma):
    batch, queue_len, num_classes = 6, 10, 5
    features, labels, centre, counts = paco_inputs(rng, batch, queue_len, num_classes)
    centre = np.where(rng.uniform(size=centre.shape) < 0.5, 50.0, -50.0).astype(np.float32)
    centre[0] = -50.0  # an anchor whose every centre logit is far below its contrast logits
    centre[1] = 50.0
    counts[2] = 0.0
    # T = 0.01: contrast logits up to 100 (the self column), centre columns down to -50 - 21 - 100.
    got = losses.paco(features, labels, centre, counts, batch, alpha=alpha, beta=beta, gamma=gamma,
                      temperature=0.01).numpy()
    want = reference_paco(features, labels, centre, counts, batch, alpha, beta, gamma, 0.01)
    assert np.isfinite(got).all() and np.isfinite(want).all()
    assert want.max() > 10  # the logits really are large
    # float32 dot products carry ~1e-7 absolute error, times 1 / T = 100.
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("queue_len", [0, 5])
def test_paco_anchor_offset_reproduces_the_global_batch_rows(rng, queue_len):
    local, replicas, num_classes, temperature = 3, 2, 4, 0.1
    # [Q_all; K_all; queue] of a global batch of 2 replicas of 3 anchors each.
    features, labels, centre, counts = paco_inputs(rng, local, queue_len, num_classes, replicas=replicas)
    full = losses.paco(features, labels, centre, counts, replicas * local, alpha=0.3, gamma=0.5,
                       temperature=temperature).numpy()
    np.testing.assert_allclose(full, reference_paco(features, labels, centre, counts, replicas * local, 0.3, 1.0, 0.5,
                                                    temperature), rtol=1e-5, atol=1e-6)
    parts = []
    for r in range(replicas):
        start = r * local
        for offset in (start, tf.constant(start, tf.int32)):  # a replica id times B is a tensor in a strategy
            got = losses.paco(features, labels, centre[start:start + local], counts, local, alpha=0.3, gamma=0.5,
                              temperature=temperature, anchor_offset=offset).numpy()
            assert got.shape == (local,)
            want = reference_paco(features, labels, centre[start:start + local], counts, local, 0.3, 1.0, 0.5,
                                  temperature, offset=start)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        parts.append(got)
        if r:  # teeth: masking column i instead of the anchor's own column o + i gives other values
            wrong = reference_paco(features, labels, centre[start:start + local], counts, local, 0.3, 1.0, 0.5,
                                   temperature, offset=start, self_offset=0)
            assert np.abs(wrong - want).max() > 1e-2
    np.testing.assert_allclose(np.concatenate(parts), full, rtol=1e-5, atol=1e-6)


def reference_paco_centre_gradient(features, labels, centre_logits, class_counts, batch, alpha, beta, gamma, t,
                                   row_weights):
    """d sum_i w_i loss_i / d c_ik = w_i (exp(l_ik - m_i) / (sum_j norm_ij exp(l_ij - m_i) + 1e-12)
    - pos_ik / sum_j pos_ij): the row max m_i is a constant, the centre columns' normaliser weight 1."""
    f = np.asarray(features, np.float64)
    sup = np.asarray(centre_logits, np.float64)
    counts = np.asarray(class_counts, np.float64)
    num_classes, n = sup.shape[1], len(f)
    grad = np.zeros_like(sup)
    for i in range(batch):
        centre = sup[i] + np.log(counts / counts.sum() + 1e-9)
        contrast = f[i] @ f.T / t
        m = max(centre.max(), contrast.max())
        not_self = np.array([0.0 if j == i else 1.0 for j in range(n)])
        positive_centre = np.array([beta if c == labels[i] else 0.0 for c in range(num_classes)])
        positive_contrast = alpha * not_self * (labels == labels[i])
        total_positive = positive_centre.sum() + positive_contrast.sum()
        norm = np.exp(centre - m).sum() + (gamma * not_self * np.exp(contrast - m)).sum() + 1e-12
        for c in range(num_classes):
            grad[i, c] = row_weights[i] * (np.exp(centre[c] - m) / norm - positive_centre[c] / total_positive)
    return grad


@pytest.mark.parametrize("alpha,beta,gamma", PACO_WEIGHTS)
def test_paco_gradient_wrt_centre_logits(rng, alpha, beta, gamma):
    batch, queue_len, num_classes, temperature = 4, 6, 5, 0.2
    features, labels, centre, counts = paco_inputs(rng, batch, queue_len, num_classes)
    centre = centre * 2  # some centre logits above the contrast ones: the row max is then a centre column
    row_weights = rng.uniform(0.5, 2.0, batch)
    want = reference_paco_centre_gradient(features, labels, centre, counts, batch, alpha, beta, gamma, temperature,
                                          row_weights)
    # The analytic gradient against central finite differences of the float64 reference.
    def weighted(c):
        return row_weights @ reference_paco(features, labels, c, counts, batch, alpha, beta, gamma, temperature)

    step, numeric = 1e-6, np.zeros_like(want)
    base = centre.astype(np.float64)
    for i in range(batch):
        for c in range(num_classes):
            up, down = base.copy(), base.copy()
            up[i, c] += step
            down[i, c] -= step
            numeric[i, c] = (weighted(up) - weighted(down)) / (2 * step)
    np.testing.assert_allclose(numeric, want, rtol=1e-5, atol=1e-7)
    assert np.abs(want).max() > 1e-2  # a non-trivial gradient
    # With the max detached or not, the gradient is the same (the loss is invariant to a shift of a row, up to
    # the 1e-12), so this checks the whole backward pass, not the detach itself.
    centre_tensor = tf.constant(centre)
    with tf.GradientTape() as tape:
        tape.watch(centre_tensor)
        loss = losses.paco(features, labels, centre_tensor, counts, batch, alpha=alpha, beta=beta, gamma=gamma,
                           temperature=temperature)
        total = tf.reduce_sum(loss * row_weights.astype(np.float32))
    got = tape.gradient(total, centre_tensor).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-5)


def test_supcon_and_paco_run_in_float32_for_bfloat16_inputs(rng):
    z1 = tf.cast(unnormalised(rng, 6, 8), tf.bfloat16)
    z2 = tf.cast(unnormalised(rng, 6, 8), tf.bfloat16)
    labels = np.array([0, 1, 0, 1, 2, 0])
    got = losses.supcon(z1, z2, labels, 0.1)
    assert got.dtype == tf.float32
    exact1, exact2 = tf.cast(z1, tf.float32).numpy(), tf.cast(z2, tf.float32).numpy()
    np.testing.assert_allclose(got.numpy(), reference_supcon(exact1, exact2, labels, 0.1), rtol=1e-5, atol=1e-5)
    split = losses.supcon(z1[:3], z2[:3], labels[:3], 0.1, all_z1=z1, all_z2=z2, all_labels=labels, offset=0)
    assert split.dtype == tf.float32

    features, plabels, centre, counts = paco_inputs(rng, 4, 6, 3)
    features16, centre16 = tf.cast(features, tf.bfloat16), tf.cast(centre, tf.bfloat16)
    got = losses.paco(features16, plabels, centre16, counts, 4)
    assert got.dtype == tf.float32
    want = reference_paco(tf.cast(features16, tf.float32).numpy(), plabels, tf.cast(centre16, tf.float32).numpy(),
                          counts, 4, 0.05, 1.0, 1.0, 0.2)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)
