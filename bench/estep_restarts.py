"""The E-step's k-means restarts: 1 (keras_pcl's default) against the reference's 5 (faiss nredo=5).

    python bench/estep_restarts.py --n=60000 --k=50,100,200 --repeats=3

For the Fashion-MNIST config's granularities, on L2-normalised Gaussian-mixture features
(d = 128, the E-step's input), `PrototypeUpdate`'s k-means (init="random", as the reference)
with 1 and 5 restarts, alternately: median time of the clustering and the objective of
the kept restart, per K and summed. The quality-table effect is not measured here.
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kmeans_bench import cpu_model, mixture  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=60000)
    parser.add_argument("--k", default="50,100,200")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from keras_pcl import clustering

    x = mixture(args.n, 128, 2000, seed=1)
    print(f"CPU: {cpu_model()}; N={args.n}, d=128", flush=True)
    for k in map(int, args.k.split(",")):
        times, objectives = {1: [], 5: []}, {1: [], 5: []}
        for restarts in times:  # tracing is not timed
            clustering.kmeans(x, k, num_restarts=restarts, init="random")
        for seed in range(args.repeats):
            for restarts in times:
                start = time.perf_counter()
                _, _, info = clustering.kmeans(x, k, num_restarts=restarts, init="random", seed=seed,
                                               return_info=True)
                times[restarts].append(time.perf_counter() - start)
                objectives[restarts].append(float(info["objective"]))
        one, five = statistics.median(times[1]), statistics.median(times[5])
        gain = 1 - statistics.mean(objectives[5]) / statistics.mean(objectives[1])
        print(f"K={k}: 1 restart {one:.2f} s, 5 restarts {five:.2f} s ({five / one:.1f}x); objective "
              f"{statistics.mean(objectives[1]):.6g} vs {statistics.mean(objectives[5]):.6g} "
              f"(5 restarts {100 * gain:.2f} % lower)", flush=True)


if __name__ == "__main__":
    main()
