"""Train-step throughput: keras_pcl's PCL step vs a PyTorch peer, alternately in one run.

    pip install -e ".[bench]"
    python bench/train_step_bench.py --steps=4 --rounds=2

The step: PCL with ResNet-18 (CIFAR stem), 32x32x3, global batch 256,
queue 16384, momentum encoder, InfoNCE + ProtoNCE over 3 granularities
(250/500/1000 prototypes, exact softmax). keras_pcl runs in fp32 graph mode,
with `jit_compile=True`, and under `mixed_bfloat16`, with its default split
BatchNorm (the shuffle-BN replacement) and, as `keras_bn_*`, with plain
BatchNorm like the peer's; the peer in fp32 and
under `torch.autocast("cpu", dtype=torch.bfloat16)`. Each configuration is
timed for `--steps` steps after 2 untimed ones, and the configurations
alternate for `--rounds` rounds; images/s is the median over rounds.
The roofline column divides the achieved FLOP rate (4.4 GFLOP per image:
forward + backward of the query encoder and forward of the key encoder, as
counted for issue 4) by the peak matmul rate of this machine for that
precision, measured at start (a 4096^2 matmul in TF graph mode), or given
with `--peak_fp32` / `--peak_bf16` in GFLOP/s.
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

BATCH, SIZE, QUEUE, CLUSTERS = 256, 32, 16384, (250, 500, 1000)
NUM_SAMPLES = 50000


# The step, and the Fashion-MNIST config's (small ResNet, 28x28x1, MLP 512, queue 4096).
STEPS = {
    "resnet18": dict(shape=(SIZE, SIZE, 3), hidden=2048, queue=QUEUE, clusters=CLUSTERS),
    "small_resnet": dict(shape=(28, 28, 1), hidden=512, queue=4096, clusters=(50, 100, 200)),
}


def keras_step_runner(precision, jit, norm="split", encoder="resnet18", symmetric=False):
    import keras
    import tensorflow as tf

    import keras_pcl
    from keras_pcl import backbones

    spec = STEPS[encoder]
    keras.mixed_precision.set_global_policy("mixed_bfloat16" if precision == "bf16" else "float32")
    model = keras_pcl.PCL(getattr(backbones, encoder)(spec["shape"], norm=norm), backbones.mlp_head(128, spec["hidden"]),
                          num_samples=NUM_SAMPLES, num_clusters=spec["clusters"], warmup_epochs=0,
                          queue_size=spec["queue"], momentum=0.999, temperature=0.2, symmetric=symmetric)
    rng = np.random.default_rng(0)
    results = []
    for k in spec["clusters"]:
        prototypes = rng.normal(size=(k, 128)).astype(np.float32)
        results.append((prototypes / np.linalg.norm(prototypes, axis=1, keepdims=True),
                        np.full(k, 0.2, np.float32), rng.integers(0, k, NUM_SAMPLES)))
    model.set_prototypes(results)
    model.compile(optimizer=keras.optimizers.SGD(0.03, momentum=0.9, weight_decay=1e-4), jit_compile=jit)
    keras.mixed_precision.set_global_policy("float32")
    views = tf.random.uniform([2, BATCH, *spec["shape"]])
    batch = ((views[0], views[1]), tf.range(BATCH))
    model.make_train_function()  # Keras' compiled train function over an iterator
    step = model.train_function

    def run(steps):
        iterator = iter(tf.data.Dataset.from_tensors(batch).repeat(steps))
        start = time.perf_counter()
        for _ in range(steps):
            logs = step(iterator)
        float(logs["loss"])  # wait for the last step
        return time.perf_counter() - start

    return run


def torch_step_runner(precision):
    import torch

    from torch_pcl_peer import PCLStep

    torch.manual_seed(0)
    model = PCLStep(NUM_SAMPLES, CLUSTERS, queue_size=QUEUE)
    view1, view2 = torch.rand(BATCH, 3, SIZE, SIZE), torch.rand(BATCH, 3, SIZE, SIZE)
    index = torch.arange(BATCH)

    def run(steps):
        start = time.perf_counter()
        for _ in range(steps):
            model.step(view1, view2, index, autocast=precision == "bf16")
        return time.perf_counter() - start

    return run


def best_seconds(call, repeats):
    """Fastest of `repeats` timed calls, after one untimed call."""
    call()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


def measure_peak(size=4096, repeats=5):
    """Best TF graph-mode matmul rate (GFLOP/s) on this machine, fp32 and bf16."""
    import tensorflow as tf

    peaks = {}
    for name, dtype in (("fp32", tf.float32), ("bf16", tf.bfloat16)):
        a = tf.cast(tf.random.normal([size, size]), dtype)
        matmul = tf.function(lambda x, y: tf.reduce_sum(tf.cast(tf.matmul(x, y)[:1, :1], tf.float32)))
        peaks[name] = 2 * size ** 3 / best_seconds(lambda: matmul(a, a).numpy(), repeats) / 1e9
    return peaks


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--configs", default="torch_fp32,keras_fp32,keras_xla_fp32,torch_bf16,keras_bf16")
    parser.add_argument("--gflop_per_image", type=float, default=4.4)
    parser.add_argument("--peak_fp32", type=float, default=0.0, help="GFLOP/s; 0 measures it here")
    parser.add_argument("--peak_bf16", type=float, default=0.0, help="GFLOP/s; 0 measures it here")
    args = parser.parse_args()

    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import tensorflow as tf
    import torch

    torch.set_num_threads(os.cpu_count())
    print(f"# {os.cpu_count()} cores, TF {tf.__version__}, torch {torch.__version__}, batch {BATCH}, "
          f"{SIZE}x{SIZE}x3, queue {QUEUE}, prototypes {CLUSTERS}")
    builders = {
        "torch_fp32": lambda: torch_step_runner("fp32"),
        "torch_bf16": lambda: torch_step_runner("bf16"),
        "keras_fp32": lambda: keras_step_runner("fp32", False),
        "keras_xla_fp32": lambda: keras_step_runner("fp32", True),
        "keras_bf16": lambda: keras_step_runner("bf16", False),
        # Like-for-like with the peer's plain BatchNorm (keras_pcl's default is split BN):
        "keras_bn_fp32": lambda: keras_step_runner("fp32", False, "batch"),
        "keras_bn_bf16": lambda: keras_step_runner("bf16", False, "batch"),
    }
    if not args.peak_fp32 or not args.peak_bf16:
        peaks = measure_peak()
        args.peak_fp32 = args.peak_fp32 or peaks["fp32"]
        args.peak_bf16 = args.peak_bf16 or peaks["bf16"]
    print(f"# peak matmul (TF graph, 4096^2): fp32 {args.peak_fp32:.0f} GFLOP/s, bf16 {args.peak_bf16:.0f} GFLOP/s")
    configs = args.configs.split(",")
    runners = {}
    for name in configs:
        runners[name] = builders[name]()
        runners[name](2)  # trace / compile / warm up
    rates = {name: [] for name in configs}
    for round_ in range(args.rounds):
        for name in configs:
            seconds = runners[name](args.steps)
            rates[name].append(args.steps * BATCH / seconds)
            print(f"round {round_ + 1} {name:<15} {rates[name][-1]:7.1f} images/s", flush=True)
    print()
    print(f"{'config':<15}{'images/s':>10}{'vs torch':>10}{'roofline':>10}")
    for name in configs:
        rate = statistics.median(rates[name])
        peer = "torch_bf16" if name.endswith("bf16") else "torch_fp32"
        ratio = rate / statistics.median(rates[peer]) if peer in rates and not name.startswith("torch") else None
        peak = args.peak_bf16 if name.endswith("bf16") else args.peak_fp32
        roofline = rate * args.gflop_per_image / peak
        print(f"{name:<15}{rate:>10.1f}{(f'{ratio:.2f}x' if ratio else '-'):>10}{100 * roofline:>9.0f}%")


if __name__ == "__main__":
    main()
