"""k-means' init="auto" threshold: k-means++ against random initial centroids, by K.

    python bench/kmeans_init.py --n=60000 --k=16,32,64,128,256,512 --seeds=3

k-means++ costs K sequential passes over the training points (greedy: 2 + ln K
candidates each); random init costs nothing but may start far from a good solution. For
each K, on the E-step's kind of data (L2-normalised Gaussian-mixture points, d = 128)
and on well-separated blobs (K Gaussian blobs in d = 16, where random init gets stuck),
both inits run at defaults otherwise (early stop, 1 000 training points per centroid),
alternately over `--seeds` seeds; printed are the median time of the whole call, the
seeding's share of it, and the mean objective. scikit-learn's objective (k-means++,
n_init=10) is the reference on the blobs. keras_pcl's init="auto" uses k-means++ for
K <= AUTO_KMEANS_PLUS_PLUS_MAX_CLUSTERS.
"""

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kmeans_bench import cpu_model, mixture  # noqa: E402


def blobs(n, k, seed):
    from sklearn.datasets import make_blobs

    x, _ = make_blobs(n, n_features=16, centers=k, cluster_std=0.6, center_box=(-10 * k ** 0.5, 10 * k ** 0.5),
                      random_state=seed)
    return x.astype(np.float32)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=60000)
    parser.add_argument("--k", default="16,32,64,128,256,512")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    import tensorflow as tf
    from sklearn.cluster import KMeans

    from keras_pcl import clustering

    print(f"CPU: {cpu_model()}; N={args.n}; auto uses k-means++ up to "
          f"K={clustering.AUTO_KMEANS_PLUS_PLUS_MAX_CLUSTERS}", flush=True)
    for kind in ("mixture", "blobs"):
        for k in map(int, args.k.split(",")):
            x = mixture(args.n, 128, 2000, seed=k) if kind == "mixture" else blobs(args.n, k, seed=k)
            seeding = tf.function(lambda p, s: clustering._kmeans_plus_plus(p, k, s))
            train = x[:min(len(x), 1000 * k)]
            seeding(train, 0)  # traced once
            times = {"random": [], "k-means++": []}
            objectives = {"random": [], "k-means++": []}
            seed_times = []
            for seed in range(args.seeds):
                for init in times:
                    clustering.kmeans(x, k, seed=seed, init=init)  # tracing is not timed
                    start = time.perf_counter()
                    _, _, info = clustering.kmeans(x, k, seed=seed, init=init, return_info=True)
                    times[init].append(time.perf_counter() - start)
                    objectives[init].append(float(info["objective"]))
                start = time.perf_counter()
                seeding(train, seed).numpy()
                seed_times.append(time.perf_counter() - start)
            line = f"{kind} K={k}: " + "; ".join(
                f"{init} {statistics.median(times[init]):.2f} s, objective {np.mean(objectives[init]):.6g} "
                f"(max/min {max(objectives[init]) / min(objectives[init]):.3f})" for init in times)
            line += f"; k-means++ seeding alone {statistics.median(seed_times):.2f} s"
            if kind == "blobs":
                line += f"; scikit-learn {KMeans(k, n_init=10, random_state=0).fit(x).inertia_:.6g}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
