"""Where keras_pcl's bf16 train step loses to PyTorch: the three convolution kernels, one by one.

    python bench/conv_bf16_probe.py

For each 3x3 convolution shape of ResNet-18's CIFAR stages at batch 256 (NHWC in TF,
NCHW in PyTorch, each library's native layout), times the forward convolution, the
gradient with respect to the input and the gradient with respect to the filter, in
float32 and bfloat16, TF (graph mode, `tf.raw_ops` Conv2D / Conv2DBackpropInput /
Conv2DBackpropFilter) against PyTorch (`aten.convolution` / `convolution_backward`),
alternating, median of `--repeats`. Prints milliseconds and TF / PyTorch ratios.
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import torch  # noqa: E402

SHAPES = [(32, 64), (16, 128), (8, 256), (4, 512)]  # (spatial side, channels) of ResNet-18 (CIFAR)


def timed(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def tf_ops(side, channels, batch, dtype):
    x = tf.constant(np.random.rand(batch, side, side, channels), dtype)
    w = tf.constant(np.random.rand(3, 3, channels, channels) * 0.01, dtype)
    dy = tf.constant(np.random.rand(batch, side, side, channels), dtype)
    strides, pad = [1, 1, 1, 1], "SAME"
    forward = tf.function(lambda: tf.raw_ops.Conv2D(input=x, filter=w, strides=strides, padding=pad))
    grad_input = tf.function(lambda: tf.raw_ops.Conv2DBackpropInput(
        input_sizes=tf.shape(x), filter=w, out_backprop=dy, strides=strides, padding=pad))
    grad_filter = tf.function(lambda: tf.raw_ops.Conv2DBackpropFilter(
        input=x, filter_sizes=tf.shape(w), out_backprop=dy, strides=strides, padding=pad))
    return {name: (lambda f=f: f().numpy()) for name, f in
            (("forward", forward), ("grad input", grad_input), ("grad filter", grad_filter))}


def torch_ops(side, channels, batch, dtype):
    x = torch.rand(batch, channels, side, side, dtype=dtype)
    w = torch.rand(channels, channels, 3, 3, dtype=dtype) * 0.01
    dy = torch.rand(batch, channels, side, side, dtype=dtype)

    def backward(mask):
        return lambda: torch.ops.aten.convolution_backward(
            dy, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, mask)

    with torch.no_grad():
        return {"forward": lambda: torch.nn.functional.conv2d(x, w, padding=1),
                "grad input": backward([True, False, False]), "grad filter": backward([False, True, False])}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    print(f"# TF {tf.__version__}, torch {torch.__version__}, batch {args.batch}, ms (median of {args.repeats})")
    totals = {}
    for precision, tf_dtype, torch_dtype in (("fp32", tf.float32, torch.float32), ("bf16", tf.bfloat16, torch.bfloat16)):
        for side, channels in SHAPES:
            ops_tf, ops_torch = tf_ops(side, channels, args.batch, tf_dtype), torch_ops(side, channels, args.batch, torch_dtype)
            for name in ops_tf:
                times = {"tf": [], "torch": []}
                for _ in range(2):  # alternate libraries
                    times["tf"].append(timed(ops_tf[name], args.repeats))
                    with torch.no_grad():
                        times["torch"].append(timed(ops_torch[name], args.repeats))
                t_tf, t_torch = min(times["tf"]), min(times["torch"])
                for lib, t in (("tf", t_tf), ("torch", t_torch)):
                    totals[(precision, name, lib)] = totals.get((precision, name, lib), 0.0) + t
                print(f"{precision} {side:>2}x{side:<2} c={channels:<3} {name:<11} TF {t_tf:8.1f}  torch {t_torch:8.1f}"
                      f"  TF/torch {t_tf / t_torch:5.2f}", flush=True)
    print("# sums over the four shapes")
    for precision in ("fp32", "bf16"):
        for name in ("forward", "grad input", "grad filter"):
            a, b = totals[(precision, name, "tf")], totals[(precision, name, "torch")]
            print(f"{precision} {name:<11} TF {a:8.1f}  torch {b:8.1f}  TF/torch {a / b:5.2f}")


if __name__ == "__main__":
    main()
