"""keras_pcl k-means now vs at an earlier git revision (and faiss), side by side in one run.

    python bench/kmeans_ab.py --base=6794417 --cases=50000x1000,50000x10000 --data=mixture,blobs
    python bench/kmeans_ab.py --base=dcc0dd1 --mode=fixed --cases=200000x100,50000x1000

Loads `keras_pcl/clustering.py` as it was at `--base` (git show) beside the working
tree's and runs both, alternately, `--repeats` times on the same data; the median time
is reported. Two modes:

* `defaults` (the default): each version as a user calls it (`kmeans(x, K)`, its own
  init, early stop, the reference's subsample of 1 000 points per centroid), beside
  faiss-cpu at its defaults plus the `index.search` that assigns every point (keras_pcl
  returns the assignments too). For each: time, objective (sum of squared distances to
  the assigned centroid, float64) and the fraction of points whose assignment is not
  their nearest returned centroid (float64 distances on centred data; gaps below 1e-6 of
  the scale of the scores are ties);
* `fixed`: 20 Lloyd iterations from the same initial centroids, on all points, no early
  stop (per-iteration speed).

Data (`--data`): `mixture`, L2-normalised points of a Gaussian mixture (the E-step's
unit vectors, d = 128); `blobs`, the same mixture unnormalised, centres of norm ~30
(make_blobs-style features, where bfloat16 scores lose the most).
"""

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kmeans_bench import cpu_model, mixture  # noqa: E402  (also fixes faiss' OpenBLAS kernels)


def load_revision(revision):
    source = subprocess.run(["git", "show", f"{revision}:keras_pcl/clustering.py"], check=True,
                            capture_output=True, text=True).stdout
    path = os.path.join(tempfile.mkdtemp(), "clustering_base.py")
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location("clustering_base", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # AutoGraph looks the module up to convert its functions
    spec.loader.exec_module(module)
    return module


def dataset(kind, n, seed):
    x = mixture(n, 128, 2000, seed=seed)
    if kind == "mixture":
        return x
    rng = np.random.default_rng(seed + 1)
    centres = rng.normal(size=(2000, 128)).astype(np.float32) * (30 / np.sqrt(128))
    return centres[rng.integers(0, 2000, n)] + rng.normal(size=(n, 128)).astype(np.float32)


def exactness(x, centroids, assignments):
    """(objective, fraction of points not at their float64-nearest centroid beyond ties)."""
    import tensorflow as tf

    m = x.astype(np.float64).mean(0)
    c = tf.constant(centroids.astype(np.float64) - m)
    c_sq = tf.reduce_sum(c * c, axis=1)
    c_norm = float(tf.reduce_max(tf.sqrt(c_sq)))
    wrong, total = 0, 0.0
    for start in range(0, len(x), 8192):
        tile = tf.constant(x[start:start + 8192].astype(np.float64) - m)
        d2 = tf.reduce_sum(tile * tile, axis=1, keepdims=True) - 2 * tf.matmul(tile, c, transpose_b=True) + c_sq
        chosen = tf.gather(d2, assignments[start:start + 8192], batch_dims=1)
        scale = tf.norm(tile, axis=1) * c_norm + float(tf.reduce_max(c_sq))
        wrong += int(tf.reduce_sum(tf.cast(chosen - tf.reduce_min(d2, axis=1) > 1e-6 * scale, tf.int32)))
        total += float(tf.reduce_sum(tf.maximum(chosen, 0.0)))
    return total, wrong / len(x)


def run_faiss(x, k):
    import faiss

    km = faiss.Kmeans(x.shape[1], k, seed=1234)
    km.train(x)
    _, assignments = km.index.search(x, 1)
    return km.centroids, assignments[:, 0]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="git revision to compare with")
    parser.add_argument("--mode", choices=["defaults", "fixed"], default="defaults")
    parser.add_argument("--cases", default="50000x1000,50000x10000", help="comma list of NxK")
    parser.add_argument("--data", default="mixture", help="comma list of mixture, blobs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no_faiss", action="store_true", help="skip the faiss column (defaults mode)")
    args = parser.parse_args()
    from keras_pcl import clustering

    print(f"CPU: {cpu_model()}; base {args.base} vs the working tree; mode {args.mode}", flush=True)
    versions = {"base": load_revision(args.base), "now": clustering}
    runners = {name: (lambda x, k, module=module: module.kmeans(x, k)) for name, module in versions.items()}
    if args.mode == "defaults" and not args.no_faiss:
        runners["faiss"] = run_faiss
    for kind in args.data.split(","):
        for case in args.cases.split(","):
            n, k = map(int, case.split("x"))
            x = dataset(kind, n, seed=n)
            if args.mode == "fixed":
                init = x[np.random.default_rng(k).choice(n, k, replace=False)]
                options = dict(init=init, tol=0.0, num_iters=20, max_points_per_centroid=None)
                runners = {name: (lambda x, k, module=module: module.kmeans(x, k, **options))
                           for name, module in versions.items()}
            for run in runners.values():  # tracing is not timed
                run(x, k)
            times, outputs = {name: [] for name in runners}, {}
            for _ in range(args.repeats):
                for name, run in runners.items():
                    start = time.perf_counter()
                    outputs[name] = run(x, k)
                    times[name].append(time.perf_counter() - start)
            cells = []
            for name in runners:
                objective, wrong = exactness(x, *outputs[name])
                cells.append(f"{name} {statistics.median(times[name]):.2f} s, objective {objective:.6g}, "
                             f"not nearest {100 * wrong:.3f} %")
            ratio = statistics.median(times["now"]) / statistics.median(times["base"])
            extra = (f", now/faiss {statistics.median(times['now']) / statistics.median(times['faiss']):.2f}x"
                     if "faiss" in times else "")
            print(f"{kind} N={n} K={k}: " + "; ".join(cells) + f"; now/base {ratio:.2f}x{extra}", flush=True)


if __name__ == "__main__":
    main()
