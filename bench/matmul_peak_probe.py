"""Peak square-matmul rate here, TF graph mode and PyTorch, fp32 and bf16 (the roofline's denominator).

    python bench/matmul_peak_probe.py --sizes=2048,4096,8192 --repeats=5

Prints the best of `--repeats` timed calls (after one untimed) per library, precision and
size, in GFLOP/s (2 n^3 per matmul); per size TF runs first (train_step_bench.py's
`measure_peak`, which that bench uses at 4096 only), then PyTorch. This shows whether a
larger matrix or the other library gets closer to the peaks issue 4 quotes for this
machine (295 fp32, 1 240 bf16).
"""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2048,4096,8192")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import tensorflow as tf
    import torch

    from train_step_bench import best_seconds, measure_peak

    print(f"# {os.cpu_count()} cores, TF {tf.__version__}, torch {torch.__version__}")
    print(f"{'size':>6} {'precision':>9} {'TF graph':>10} {'torch':>10}  GFLOP/s")
    for size in map(int, args.sizes.split(",")):
        tf_rates = measure_peak(size, args.repeats)
        for precision, torch_dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            a = torch.randn(size, size).to(torch_dtype)
            torch_rate = 2 * size ** 3 / best_seconds(lambda: float((a @ a)[0, 0]), args.repeats) / 1e9
            print(f"{size:>6} {precision:>9} {tf_rates[precision]:>10.0f} {torch_rate:>10.0f}", flush=True)


if __name__ == "__main__":
    main()
