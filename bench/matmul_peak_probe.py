"""Peak square-matmul rate here, TF graph mode and PyTorch, fp32 and bf16 (the roofline's denominator).

    python bench/matmul_peak_probe.py --sizes=2048,4096,8192 --repeats=5

Prints the best of `--repeats` timed calls (after one untimed) per library, precision and
size, alternating libraries, in GFLOP/s (2 n^3 per matmul). train_step_bench.py measures
only TF at 4096; this shows whether a larger matrix or the other library gets closer to
the peaks issue 4 quotes for this machine (295 fp32, 1 240 bf16).
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def best_seconds(call, repeats):
    call()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2048,4096,8192")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import tensorflow as tf
    import torch

    tf_matmul = tf.function(lambda x: tf.reduce_sum(tf.cast(tf.matmul(x, x)[:1, :1], tf.float32)))
    print(f"# {os.cpu_count()} cores, TF {tf.__version__}, torch {torch.__version__}")
    print(f"{'size':>6} {'precision':>9} {'TF graph':>10} {'torch':>10}  GFLOP/s")
    for size in map(int, args.sizes.split(",")):
        for precision, tf_dtype, torch_dtype in (("fp32", tf.float32, torch.float32),
                                                 ("bf16", tf.bfloat16, torch.bfloat16)):
            a_tf = tf.cast(tf.random.normal([size, size]), tf_dtype)
            a_torch = torch.randn(size, size).to(torch_dtype)
            flop = 2 * size ** 3
            tf_rate = flop / best_seconds(lambda: tf_matmul(a_tf).numpy(), args.repeats) / 1e9
            torch_rate = flop / best_seconds(lambda: float((a_torch @ a_torch)[0, 0]), args.repeats) / 1e9
            print(f"{size:>6} {precision:>9} {tf_rate:>10.0f} {torch_rate:>10.0f}", flush=True)


if __name__ == "__main__":
    main()
