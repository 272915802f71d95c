"""The E-step math of PCL: k-means and the concentration phi, as TensorFlow graphs.

`kmeans` is Lloyd's algorithm written for speed on large N and K:

* points are scored in tiles of `tile_size` rows against all centroids
  (`x.c - |c|^2 / 2`), so memory is O(tile_size x K), never N x K;
* new centroids come from one segment sum over all points;
* the loop stops once fewer than `tol` of the points change cluster, as
  faiss and scikit-learn stop when assignments settle;
* empty clusters are re-seeded by splitting the largest clusters, as faiss does;
* restarts keep the run with the lowest objective.

Compilation (`jit_compile="auto"`): XLA where a GPU or TPU is visible; on CPU,
XLA for at most 128 clusters over at least 20 000 points (thin matmuls, where
XLA's fusion of the memory-bound passes wins), plain TF graph mode otherwise.
On CPU, graph mode runs the distance matmul in
bfloat16 when the processor has AMX/AVX512-BF16 (oneDNN uses it; XLA's CPU
backend does not) for the Lloyd iterations, and the final assignment is
scored again in float32, so every returned assignment is the float32-nearest
centroid, and objectives and phi are float32-exact. Points are centred
before clustering, so offsets do not cost precision either.
See bench/RESULTS.md for the measurements behind these defaults.
"""

import functools

import numpy as np
import tensorflow as tf

from keras_pcl.errors import InvalidInputError
from keras_pcl.hashing import hashed_permutation, hashed_uniform

# faiss's relative perturbation when splitting a cluster to fill an empty one.
_SPLIT_EPS = 1.0 / 1024.0


def accelerator_available():
    """True when TensorFlow sees a GPU or TPU."""
    return bool(tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU"))


# On CPU, XLA wins for few clusters over many points: the distance matmul is thin and the
# memory-bound passes around it dominate, which XLA fuses. bench/RESULTS.md, N = 60 000:
# XLA 0.52x graph mode's time at K = 50, 0.65x at K = 100, 1.0x at K = 200, 1.25-1.5x at K = 500.
_CPU_XLA_MAX_CLUSTERS = 128
_CPU_XLA_MIN_POINTS = 20_000  # below, the run is too short for the choice to matter


def resolve_jit_compile(jit_compile, num_clusters=None, num_points=None):
    """Maps "auto"/True/False to a bool.

    "auto" means XLA on GPU/TPU; on CPU, XLA only for k-means with at most 128
    clusters over at least 20 000 points (when both are given), graph mode otherwise.
    """
    if jit_compile == "auto":
        if accelerator_available():
            return True
        return (num_clusters is not None and num_points is not None
                and num_clusters <= _CPU_XLA_MAX_CLUSTERS and num_points >= _CPU_XLA_MIN_POINTS)
    if jit_compile in (True, False):
        return jit_compile
    raise InvalidInputError(f'jit_compile must be "auto", True or False, got {jit_compile!r}.')


@functools.lru_cache(maxsize=None)
def _cpu_has_fast_bfloat16():
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_matmul_dtype(matmul_dtype, jit):
    """ "auto": bfloat16 in CPU graph mode on processors with bf16 units, else float32."""
    if matmul_dtype == "auto":
        use_bf16 = not jit and not accelerator_available() and _cpu_has_fast_bfloat16()
        return tf.bfloat16 if use_bf16 else tf.float32
    return tf.as_dtype(matmul_dtype)


def _scoring_rows(points, matmul_dtype):
    """`[x, 1]` in the matmul dtype: the point side of the one-matmul score below."""
    return tf.concat([tf.cast(points, matmul_dtype), tf.ones([tf.shape(points)[0], 1], matmul_dtype)], axis=1)


def _assign(points, centroids, tile_size, matmul_dtype, scoring_rows=None):
    """Nearest centroid of each point, tile by tile.

    Args:
        points: `[n_tiles * tile_size, d]` float32 (padded).
        centroids: `[K, d]` float32.
        scoring_rows: `_scoring_rows(points, matmul_dtype)`, when the caller
            reuses it across iterations.

    Returns:
        `[N_pad]` int32 assignments: exact float32 nearest centroids when
        `matmul_dtype` is float32; with bfloat16 the scores are rounded to 8
        significant bits, so points near a tie may get a neighbour.
    """
    dim = tf.shape(points)[1]
    if scoring_rows is None:
        scoring_rows = _scoring_rows(points, matmul_dtype)
    scoring_tiles = tf.reshape(scoring_rows, [-1, tile_size, dim + 1])
    # Scores x.c - |c|^2 / 2 as one matmul, [x, 1] . [c, -|c|^2 / 2]: no separate
    # pass over the [tile, K] scores (in graph mode each pass is a full copy).
    half_sq_norm = 0.5 * tf.reduce_sum(tf.square(centroids), axis=1)
    augmented = tf.cast(tf.concat([centroids, -half_sq_norm[:, None]], axis=1), matmul_dtype)

    def nearest_in_tile(i):
        scores = tf.matmul(scoring_tiles[i], augmented, transpose_b=True)
        return tf.argmax(scores, axis=1, output_type=tf.int32)

    # A loop over row slices, not map_fn: map_fn would first copy all points
    # into a TensorArray, one more memory-bound pass per Lloyd iteration.
    num_tiles = tf.shape(scoring_tiles)[0]
    nearest = tf.TensorArray(tf.int32, size=num_tiles, element_shape=[tile_size])
    nearest = tf.while_loop(
        lambda i, _: i < num_tiles,
        lambda i, out: (i + 1, out.write(i, nearest_in_tile(i))),
        (tf.constant(0), nearest),
    )[1]
    return tf.reshape(nearest.stack(), [-1])


def _objective(points, valid, centroids, assignments, tile_size):
    """Sum over valid rows of the exact float32 squared distance to the assigned centroid.

    Computed tile by tile, whatever the matmul dtype chose the assignment with;
    a loop over row slices with a scalar accumulator, so no copy of the points.
    """
    tiles = tf.reshape(points, [-1, tile_size, tf.shape(points)[1]])
    tile_assignments = tf.reshape(assignments, [-1, tile_size])
    tile_valid = tf.reshape(valid, [-1, tile_size])
    num_tiles = tf.shape(tiles)[0]

    def body(i, total):
        nearest = tile_assignments[i]
        sq_dist = tf.reduce_sum(tf.square(tiles[i] - tf.gather(centroids, tf.maximum(nearest, 0))), axis=1)
        return i + 1, total + tf.reduce_sum(tf.where(tile_valid[i], sq_dist, 0.0))

    return tf.while_loop(lambda i, _: i < num_tiles, body, (tf.constant(0), tf.constant(0.0)))[1]


def _update(points, assignments, centroids):
    """Cluster means; empty clusters take half of a large cluster (faiss-style split)."""
    num_clusters = tf.shape(centroids)[0]
    sums = tf.math.unsorted_segment_sum(points, assignments, num_clusters)
    counts = tf.math.unsorted_segment_sum(
        tf.ones_like(assignments, tf.float32), assignments, num_clusters
    )
    means = sums / tf.maximum(counts, 1.0)[:, None]
    empty = counts < 0.5
    # Empty clusters take the centroid of a large cluster (largest first, cycling
    # over the clusters with at least two points), pushed apart from it by a small
    # symmetric perturbation that grows with each reuse of the same donor.
    num_splittable = tf.maximum(tf.reduce_sum(tf.cast(counts > 1.5, tf.int32)), 1)
    rank = tf.maximum(tf.cumsum(tf.cast(empty, tf.int32)) - 1, 0)
    largest_first = tf.argsort(counts, direction="DESCENDING", stable=True)
    donor = tf.gather(largest_first, rank % num_splittable)
    reuse = tf.cast(rank // num_splittable + 1, tf.float32)[:, None]
    dim = tf.shape(points)[1]
    signs = tf.cast(1 - 2 * (tf.range(dim) % 2), tf.float32)[None, :]
    from_donor = tf.gather(means, donor) * (1.0 + _SPLIT_EPS * reuse * signs)
    is_donor = tf.scatter_nd(donor[:, None], tf.cast(empty, tf.int32), [num_clusters]) > 0
    split = tf.where(is_donor[:, None] & ~empty[:, None], means * (1.0 - _SPLIT_EPS * signs), means)
    return tf.where(empty[:, None], from_donor, split)


def _lloyd(points, valid, init_centroids, num_iters, tol, tile_size, matmul_dtype):
    """One k-means run from `init_centroids`; returns (centroids, assignments, iterations).

    Each iteration moves the centroids to the means of the current clusters,
    then assigns every point to its nearest centroid (scored in `matmul_dtype`);
    the loop stops on changed assignments, so it never needs the objective.
    The returned assignments are scored once more in float32 against the
    returned centroids (when the loop's were bfloat16): every point is at its
    float32-nearest centroid, and the centroids are the means of the loop's
    last clusters.
    """
    num_valid = tf.reduce_sum(tf.cast(valid, tf.float32))

    scoring_rows = _scoring_rows(points, matmul_dtype)  # once, not every iteration

    def assign(centroids):
        nearest = _assign(points, centroids, tile_size, matmul_dtype, scoring_rows=scoring_rows)
        return tf.where(valid, nearest, -1)  # padding rows join no cluster

    def body(step, centroids, assignments, changed):
        centroids = _update(points, assignments, centroids)
        new_assignments = assign(centroids)
        changed = tf.reduce_sum(tf.cast(new_assignments != assignments, tf.float32)) / num_valid
        return step + 1, centroids, new_assignments, changed

    def cond(step, centroids, assignments, changed):
        return (step < num_iters) & (changed > tol)

    iterations, centroids, assignments, _ = tf.while_loop(
        cond,
        body,
        (tf.constant(0), init_centroids, assign(init_centroids), tf.constant(np.inf, tf.float32)),
    )
    if matmul_dtype != tf.float32:
        # One exact pass: rounded scores moved ~0.5 % of points on unit vectors and ~1 % on
        # unnormalised data to a neighbour; a returned assignment must be the nearest centroid.
        assignments = tf.where(valid, _assign(points, centroids, tile_size, tf.float32), -1)
    return centroids, assignments, iterations


def _kmeans_plus_plus(points, num_clusters, seed, trials=None):
    """Greedy k-means++ seeding (Arthur & Vassilvitskii, 2007; scikit-learn's form).

    Each new centre is the best of `trials` candidates (default `2 + ln K`, as
    scikit-learn) drawn with probability proportional to their squared distance
    to the nearest chosen centre: the one that lowers the sum of those distances
    most. A candidate is drawn by the Gumbel-max rule, `argmax_n log(d_n) + g_n`
    with `g_n = -log(-log(u_n))`: at step i the `trials x N` uniforms are
    `hashed_uniform(trials * N, 7919 seed + i) + 2^-25` (`keras_pcl.hashing`),
    row j for candidate j, so graph mode and XLA pick the same points without a
    cumulative sum (which XLA's CPU backend compiled for over a minute at
    N = 3 000). The first centre is point `floor(u * N)`, `u = hashed_uniform(1, seed)`.
    """
    trials = int(trials or 2 + int(np.log(num_clusters)))
    num_points = tf.shape(points)[0]
    first = tf.minimum(tf.cast(hashed_uniform(1, seed)[0] * tf.cast(num_points, tf.float32), tf.int32),
                       num_points - 1)
    centres = tf.tensor_scatter_nd_update(
        tf.zeros([num_clusters, points.shape[1]]), [[0]], points[first][None]
    )
    nearest_sq = tf.reduce_sum(tf.square(points - points[first]), axis=1)
    point_sq = tf.reduce_sum(tf.square(points), axis=1)

    def gumbel(step):
        # (top 24 bits + 1/2) / 2^24: strictly inside (0, 1), so both logs are finite.
        u = hashed_uniform(trials * num_points, seed * 7919 + step) + 2.0 ** -25
        return -tf.math.log(-tf.math.log(tf.reshape(u, [trials, num_points])))

    def body(i, centres, nearest_sq):
        log_weight = tf.math.log(tf.maximum(nearest_sq, 1e-30))
        picks = tf.argmax(log_weight[None, :] + gumbel(i), axis=1, output_type=tf.int32)  # [trials]
        candidates = tf.gather(points, picks)  # [trials, d]
        # |p - c|^2 = |p|^2 - 2 p.c + |c|^2: one matmul, not a [trials, N, d] broadcast (the
        # points are centred, so the expansion loses no precision to an offset).
        sq = tf.maximum(point_sq[None, :] - 2.0 * tf.matmul(candidates, points, transpose_b=True)
                        + tf.gather(point_sq, picks)[:, None], 0.0)  # [trials, N]
        updated = tf.minimum(nearest_sq[None, :], sq)
        best = tf.argmin(tf.reduce_sum(updated, axis=1), output_type=tf.int32)
        centres = tf.tensor_scatter_nd_update(centres, [[i]], candidates[best][None])
        return i + 1, centres, updated[best]

    _, centres, _ = tf.while_loop(
        lambda i, *_: i < num_clusters, body, (tf.constant(1), centres, nearest_sq)
    )
    return centres


# init="auto" seeds with k-means++ up to this many clusters, randomly above: k-means++ is K
# sequential passes over the training points, measured in bench/RESULTS.md against the Lloyd
# iterations it saves.
AUTO_KMEANS_PLUS_PLUS_MAX_CLUSTERS = 128


def resolve_init(init, num_clusters):
    """ "auto": "k-means++" for at most AUTO_KMEANS_PLUS_PLUS_MAX_CLUSTERS clusters, "random" above."""
    if isinstance(init, str) and init == "auto":
        return "k-means++" if num_clusters <= AUTO_KMEANS_PLUS_PLUS_MAX_CLUSTERS else "random"
    return init


def _pad_to_tiles(points, tile_size):
    num_points = tf.shape(points)[0]
    padded = (num_points + tile_size - 1) // tile_size * tile_size
    points = tf.pad(points, [[0, padded - num_points], [0, 0]])
    return points, tf.range(padded) < num_points


def kmeans_graph(
    features,
    num_clusters,
    num_iters=20,
    num_restarts=1,
    seed=0,
    tol=1e-3,
    tile_size=4096,
    max_points_per_centroid=1000,
    init="auto",
    matmul_dtype=tf.float32,
):
    """`kmeans` as plain TensorFlow ops, to be called inside a `tf.function`.

    Returns `(centroids [K, d], assignments [N] int32, objective, iterations)`
    where objective is the sum of squared distances of all N points and
    iterations the Lloyd iterations of the kept restart.
    """
    features = tf.convert_to_tensor(features, tf.float32)
    num_points = features.shape[0]
    if num_points is None:
        raise InvalidInputError("kmeans needs a static number of points.")
    if not 1 <= num_clusters <= num_points:
        raise InvalidInputError(
            f"num_clusters={num_clusters} must be between 1 and the number of points ({num_points})."
        )
    init = resolve_init(init, num_clusters)
    # Nearest centroids do not change under a shift: k-means runs on centred points, so a large
    # offset cannot swamp the scores' float32 (or bfloat16) precision; centroids are shifted back.
    centre = tf.reduce_mean(features, axis=0)
    features = features - centre
    tile_size = int(min(tile_size, max(num_points, 1)))
    all_points, all_valid = _pad_to_tiles(features, tile_size)
    best = None
    for restart in range(num_restarts):
        # Hashed (not tf.random) choices: the same subsample and init in graph mode and XLA.
        run_hash = seed * 65537 + restart * 257
        # As faiss (and the reference), train on at most max_points_per_centroid * K points.
        train = features
        if max_points_per_centroid and num_points > max_points_per_centroid * num_clusters:
            keep = hashed_permutation(num_points, run_hash + 7)[:max_points_per_centroid * num_clusters]
            train = tf.gather(features, keep)
        if not isinstance(init, str):  # explicit initial centroids (a tensor)
            init_centroids = tf.convert_to_tensor(init, tf.float32) - centre
        elif init == "random":  # K distinct points, as faiss and the reference
            init_centroids = tf.gather(train, hashed_permutation(tf.shape(train)[0], run_hash)[:num_clusters])
        else:
            init_centroids = _kmeans_plus_plus(train, num_clusters, run_hash + 13)
        points, valid = (
            (all_points, all_valid) if train is features else _pad_to_tiles(train, tile_size)
        )
        centroids, assignments, iterations = _lloyd(
            points, valid, init_centroids, num_iters, tol, tile_size, matmul_dtype
        )
        if train is not features:  # trained on a subset: assign every point, exactly
            assignments = _assign(all_points, centroids, tile_size, tf.float32)
        # The objective of all N points, once per restart: exact float32.
        objective = _objective(all_points, all_valid, centroids, assignments, tile_size)
        assignments = assignments[:num_points]
        run = (centroids, assignments, objective, iterations)
        if best is None:
            best = run
        else:
            better = objective < best[2]
            best = tuple(tf.where(better, new, old) for new, old in zip(run, best))
    centroids, assignments, objective, iterations = best
    return centroids + centre, assignments, objective, iterations


@functools.lru_cache(maxsize=32)
def _compiled_kmeans(jit, **options):
    if options.get("init") == "explicit":
        options = {k: v for k, v in options.items() if k != "init"}
        return tf.function(lambda features, init: kmeans_graph(features, init=init, **options), jit_compile=jit)
    return tf.function(functools.partial(kmeans_graph, **options), jit_compile=jit)


def kmeans(
    features,
    num_clusters,
    num_iters=20,
    num_restarts=1,
    seed=0,
    tol=1e-3,
    tile_size=4096,
    max_points_per_centroid=1000,
    init="auto",
    jit_compile="auto",
    matmul_dtype="auto",
    return_info=False,
):
    """Euclidean k-means (Lloyd), as the PCL reference runs it with faiss, with exact assignments.

    What it returns: every point's assignment is its nearest centroid among
    the returned ones, as float32 computes it (ties aside), at any scale and
    offset: the points are centred first, and where the Lloyd iterations score
    in bfloat16 (the fast path on CPUs with bf16 units) the final assignment
    is scored again in float32. The centroids are the means of the clusters of
    the last Lloyd iteration's assignment (as faiss returns them), scored in
    the matmul dtype: in float32 they are the means of the clusters of a run
    with one iteration fewer, and once the loop has converged the means of the
    returned clusters; in bfloat16, a point near a tie (~0.5 % of unit vectors)
    may have counted in a neighbour's mean. With `max_points_per_centroid`
    subsampling they are means of the training subsample's clusters. Clusters
    left empty are refilled by splitting a large one.

    Args:
        features: `[N, d]` numpy array or tensor (PCL passes L2-normalised rows).
        num_clusters: `K`, between 1 and N.
        num_iters: at most this many Lloyd iterations (the reference uses 20).
        num_restarts: runs from different initial centroids; the one with the
            lowest objective is kept (the reference uses 5).
        seed: int; restart `i` uses seed `(seed, i)`.
        tol: stop once at most this fraction of points changes cluster in an
            iteration; `0` runs exactly `num_iters` iterations.
        tile_size: rows scored at once; memory is O(tile_size x K).
        max_points_per_centroid: train on a random subset of at most this many
            points per centroid (faiss' and the reference's 1000), then assign
            all points. `None` uses all points.
        init: "auto" (default: "k-means++" for K <=
            `AUTO_KMEANS_PLUS_PLUS_MAX_CLUSTERS`, "random" above, where
            k-means++'s K sequential passes cost more than they save),
            "random" (K distinct points, as faiss and the reference),
            "k-means++" (greedy, as scikit-learn: better on well-separated
            data), or a `[K, d]` array of initial centroids (then
            `num_restarts` must be 1). Inits and the training subsample draw
            from an integer hash of the seed (`keras_pcl.hashing`), identical
            under XLA and graph mode.
        jit_compile: "auto" (XLA on GPU/TPU, and on CPU for K <= 128 with
            N >= 20 000; graph mode otherwise), True or False.
        matmul_dtype: dtype of the Lloyd iterations' distance matmul; "auto"
            picks bfloat16 in CPU graph mode on processors with bf16 units,
            float32 otherwise. The returned assignments are float32-exact either way.
        return_info: also return `{"objective": sum of squared distances,
            "iterations": Lloyd iterations run}`.

    Returns:
        `(centroids [K, d], assignments [N])`, plus the info dict when asked.
        Centroids are cluster means (not re-normalised). Numpy in, numpy out.
    """
    if num_iters < 1:
        raise InvalidInputError(f"num_iters must be >= 1, got {num_iters}.")
    if num_restarts < 1:
        raise InvalidInputError(f"num_restarts must be >= 1, got {num_restarts}.")
    if isinstance(init, str):
        if init not in ("auto", "random", "k-means++"):
            raise InvalidInputError(f'init must be "auto", "random", "k-means++" or a [K, d] array, got {init!r}.')
    else:
        init = np.asarray(init, np.float32)
        if init.shape != (num_clusters, np.shape(features)[1]):
            raise InvalidInputError(f"init centroids must have shape ({num_clusters}, d), got {init.shape}.")
        if num_restarts != 1:
            raise InvalidInputError("explicit init centroids allow only num_restarts=1.")
    if not 0.0 <= tol < 1.0:
        raise InvalidInputError(f"tol must be in [0, 1), got {tol}.")
    jit = resolve_jit_compile(jit_compile, int(num_clusters), int(np.shape(features)[0]))
    options = dict(
        num_clusters=int(num_clusters),
        num_iters=int(num_iters),
        num_restarts=int(num_restarts),
        seed=int(seed),
        tol=float(tol),
        tile_size=int(tile_size),
        max_points_per_centroid=max_points_per_centroid,
        init=init if isinstance(init, str) else "explicit",
        matmul_dtype=resolve_matmul_dtype(matmul_dtype, jit),
    )
    as_numpy = not tf.is_tensor(features)
    explicit = not isinstance(init, str)
    if not tf.executing_eagerly():  # already inside a tf.function: plain ops
        result = kmeans_graph(features, **dict(options, init=init))
    else:
        features = tf.convert_to_tensor(features, tf.float32)
        if explicit:  # the initial centroids are an argument, so one trace serves every init
            result = _compiled_kmeans(jit, **options)(features, tf.constant(init))
        else:
            result = _compiled_kmeans(jit, **options)(features)
    if as_numpy:
        result = tuple(t.numpy() for t in result)
    centroids, assignments, objective, iterations = result
    if not return_info:
        return centroids, assignments
    return centroids, assignments, {"objective": objective, "iterations": iterations}


def _percentile(values, q):
    """Linear-interpolation percentile, as numpy's default."""
    ordered = tf.sort(values)
    position = q / 100.0 * tf.cast(tf.size(values) - 1, tf.float32)
    low = tf.cast(tf.floor(position), tf.int32)
    high = tf.cast(tf.math.ceil(position), tf.int32)
    frac = position - tf.floor(position)
    return tf.gather(ordered, low) * (1.0 - frac) + tf.gather(ordered, high) * frac


def concentration(features, centroids, assignments, temperature=0.2, alpha=10.0):
    """Concentration phi of each cluster, exactly as the PCL reference computes it.

    For cluster c with Z members at distances `dist_z` (Euclidean) from its
    centroid: `phi_c = mean(dist_z) / log(Z + alpha)` when Z > 1; clusters
    with Z <= 1 take the largest phi of the others. phi is then clipped to its
    10th..90th percentile and rescaled so that `mean(phi) == temperature`.
    One guard beyond the reference: phi is floored at `temperature / 100`, so
    a cluster of identical points cannot give infinite logits.

    Args:
        features: `[N, d]` points.
        centroids: `[K, d]` centroids (distances are taken to these as given).
        assignments: `[N]` int cluster of each point.
        temperature: the target mean of phi.
        alpha: smoothing of the log (10 in the reference).

    Returns:
        `[K]` float32 phi (numpy if `features` is numpy).
    """
    if temperature <= 0:
        raise InvalidInputError(f"temperature must be > 0, got {temperature}.")
    as_numpy = not tf.is_tensor(features)
    features = tf.convert_to_tensor(features, tf.float32)
    centroids = tf.convert_to_tensor(centroids, tf.float32)
    assignments = tf.cast(assignments, tf.int32)
    num_clusters = tf.shape(centroids)[0]
    dist = tf.sqrt(tf.reduce_sum(tf.square(features - tf.gather(centroids, assignments)), axis=1))
    sizes = tf.math.unsorted_segment_sum(tf.ones_like(dist), assignments, num_clusters)
    mean_dist = tf.math.unsorted_segment_sum(dist, assignments, num_clusters) / tf.maximum(sizes, 1.0)
    several = sizes > 1.5
    phi = tf.where(several, mean_dist / tf.math.log(sizes + alpha), 0.0)
    phi = tf.where(several, phi, tf.reduce_max(phi))
    phi = tf.clip_by_value(phi, _percentile(phi, 10.0), _percentile(phi, 90.0))
    mean_phi = tf.reduce_mean(phi)
    phi = tf.where(mean_phi > 0, temperature * phi / tf.maximum(mean_phi, 1e-30), temperature)
    phi = tf.maximum(phi, temperature / 100.0)
    return phi.numpy() if as_numpy else phi


def prototype_estep(features, num_clusters, temperature=0.2, alpha=10.0, seed=0, jit_compile=False,
                    **kmeans_options):
    """The whole PCL E-step on precomputed features, one k-means per granularity.

    Granularity m clusters with seed `seed + m` (the reference seeds by index),
    phi is computed on the raw centroids, and the prototypes are
    L2-normalised afterwards, as in the reference.

    Args:
        features: `[N, d]` L2-normalised momentum-encoder features.
        num_clusters: sequence of K per granularity.
        jit_compile: per granularity, run k-means as a nested XLA function
            (True), in the caller's graph (False), or "auto" (see `kmeans`).
        **kmeans_options: passed to `kmeans_graph`; without `matmul_dtype`,
            each granularity picks it for its compilation ("auto").

    Returns:
        List of `(prototypes [K_m, d], phi [K_m], assignments [N])` per granularity.
    """
    results = []
    for m, k in enumerate(num_clusters):
        jit = resolve_jit_compile(jit_compile, int(k), features.shape[0])
        options = dict(kmeans_options, num_clusters=int(k), seed=seed + m)
        options.setdefault("matmul_dtype", resolve_matmul_dtype("auto", jit))
        run = functools.partial(kmeans_graph, **options)
        if jit:
            run = tf.function(run, jit_compile=True)
        centroids, assignments, _, _ = run(features)
        phi = concentration(features, centroids, assignments, temperature, alpha)
        results.append((tf.math.l2_normalize(centroids, axis=1), phi, assignments))
    return results
