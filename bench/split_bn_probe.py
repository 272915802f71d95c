"""What split BatchNorm costs per layer, and whether one fused kernel over all groups is cheaper.

    python bench/split_bn_probe.py --rounds=7

`SplitBatchNormalization(8)` (keras_pcl's shuffle-BN replacement) runs TF's fused
batch-norm kernel once per sub-batch and concatenates the outputs. The alternative
timed here moves the group axis into the channels ([B, H, W, C] -> [B/8, H, W, 8*C],
two transposes) so that a single fused kernel computes the same per-group statistics.
For each activation shape of ResNet-18 (CIFAR stem, batch 256) and of the Fashion-MNIST
small ResNet, in float32 and bfloat16: forward plus backward (input, gamma and beta
gradients) of the split layer, the transposed variant, and plain BN (`num_splits=1`),
alternating within each round, median over rounds. Also prints the largest difference
between the split layer's and the transposed variant's outputs (they compute the same
statistics; bf16 rounding aside, it should be ~0).
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

from keras_pcl.backbones import SplitBatchNormalization  # noqa: E402

SHAPES = [(32, 64), (16, 128), (8, 256), (4, 512),  # ResNet-18 (CIFAR stem) stages
          (28, 32), (14, 64), (7, 128)]  # the small ResNet on 28x28 Fashion-MNIST


def grouped_channels_bn(x, gamma, beta, groups, epsilon=1e-5):
    """Per-group batch statistics through one fused kernel: groups moved into channels."""
    batch, height, width, channels = x.shape
    per_group = batch // groups
    x = tf.reshape(x, [groups, per_group, height, width, channels])
    x = tf.reshape(tf.transpose(x, [1, 2, 3, 0, 4]), [per_group, height, width, groups * channels])
    empty = tf.zeros([0], tf.float32)
    y, *_ = tf.raw_ops.FusedBatchNormV3(x=x, scale=tf.tile(gamma, [groups]), offset=tf.tile(beta, [groups]),
                                        mean=empty, variance=empty, epsilon=epsilon, is_training=True)
    y = tf.reshape(y, [per_group, height, width, groups, channels])
    return tf.reshape(tf.transpose(y, [3, 0, 1, 2, 4]), [batch, height, width, channels])


def forward_backward(forward, variables, x, upstream):
    @tf.function
    def step():
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = forward(x)
        return tape.gradient(y, [x] + variables, output_gradients=upstream)

    return lambda: [g.numpy() for g in step()]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    print(f"# TF {tf.__version__}, batch {args.batch}, {args.groups} groups, forward+backward ms "
          f"(median of {args.rounds} alternating rounds)")
    totals = {}
    for dtype in (tf.float32, tf.bfloat16):
        for side, channels in SHAPES:
            shape = (args.batch, side, side, channels)
            x = tf.cast(tf.random.normal(shape, seed=1), dtype)
            upstream = tf.cast(tf.random.normal(shape, seed=2), dtype)
            # The model's policy: bfloat16 activations, float32 statistics and parameters.
            policy = "mixed_bfloat16" if dtype == tf.bfloat16 else "float32"
            split = SplitBatchNormalization(args.groups, dtype=policy)
            plain = SplitBatchNormalization(1, dtype=policy)
            split.build(shape)
            plain.build(shape)
            split.gamma.assign(tf.random.uniform([channels], 0.5, 1.5, seed=3))
            split.beta.assign(tf.random.normal([channels], seed=4))
            variants = {
                "split": forward_backward(lambda t: split(t, training=True), [split.gamma, split.beta], x, upstream),
                "transposed": forward_backward(
                    lambda t: grouped_channels_bn(t, split.gamma, split.beta, args.groups),
                    [split.gamma, split.beta], x, upstream),
                "plain": forward_backward(lambda t: plain(t, training=True), [plain.gamma, plain.beta], x, upstream),
            }
            difference = float(tf.reduce_max(tf.abs(
                tf.cast(split(x, training=True), tf.float32)
                - tf.cast(grouped_channels_bn(x, split.gamma, split.beta, args.groups), tf.float32))))
            times = {name: [] for name in variants}
            for call in variants.values():
                call()  # trace and warm up
            for _ in range(args.rounds):
                for name, call in variants.items():
                    start = time.perf_counter()
                    call()
                    times[name].append(1000 * (time.perf_counter() - start))
            ms = {name: statistics.median(t) for name, t in times.items()}
            for name, value in ms.items():
                totals[(dtype.name, name)] = totals.get((dtype.name, name), 0.0) + value
            print(f"{dtype.name:<8} {side:>2}x{side:<2} c={channels:<3} " + "  ".join(
                f"{name} {value:6.2f}" for name, value in ms.items())
                + f"  split/plain {ms['split'] / ms['plain']:.2f}  transposed/split {ms['transposed'] / ms['split']:.2f}"
                + f"  max |split - transposed| {difference:.3g}", flush=True)
    print("# sums over the shapes")
    for dtype in ("float32", "bfloat16"):
        split, transposed, plain = (totals[(dtype, name)] for name in ("split", "transposed", "plain"))
        print(f"{dtype:<8} split {split:7.1f}  transposed {transposed:7.1f}  plain {plain:7.1f}  "
              f"split/plain {split / plain:.2f}  transposed/split {transposed / split:.2f}")


if __name__ == "__main__":
    main()
