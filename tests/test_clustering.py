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


def reference_kmeans_plus_plus(x, num_clusters, uniforms):
    """k-means++ in float64 NumPy: draw i is the first index whose cumulative squared
    distance to the chosen centres exceeds uniforms[i] times the total."""
    centres = [x[min(int(uniforms[0] * len(x)), len(x) - 1)]]
    for u in uniforms[1:num_clusters]:
        nearest_sq = np.min([((x - c) ** 2).sum(1) for c in centres], axis=0)
        cumulative = np.cumsum(nearest_sq)
        centres.append(x[min(int((cumulative <= u * cumulative[-1]).sum()), len(x) - 1)])
    return np.stack(centres)


@pytest.mark.parametrize("seed", [0, 5])
def test_kmeans_plus_plus_matches_numpy_and_is_identical_under_xla(rng, numpy_hash, seed):
    from keras_pcl.hashing import hashed_uniform

    x = rng.normal(size=(300, 4)).astype(np.float32)
    uniforms = (numpy_hash(7, seed) >> np.uint64(8)).astype(np.float64) / 2**24
    for jit in (False, True):
        np.testing.assert_array_equal(tf.function(hashed_uniform, jit_compile=jit)(7, seed).numpy(), uniforms)
        got = tf.function(lambda p: clustering._kmeans_plus_plus(p, 7, seed), jit_compile=jit)(x).numpy()
        np.testing.assert_array_equal(got, reference_kmeans_plus_plus(x.astype(np.float64), 7, uniforms))


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
