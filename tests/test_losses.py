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
