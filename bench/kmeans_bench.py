"""k-means for the E-step: keras_pcl vs faiss-cpu vs scikit-learn, side by side in one run.

    pip install -e ".[bench]"
    python bench/kmeans_bench.py --n=50000 --k=1000,10000

For each (N, K), on L2-normalised features drawn from a Gaussian mixture
(d=128), two comparisons:

* defaults (the headline): each library as a user would call it, early stop
  allowed; keras_pcl's default path (on this CPU: TF graph mode, bf16
  distance matmuls), its forced-XLA path, and (`keras_pcl_256`, not in the
  default --methods) its default path training on faiss' default subsample of
  256 points per centroid instead of the PCL reference's 1000; `faiss_assign`
  (not in the default --methods either) is faiss plus the `index.search(x, 1)`
  that assigns every point, as the PCL reference does after training, since
  keras_pcl's call returns the assignments too;
* fixed: at most 20 Lloyd iterations from the same initial centroids, on all
  points, no early stop except exact convergence (every library,
  faiss 1.15 included, stops once converged): compare ms/it.

Objectives are recomputed identically for every method: the sum over all N
points of the squared distance to the nearest returned centroid (exact, f32).
Methods run alternately, `--repeats` times; the median time is reported.
At defaults every library draws its own initial centroids, so a single draw's
objective differs by luck; `--seeds=S` runs each method from S seeds (keras_pcl
`seed=s`, faiss `seed=1234+s`, scikit-learn `random_state=s`) and compares
mean objectives, printing each method's spread over seeds.

Peak memory (`--memory`): each (N, K, method) runs once at defaults in a fresh
process; reported is the process's peak resident memory (VmHWM) minus its
resident memory just before the call (after imports and the data), i.e. what
one call adds, tracing included. The data itself is N x d x 4 bytes.

    python bench/kmeans_bench.py --memory --n=50000,200000 --k=1000,10000
"""

import argparse
import functools
import json
import os
import platform
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def cpuinfo(field):
    """The first `field` line of /proc/cpuinfo ("model name", "flags"), or None."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith(field))
    except (OSError, StopIteration):
        return None


# faiss-cpu 1.15.1's bundled OpenBLAS 0.3.15 does not recognise recent Xeons and falls back
# to its Prescott (SSE3) kernels: faiss ran 4.4x slower on the AMX Xeon than with its
# AVX-512 kernels (bench/RESULTS.md, tenth session). Read at library load, so set first.
if "avx512f" in (cpuinfo("flags") or "").split():
    os.environ.setdefault("OPENBLAS_CORETYPE", "SkylakeX")

import numpy as np  # noqa: E402


def cpu_model():
    return cpuinfo("model name") or platform.machine()


def faiss_blas():
    """The BLAS kernels faiss's own OpenBLAS picked on this CPU (its k-means is sgemm-bound)."""
    try:
        import faiss  # noqa: F401
        from threadpoolctl import threadpool_info
    except ImportError:
        return "faiss not installed"
    return ", ".join(f"{info['internal_api']} {info.get('architecture')}" for info in threadpool_info()
                     if "faiss" in info["filepath"] and info["internal_api"] != "openmp") or "unknown"


def mixture(n, d, components, seed):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(components, d)).astype(np.float32)
    x = centres[rng.integers(0, components, n)] + 0.6 * rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def objective(x, centroids):
    """Exact sum of squared distances to the nearest centroid (float64 accumulation)."""
    import tensorflow as tf

    c = tf.constant(centroids, tf.float32)
    half = 0.5 * tf.reduce_sum(c * c, axis=1)
    total = 0.0
    for start in range(0, len(x), 8192):
        tile = x[start:start + 8192]
        nearest = tf.argmax(tf.matmul(tile, c, transpose_b=True) - half, axis=1).numpy()
        total += np.sum(np.square(tile - centroids[nearest]), dtype=np.float64)
    return float(total)


def run_keras_pcl(x, k, fixed_init=None, jit=False, points_per_centroid=None, seed=0):
    from keras_pcl import clustering

    options = dict(seed=seed, jit_compile=True if jit else "auto")
    if points_per_centroid:
        options.update(max_points_per_centroid=points_per_centroid)
    if fixed_init is not None:
        options.update(init=fixed_init, tol=0.0, num_iters=20, max_points_per_centroid=None)
    start = time.perf_counter()
    centroids, _, info = clustering.kmeans(x, k, return_info=True, **options)
    return time.perf_counter() - start, centroids, int(info["iterations"])


def run_faiss(x, k, fixed_init=None, assign=False, seed=0):
    import faiss

    d = x.shape[1]
    if fixed_init is None:
        km = faiss.Kmeans(d, k, seed=1234 + seed)
        start = time.perf_counter()
        km.train(x)
    else:
        km = faiss.Kmeans(d, k, niter=20, max_points_per_centroid=len(x), seed=1234)
        start = time.perf_counter()
        km.train(x, init_centroids=fixed_init)
    if assign:  # the E-step needs every point's cluster: the reference's index.search(x, 1)
        km.index.search(x, 1)
    return time.perf_counter() - start, km.centroids, len(km.obj)


def run_sklearn(x, k, fixed_init=None, seed=0):
    from sklearn.cluster import KMeans

    if fixed_init is None:
        km = KMeans(k, n_init=1, random_state=seed)
    else:
        km = KMeans(k, init=fixed_init, n_init=1, max_iter=20, tol=0.0, algorithm="lloyd")
    start = time.perf_counter()
    km.fit(x)
    return time.perf_counter() - start, km.cluster_centers_.astype(np.float32), int(km.n_iter_)


RUNNERS = {  # each called as runner(x, k, fixed_init=None, seed=0)
    "keras_pcl": run_keras_pcl,
    "keras_pcl_xla": functools.partial(run_keras_pcl, jit=True),
    # keras_pcl's default is the PCL reference's 1000 training points per centroid;
    # this row samples like faiss.Kmeans' default (256), for a like-for-like headline.
    "keras_pcl_256": functools.partial(run_keras_pcl, points_per_centroid=256),
    "faiss": run_faiss,
    # faiss' train() returns centroids only; keras_pcl's kmeans also returns every
    # point's assignment, which the E-step needs. This row adds faiss' search for it.
    "faiss_assign": functools.partial(run_faiss, assign=True),
    "sklearn": run_sklearn,
}


def resident_mib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024


def memory_child(spec):
    """One call in this (fresh) process; prints `peak_extra_mib seconds`."""
    method, n, k, d = spec.split(",")
    n, k, d = int(n), int(k), int(d)
    if method.startswith("keras_pcl"):
        import tensorflow  # noqa: F401  (imported before the baseline, like the data)
        from keras_pcl import clustering  # noqa: F401
    x = mixture(n, d, 2000, seed=n)
    if method.startswith("faiss"):
        import faiss  # noqa: F401
    if method == "sklearn":
        import sklearn.cluster  # noqa: F401
    before = resident_mib("VmRSS")
    seconds = RUNNERS[method](x, k)[0]
    print(f"{resident_mib('VmHWM') - before:.0f} {seconds:.2f}")


def memory_table(args):
    import subprocess
    import sys

    print(f"# {cpu_model()}: extra peak resident memory of one default call, fresh process each")
    for n in (int(v) for v in args.n.split(",")):
        for k in (int(v) for v in args.k.split(",")):
            for method in args.methods.split(","):
                if method == "sklearn" and k > 1000:
                    print(f"N={n:>6} K={k:>5} {method:<14} skipped (over 10 minutes at K=10000, see above)")
                    continue
                result = subprocess.run([sys.executable, __file__, f"--memory_child={method},{n},{k},{args.d}"],
                                        capture_output=True, text=True, check=True)
                extra, seconds = result.stdout.split()[-2:]
                print(f"N={n:>6} K={k:>5} {method:<14} peak +{extra:>6} MiB  ({seconds} s; data "
                      f"{n * args.d * 4 / 2**20:.0f} MiB, N x K float32 would be {n * k * 4 / 2**20:.0f} MiB)",
                      flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", default="50000", help="comma list of N")
    parser.add_argument("--k", default="1000,10000", help="comma list of K")
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per method (and per seed), alternating")
    parser.add_argument("--seeds", type=int, default=1,
                        help="defaults mode: run each method from this many seeds (its own initial centroids and "
                             "subsample); report the median time and the mean objective")
    parser.add_argument("--methods", default="keras_pcl,keras_pcl_xla,faiss,sklearn")
    parser.add_argument("--modes", default="defaults,fixed")
    parser.add_argument("--json", default="", help="also write the rows to this file")
    parser.add_argument("--memory", action="store_true", help="peak-memory table instead of timings")
    parser.add_argument("--memory_child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        return memory_child(args.memory_child)
    if args.memory:
        return memory_table(args)

    import tensorflow as tf

    from keras_pcl import clustering

    print(f"# {cpu_model()}, {os.cpu_count()} cores, TF {tf.__version__}, keras_pcl default path: "
          f"jit={clustering.resolve_jit_compile('auto')} (on CPU XLA for K <= 128 over >= 20k points), "
          f"graph-mode matmul={clustering.resolve_matmul_dtype('auto', False).name}")
    methods = args.methods.split(",")
    if any(method.startswith("faiss") for method in methods):
        print(f"# faiss BLAS kernels: {faiss_blas()} (OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', 'unset')})")
    rows = []
    for n in (int(v) for v in args.n.split(",")):
        x = mixture(n, args.d, 2000, seed=n)
        for k in (int(v) for v in args.k.split(",")):
            # Under 5 points per cluster is not a clustering workload (10 k x 10 k); issue 4's
            # grid keeps 50 k x 10 k (5 per cluster), measured in bench/RESULTS.md section 2.
            if k * 5 > n:
                print(f"N={n:>6} K={k:>5} skipped: fewer than 5 points per cluster")
                continue
            init = x[np.random.default_rng(k).choice(n, k, replace=False)]
            for mode in args.modes.split(","):
                fixed = init if mode == "fixed" else None
                # At defaults each library draws its own initial centroids, so one draw's
                # objective is luck; --seeds averages it. Fixed mode shares one init.
                seeds = range(args.seeds) if mode == "defaults" else [0]
                times, objectives, iters = ({m: [] for m in methods} for _ in range(3))
                last = {}
                for seed in seeds:
                    # One untimed call per method and seed on the same data: tracing/compilation
                    # is not timed (the E-step traces once and reuses the graph every epoch).
                    for method in methods:
                        RUNNERS[method](x, k, fixed, seed=seed)
                    for _ in range(args.repeats):
                        for method in methods:  # alternate methods within each repeat
                            seconds, centroids, iterations = RUNNERS[method](x, k, fixed, seed=seed)
                            times[method].append(seconds)
                            last[method] = centroids, iterations
                    for method in methods:  # each seed's run is deterministic: score the last repeat
                        objectives[method].append(objective(x, last[method][0]))
                        iters[method].append(last[method][1])
                stats = {m: dict(seconds=statistics.median(times[m]), objective=statistics.mean(objectives[m]))
                         for m in methods}
                faiss = stats.get("faiss")
                for method in methods:
                    obj = stats[method]["objective"]
                    row = dict(n=n, k=k, mode=mode, method=method, seconds=stats[method]["seconds"],
                               iterations=statistics.median(iters[method]), seeds=len(seeds),
                               all_seconds=[round(t, 3) for t in times[method]], objective=obj,
                               all_objectives=[round(o, 2) for o in objectives[method]])
                    spread = (max(objectives[method]) - min(objectives[method])) / obj
                    if faiss:
                        row["time_vs_faiss"] = row["seconds"] / faiss["seconds"]
                        row["objective_vs_faiss"] = obj / faiss["objective"] - 1 if faiss["objective"] else 0.0
                    rows.append(row)
                    print(f"N={n:>6} K={k:>5} {mode:<8} {row['method']:<14} {row['seconds']:>8.3f} s  "
                          f"{row['iterations']:>4g} it ({1000 * row['seconds'] / max(row['iterations'], 1):6.0f} ms/it)  "
                          f"objective {obj:.1f}"
                          + (f" (mean of {len(seeds)} seeds, spread {100 * spread:.2f}%)" if len(seeds) > 1 else "")
                          + (f"  time/faiss {row['time_vs_faiss']:.2f}x  objective vs faiss "
                             f"{100 * row['objective_vs_faiss']:+.2f}%" if faiss else ""), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
