"""keras_pcl k-means now vs at an earlier git revision, side by side in one run.

    python bench/kmeans_ab.py --base=dcc0dd1 --cases=200000x100,50000x1000,50000x10000

Loads `keras_pcl/clustering.py` as it was at `--base` (git show) beside the working
tree's, runs both alternately on the same data and initial centroids for 20 fixed
Lloyd iterations (all points, no early stop), and prints median times, their ratio and
both objectives. Meant for per-iteration changes; see kmeans_bench.py for peers.
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
from kmeans_bench import mixture  # noqa: E402


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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="git revision to compare with")
    parser.add_argument("--cases", default="200000x100,50000x1000,50000x10000", help="comma list of NxK")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from keras_pcl import clustering

    versions = {"base": load_revision(args.base), "now": clustering}
    for case in args.cases.split(","):
        n, k = map(int, case.split("x"))
        x = mixture(n, 128, 2000, seed=n)
        init = x[np.random.default_rng(k).choice(n, k, replace=False)]
        options = dict(init=init, tol=0.0, num_iters=20, max_points_per_centroid=None, return_info=True)
        for module in versions.values():  # tracing is not timed
            module.kmeans(x, k, **options)
        times, objectives = {name: [] for name in versions}, {}
        for _ in range(args.repeats):
            for name, module in versions.items():
                start = time.perf_counter()
                _, _, info = module.kmeans(x, k, **options)
                times[name].append(time.perf_counter() - start)
                objectives[name] = float(info["objective"])
        base, now = statistics.median(times["base"]), statistics.median(times["now"])
        print(f"N={n} K={k} 20 it: {args.base} {base:.2f} s, now {now:.2f} s, now/base {now / base:.2f}x; "
              f"objective {objectives['base']:.2f} vs {objectives['now']:.2f}", flush=True)


if __name__ == "__main__":
    main()
