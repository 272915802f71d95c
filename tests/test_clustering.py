"""k-means and the concentration phi against scikit-learn and NumPy references."""

import numpy as np
import pytest
import tensorflow as tf
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs
from sklearn.metrics import adjusted_rand_score

from keras_pcl import clustering


@pytest.fixture(scope="module")
def blobs():
    x, y = make_blobs(3000, n_features=16, centers=8, cluster_std=0.6, random_state=0)
    return x.astype(np.float32), y


def objective(x, centroids, assignments):
    return float(((x - centroids[assignments]) ** 2).sum())


def test_kmeans_matches_sklearn_on_blobs(blobs):
    x, y = blobs
    centroids, assignments, info = clustering.kmeans(x, 8, init="k-means++", num_restarts=3, return_info=True)
    obj = info["objective"]
    reference = KMeans(8, n_init=10, random_state=0).fit(x)
    assert adjusted_rand_score(reference.labels_, assignments) >= 0.99
    assert adjusted_rand_score(y, assignments) >= 0.99
    assert obj <= reference.inertia_ * 1.01
    assert centroids.shape == (8, 16) and assignments.shape == (3000,)
    assert obj == pytest.approx(objective(x, centroids, assignments), rel=1e-4)


def reference_lloyd(x, centroids, num_iters):
    """Plain NumPy Lloyd: assign to the nearest centroid, then move centroids to means."""
    assignments = ((x[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    for _ in range(num_iters):
        centroids = np.stack([x[assignments == k].mean(0) for k in range(len(centroids))])
        assignments = ((x[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    return centroids, assignments


@pytest.mark.parametrize("tile_size", [64, 4096])
def test_fixed_iterations_match_numpy_lloyd(rng, tile_size):
    x = rng.normal(size=(500, 6)).astype(np.float32)
    init = x[rng.choice(500, 5, replace=False)]
    want_c, want_a = reference_lloyd(x.astype(np.float64), init.astype(np.float64), 4)
    got_c, got_a, info = clustering.kmeans(
        x, 5, num_iters=4, tol=0.0, init=init, tile_size=tile_size, matmul_dtype="float32", return_info=True)
    assert info["iterations"] == 4
    assert (got_a == want_a).mean() >= 0.998  # float32 ties may differ
    np.testing.assert_allclose(got_c, want_c, atol=1e-4)


def reference_kmeans_plus_plus(x, num_clusters, seed, numpy_hash):
    """Greedy k-means++ in float64 NumPy with the same hashed draws: the first centre is point
    floor(u * N); at step i, candidate j maximises log(d_n) + Gumbel(u[i][j, n]) with
    u[i] = hash(trials * N, 7919 seed + i); the candidate that lowers the summed distances most is kept."""
    def uniform(size, s):
        return (numpy_hash(size, s) >> np.uint64(8)).astype(np.float64) / 2**24

    trials, n = 2 + int(np.log(num_clusters)), len(x)
    centres = [x[min(int(uniform(1, seed)[0] * n), n - 1)]]
    nearest_sq = ((x - centres[0]) ** 2).sum(1)
    for i in range(1, num_clusters):
        u = uniform(trials * n, seed * 7919 + i).reshape(trials, n) + 2.0 ** -25
        scores = np.log(np.maximum(nearest_sq, 1e-30))[None] - np.log(-np.log(u))
        updated = [np.minimum(nearest_sq, ((x - x[p]) ** 2).sum(1)) for p in scores.argmax(1)]
        best = int(np.argmin([u.sum() for u in updated]))
        centres.append(x[scores.argmax(1)[best]])
        nearest_sq = updated[best]
    return np.stack(centres)


@pytest.mark.parametrize("seed", [0, 5])
def test_kmeans_plus_plus_matches_numpy_and_is_identical_under_xla(rng, numpy_hash, seed):
    x = rng.normal(size=(300, 4)).astype(np.float32)
    want = reference_kmeans_plus_plus(x.astype(np.float64), 7, seed, numpy_hash)
    for jit in (False, True):
        got = tf.function(lambda p: clustering._kmeans_plus_plus(p, 7, seed), jit_compile=jit)(x).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-6)


def test_early_stop_converges_to_a_fixed_point(blobs):
    x, _ = blobs
    centroids, assignments, info = clustering.kmeans(x, 8, num_iters=100, tol=0.0, init="k-means++",
                                                    return_info=True)
    assert 1 <= info["iterations"] < 100  # stopped once nothing changed
    means = np.stack([x[assignments == k].mean(0) for k in range(8)])
    np.testing.assert_allclose(centroids, means, atol=1e-4)


def test_empty_clusters_are_refilled_by_splitting(rng):
    x = rng.normal(size=(400, 4)).astype(np.float32)
    # Two centroids far from all points start empty.
    init = np.concatenate([x[:4], np.full((2, 4), 50.0, np.float32)])
    centroids, assignments = clustering.kmeans(x, 6, num_iters=10, tol=0.0, init=init,
                                               matmul_dtype="float32")
    assert np.bincount(assignments, minlength=6).min() > 0
    assert np.abs(centroids).max() < 10


def test_restarts_keep_the_best_objective(rng):
    x = rng.normal(size=(600, 5)).astype(np.float32)
    single = [clustering.kmeans(x, 12, seed=3, num_restarts=1, return_info=True)[2]["objective"]]
    best = clustering.kmeans(x, 12, seed=3, num_restarts=4, return_info=True)[2]["objective"]
    assert best <= single[0] + 1e-3


def test_subsampled_training_assigns_every_point(rng):
    x = rng.normal(size=(2000, 4)).astype(np.float32)
    centroids, assignments = clustering.kmeans(x, 10, max_points_per_centroid=50, tol=0.0)
    nearest = ((x[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    assert (assignments == nearest).mean() > 0.99


def test_bfloat16_distances_stay_close_to_float32(rng):
    """bf16 scores flip a few near-ties per step; trajectories then drift apart,
    but the objective (always computed in float32) stays within 0.5%."""
    x = rng.normal(size=(3000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    init = x[:50]

    def run(num_iters, dtype):
        return clustering.kmeans(x, 50, tol=0.0, num_iters=num_iters, init=init,
                                 matmul_dtype=dtype, return_info=True)

    assert (run(1, "float32")[1] == run(1, "bfloat16")[1]).mean() > 0.95
    o32, o16 = run(20, "float32")[2]["objective"], run(20, "bfloat16")[2]["objective"]
    assert abs(o16 - o32) / o32 < 0.005


def test_xla_path_matches_graph_path(rng):
    x = rng.normal(size=(700, 8)).astype(np.float32)
    init = x[:7]
    graph = clustering.kmeans(x, 7, tol=0.0, init=init, jit_compile=False, matmul_dtype="float32")
    xla = clustering.kmeans(x, 7, tol=0.0, init=init, jit_compile=True, matmul_dtype="float32")
    assert (graph[1] == xla[1]).mean() > 0.99
    np.testing.assert_allclose(graph[0], xla[0], atol=1e-4)


def test_tensor_in_tensor_out(rng):
    x = tf.constant(rng.normal(size=(100, 3)).astype(np.float32))
    centroids, assignments = clustering.kmeans(x, 4)
    assert tf.is_tensor(centroids) and tf.is_tensor(assignments)


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_clusters=0), "num_clusters"),
    (dict(num_clusters=101), "num_clusters"),
    (dict(num_clusters=3, num_iters=0), "num_iters"),
    (dict(num_clusters=3, tol=1.5), "tol"),
    (dict(num_clusters=3, init="nope"), "init"),
])
def test_kmeans_rejects_bad_arguments(rng, kwargs, message):
    with pytest.raises(ValueError, match=message):
        clustering.kmeans(rng.normal(size=(100, 3)).astype(np.float32), **kwargs)


def reference_concentration(x, centroids, assignments, temperature, alpha=10.0):
    """The PCL reference's loop, transcribed."""
    k = len(centroids)
    distances = [[] for _ in range(k)]
    for point, a in zip(x, assignments):
        distances[a].append(((point - centroids[a]) ** 2).sum())
    density = np.zeros(k)
    for i, d in enumerate(distances):
        if len(d) > 1:
            density[i] = (np.asarray(d) ** 0.5).mean() / np.log(len(d) + alpha)
    dmax = density.max()
    for i, d in enumerate(distances):
        if len(d) <= 1:
            density[i] = dmax
    density = density.clip(np.percentile(density, 10), np.percentile(density, 90))
    density = temperature * density / density.mean()
    return np.maximum(density, temperature / 100)  # keras_pcl's documented floor


@pytest.mark.parametrize("temperature", [0.1, 0.2, 0.5])
@pytest.mark.parametrize("num_clusters", [5, 17])
def test_concentration_matches_reference(rng, temperature, num_clusters):
    x = rng.normal(size=(300, 8)).astype(np.float32)
    centroids = rng.normal(size=(num_clusters, 8)).astype(np.float32)
    # Uneven sizes, one singleton and one empty cluster.
    assignments = rng.integers(0, num_clusters - 2, 300)
    assignments[0] = num_clusters - 2
    got = clustering.concentration(x, centroids, assignments, temperature)
    want = reference_concentration(x, centroids, assignments, temperature)
    np.testing.assert_allclose(got, want, rtol=1e-4)
    assert got.mean() == pytest.approx(temperature, rel=1e-4)


def test_concentration_survives_duplicate_points():
    x = np.zeros((20, 4), np.float32)
    centroids = np.zeros((3, 4), np.float32)
    phi = clustering.concentration(x, centroids, np.arange(20) % 3, 0.2)
    assert np.isfinite(phi).all() and (phi > 0).all()


def test_prototype_estep_normalises_prototypes(rng):
    x = rng.normal(size=(400, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    results = tf.function(lambda f: clustering.prototype_estep(f, (4, 9), temperature=0.2))(x)
    assert [r[0].shape[0] for r in results] == [4, 9]
    for prototypes, phi, assignments in results:
        np.testing.assert_allclose(np.linalg.norm(prototypes.numpy(), axis=1), 1.0, rtol=1e-5)
        assert phi.numpy().mean() == pytest.approx(0.2, rel=1e-4)
        assert assignments.shape == (400,)


def test_prototype_estep_nests_xla_per_granularity(rng):
    """jit_compile=True on one E-step inside a graph-mode function: each k-means runs as a
    nested XLA function and gives the graph-mode result."""
    x = rng.normal(size=(600, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)

    def estep(jit):
        fn = tf.function(lambda f: clustering.prototype_estep(
            f, (4, 9), jit_compile=jit, tol=0.0, matmul_dtype=tf.float32))
        return fn(tf.constant(x))

    for (p_graph, phi_graph, a_graph), (p_xla, phi_xla, a_xla) in zip(estep(False), estep(True)):
        assert (a_graph.numpy() == a_xla.numpy()).mean() > 0.99
        np.testing.assert_allclose(p_xla.numpy(), p_graph.numpy(), atol=1e-3)
        np.testing.assert_allclose(phi_xla.numpy(), phi_graph.numpy(), rtol=1e-3)


def test_auto_compilation_rule():
    on_cpu = not clustering.accelerator_available()
    for k, n, want_on_cpu in [(50, 60000, True), (128, 20000, True), (200, 60000, False),
                              (50, 5000, False), (50, None, False)]:
        assert clustering.resolve_jit_compile("auto", k, n) == (want_on_cpu or not on_cpu)
    assert clustering.resolve_jit_compile(False, 50, 60000) is False
    with pytest.raises(ValueError, match="jit_compile must be"):
        clustering.resolve_jit_compile("xla")


def test_many_empty_clusters_never_leave_zero_centroids(rng):
    """Collapsed features: two distinct points, ten clusters."""
    x = np.repeat(np.eye(2, 4, dtype=np.float32), 50, axis=0) + rng.normal(0, 1e-3, (100, 4)).astype(np.float32)
    init = np.concatenate([x[:1], x[-1:], np.full((8, 4), 40.0, np.float32)])
    centroids, assignments = clustering.kmeans(x, 10, init=init, tol=0.0, matmul_dtype="float32")
    norms = np.linalg.norm(centroids, axis=1)
    assert norms.min() > 0.9 and norms.max() < 1.1
    assert len(np.unique(assignments)) > 2  # the split clusters took points


# Exact assignments at any scale (issue: bfloat16 scores once misassigned ~1 % of points) ----------

def adversarial(name, rng):
    """Inputs where rounded scores go wrong: unit vectors, raw pixels, blobs far from the origin,
    points on the bisector of two centroids."""
    if name == "unit":
        x = rng.normal(size=(3000, 64))
        return x / np.linalg.norm(x, axis=1, keepdims=True), 60
    if name == "pixels":
        from sklearn.datasets import load_digits

        return load_digits().data * 16.0, 40  # values 0..255, norms ~1 000
    if name == "far_blobs":
        x, _ = make_blobs(3000, n_features=16, centers=12, cluster_std=3.0, center_box=(-30, 30), random_state=1)
        return x + 1e4, 12  # centres of norm ~4e4: an offset far larger than the spread
    if name == "near_ties":
        a, b = rng.normal(size=(2, 32)) * 50
        t = rng.uniform(-1e-3, 1e-3, size=(2000, 1)) + 0.5  # just off the bisector of a and b
        x = a + t * (b - a) + rng.normal(size=(2000, 32)) * 1e-3
        return np.concatenate([x, rng.normal(size=(500, 32)) * 50]), 8
    raise KeyError(name)


def misassigned(x, centroids, assignments):
    """Points whose assignment is not their float64-nearest returned centroid, beyond ties:
    gaps below float32's resolution of the distances (1e-6 of |x - m| |c - m| + |c - m|^2,
    m the mean, the scale of the centred scores) count as ties."""
    x, c = np.asarray(x, np.float64), np.asarray(centroids, np.float64)
    m = x.mean(0)
    d2 = ((x[:, None, :] - c[None]) ** 2).sum(-1)
    best = d2.min(1)
    chosen = d2[np.arange(len(x)), assignments]
    scale = np.linalg.norm(x - m, axis=1) * np.linalg.norm(c - m, axis=1).max() + ((c - m) ** 2).sum(1).max()
    return np.flatnonzero(chosen - best > 1e-6 * scale)


@pytest.mark.parametrize("path", ["bfloat16", "float32", "xla"])
@pytest.mark.parametrize("name", ["unit", "pixels", "far_blobs", "near_ties"])
def test_every_point_is_assigned_to_its_exact_nearest_centroid(rng, name, path):
    x, k = adversarial(name, rng)
    x = x.astype(np.float32)
    options = dict(jit_compile=True, matmul_dtype="float32") if path == "xla" else \
        dict(jit_compile=False, matmul_dtype=path)
    centroids, assignments = clustering.kmeans(x, k, num_iters=3, tol=0.0, init="random", **options)
    wrong = misassigned(x, centroids, assignments)
    assert len(wrong) == 0, f"{len(wrong)} of {len(x)} points not at their nearest centroid"


def test_centroids_are_the_means_of_the_previous_assignment(rng):
    """What kmeans documents (float32 scores): n iterations return the means of the (n - 1)-iteration
    run's clusters, and assignments nearest to them."""
    x, y = make_blobs(2000, n_features=8, centers=6, cluster_std=2.0, random_state=3)
    x = x.astype(np.float32)
    init = x[rng.choice(len(x), 6, replace=False)]
    _, before = clustering.kmeans(x, 6, num_iters=2, tol=0.0, init=init, matmul_dtype="float32")
    centroids, after = clustering.kmeans(x, 6, num_iters=3, tol=0.0, init=init, matmul_dtype="float32")
    assert (before != after).any()  # not converged: the statement is about the previous step
    means = np.stack([x[before == j].mean(0) for j in range(6)])
    np.testing.assert_allclose(centroids, means, rtol=1e-4, atol=1e-4)
    assert len(misassigned(x, centroids, after)) == 0


@pytest.mark.parametrize("seed", range(8))
def test_the_default_init_finds_well_separated_blobs_for_every_seed(blobs, seed):
    x, y = blobs
    centroids, assignments, info = clustering.kmeans(x, 8, seed=seed, return_info=True)
    reference = KMeans(8, n_init=10, random_state=0).fit(x)
    assert info["objective"] <= reference.inertia_ * 1.01
    assert adjusted_rand_score(y, assignments) >= 0.99
    assert clustering.resolve_init("auto", 8) == "k-means++"
    assert clustering.resolve_init("auto", 10_000) == "random"
