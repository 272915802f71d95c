"""Train-step throughput: keras_pcl's PCL step vs a PyTorch peer, and each method vs lightly's.

    pip install -e ".[bench]"
    python bench/train_step_bench.py --steps=4 --rounds=2
    python bench/train_step_bench.py --methods=moco_v2,simclr,byol,simsiam,swav --steps=3 --rounds=2

Per-method mode (`--methods`): for each method, encoder (ResNet-18 with the CIFAR stem at
32x32x3, width 64; the small ResNet at 28x28x1, width 32) and precision, keras_pcl's
compiled train step (its model, optimizer and views built by experiments/run.py from the
method's Fashion-MNIST flagfile) against lightly's step (bench/lightly_peer.py: lightly's
heads, losses, momentum updates and LARS on a PyTorch copy of the encoder), batch 256,
alternating; the machine's matmul peak is measured in the same run.

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
import sys
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
    return compiled_step_timer(model, ((views[0], views[1]), tf.range(BATCH)))


def compiled_step_timer(model, batch):
    """`run(steps) -> seconds` of the model's compiled Keras train function on a fixed batch."""
    import tensorflow as tf

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


# Per method, keras_pcl vs lightly -------------------------------------------------------------
METHOD_ENCODERS = {"resnet18": dict(shape=(32, 32, 3), width=64), "small_resnet": dict(shape=(28, 28, 1), width=32)}


def method_config(method, encoder, precision):
    """experiments/run.py's resolved config for the method's Fashion-MNIST flagfile, on `encoder`."""
    import importlib.util

    from lightly_peer import CONFIGS

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "run.py")
    spec = importlib.util.spec_from_file_location("keras_pcl_run", path)
    run = sys.modules.get(spec.name)
    if run is None:
        run = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = run
        spec.loader.exec_module(run)
    flagfile = os.path.join(os.path.dirname(path), "configs", CONFIGS[method])
    spec_ = METHOD_ENCODERS[encoder]
    run.FLAGS.unparse_flags()
    run.FLAGS(["run.py", f"--flagfile={flagfile}", f"--encoder={encoder}", f"--width={spec_['width']}",
               f"--image_size={spec_['shape'][0]}", f"--batch_size={BATCH}",
               "--mixed_precision=" + ("mixed_bfloat16" if precision == "bf16" else "float32")])
    config, _ = run.resolve_config()
    return run, config


def method_views(config, shape, rng_seed=0):
    """Random views of the method's batch: 2 at the image size, and SwAV's small crops."""
    import tensorflow as tf

    small = int(config.get("num_small_crops") or 0) if config.method == "swav" else 0
    small_size = int(config.get("small_crop_size") or round(0.56 * shape[0])) if small else 0
    sizes = [shape[0]] * 2 + [small_size] * small
    return [tf.random.stateless_uniform([BATCH, size, size, shape[2]], [rng_seed, i]) for i, size in enumerate(sizes)]


def keras_method_runner(method, encoder, precision):
    import keras

    import keras_pcl
    from keras_pcl import data

    run, config = method_config(method, encoder, precision)
    shape = METHOD_ENCODERS[encoder]["shape"]
    keras.mixed_precision.set_global_policy(config.mixed_precision)
    images = np.zeros((NUM_SAMPLES, *shape), np.uint8)
    split = data.Split("bench", images, np.arange(NUM_SAMPLES) % 10, images[:10], np.arange(10))
    model = run.REGISTRY[config.method].build(keras_pcl, config, run.build_backbone(config, split, shape[0]), split)
    model.compile(optimizer=run.build_optimizer(keras, keras_pcl, config, config.learning_rate))
    keras.mixed_precision.set_global_policy("float32")
    return compiled_step_timer(model, {"views": tuple(method_views(config, shape)),
                                       "index": np.arange(BATCH, dtype=np.int32)})


def lightly_method_runner(method, encoder, precision):
    import torch

    from lightly_peer import CONFIGS, KerasSGD, build_method, lightly_lars, read_flagfile

    spec = METHOD_ENCODERS[encoder]
    cfg = read_flagfile(CONFIGS[method], [f"--encoder={encoder}", f"--width={spec['width']}"])
    cfg["method"] = method if method == "swav" else cfg.get("method")
    model, train_step = build_method(method, cfg, spec["shape"][2], 100, 10_000, spec["shape"][0])
    parameters = [p for p in model.parameters() if p.requires_grad]
    if cfg.get("optimizer") == "lars":
        optimizer = lightly_lars(model, float(cfg["learning_rate"]), 0.9, float(cfg["weight_decay"]))
    else:
        optimizer = KerasSGD(parameters, 0.9, float(cfg["weight_decay"]))
    shape = spec["shape"]
    small = int(cfg.get("num_small_crops", 0)) if method == "swav" else 0
    sizes = [shape[0]] * 2 + [int(cfg.get("small_crop_size", 16))] * small
    views = [torch.rand(BATCH, shape[2], size, size) for size in sizes]
    model.train()
    counter = [0]

    def run_steps(steps):
        start = time.perf_counter()
        for _ in range(steps):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = train_step(views, counter[0]).float()
            optimizer.zero_grad()
            loss.backward()
            if isinstance(optimizer, KerasSGD):
                optimizer.step(0.01, 0.01)
            else:
                optimizer.step()
            counter[0] += 1
        return time.perf_counter() - start

    return run_steps


def method_table(args):
    """keras_pcl's and lightly's step per method, encoder and precision, alternating in one run."""
    rows = []
    for encoder in args.encoders.split(","):
        for method in args.methods.split(","):
            for precision in ("fp32", "bf16"):
                runners = {"keras_pcl": Worker(f"keras_method:{method}:{encoder}:{precision}"),
                           "lightly": Worker(f"lightly_method:{method}:{encoder}:{precision}")}
                rates = {name: [] for name in runners}
                for _ in range(args.rounds):
                    for name, runner in runners.items():
                        rates[name].append(args.steps * BATCH / runner(args.steps))
                for runner in runners.values():
                    runner.close()
                keras_rate, lightly_rate = (statistics.median(rates[n]) for n in ("keras_pcl", "lightly"))
                rows.append((method, encoder, precision, keras_rate, lightly_rate))
                print(f"{method:<8} {encoder:<13} {precision}: keras_pcl {keras_rate:7.1f} images/s, lightly "
                      f"{lightly_rate:7.1f} images/s, {keras_rate / lightly_rate:.2f}x", flush=True)
    print()
    print("| method | encoder | precision | keras_pcl images/s | lightly images/s | keras_pcl / lightly |")
    print("|---|---|---|---|---|---|")
    for method, encoder, precision, k, l in rows:
        print(f"| {method} | {encoder} | {precision} | {k:.1f} | {l:.1f} | {k / l:.2f}x |")


# Each configuration in a process of its own -------------------------------------------------------
# TensorFlow and the torch 2.14 build the bench extra pins segfault when both run kernels in one
# process, so every configuration is a worker process; the parent runs them in turn, one at a
# time, and each times its own steps.

def build_runner(name):
    """The runner of a configuration name: a PCL-step config (`torch_fp32`, `keras_bf16`, ...) or
    `keras_method:METHOD:ENCODER:PRECISION` / `lightly_method:...`."""
    if ":" in name:
        kind, method, encoder, precision = name.split(":")
        return (keras_method_runner if kind == "keras_method" else lightly_method_runner)(method, encoder, precision)
    if name.startswith("torch"):
        import torch

        torch.set_num_threads(os.cpu_count())
        return torch_step_runner(name.split("_")[-1])
    precision, jit, norm = name.split("_")[-1], "_xla_" in name, "batch" if "_bn_" in name else "split"
    return keras_step_runner(precision, jit, norm)


def serve(name):
    """Worker side: builds the runner, warms it up, then answers each `STEPS` line with the seconds."""
    runner = build_runner(name)
    runner(2)  # trace / compile / warm up
    print("READY", flush=True)
    for line in sys.stdin:
        print(f"SECONDS {runner(int(line))}", flush=True)


class Worker:
    """Parent side: a configuration's worker process; `worker(steps)` returns the seconds it took."""

    def __init__(self, name):
        import subprocess

        self.name = name
        self.process = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", name],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._expect("READY")

    def _expect(self, prefix):
        for line in self.process.stdout:
            if line.startswith(prefix):
                return line[len(prefix):].strip()
        raise RuntimeError(f"worker {self.name} ended (exit {self.process.wait()})")

    def __call__(self, steps):
        self.process.stdin.write(f"{steps}\n")
        self.process.stdin.flush()
        return float(self._expect("SECONDS"))

    def close(self):
        self.process.stdin.close()
        self.process.wait()


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
    parser.add_argument("--methods", default="", help="per-method mode: comma list of moco_v2, simclr, byol, "
                        "simsiam, swav (keras_pcl vs lightly, each method's Fashion-MNIST flagfile)")
    parser.add_argument("--encoders", default="resnet18,small_resnet", help="per-method mode: encoders")
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    if args.worker:
        return serve(args.worker)
    import importlib.metadata

    import tensorflow as tf

    print(f"# {os.cpu_count()} cores, TF {tf.__version__}, torch {importlib.metadata.version('torch')}, batch {BATCH}, "
          f"{SIZE}x{SIZE}x3, queue {QUEUE}, prototypes {CLUSTERS}; each configuration in its own process")
    # keras_bn_*: like-for-like with the peer's plain BatchNorm (keras_pcl's default is split BN).
    known = ("torch_fp32", "torch_bf16", "keras_fp32", "keras_xla_fp32", "keras_bf16", "keras_bn_fp32", "keras_bn_bf16")
    if not args.peak_fp32 or not args.peak_bf16:
        peaks = measure_peak()
    if args.methods:
        print(f"# peak matmul (TF graph, 4096^2): fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s")
        return method_table(args)
    if not args.peak_fp32 or not args.peak_bf16:
        args.peak_fp32 = args.peak_fp32 or peaks["fp32"]
        args.peak_bf16 = args.peak_bf16 or peaks["bf16"]
    print(f"# peak matmul (TF graph, 4096^2): fp32 {args.peak_fp32:.0f} GFLOP/s, bf16 {args.peak_bf16:.0f} GFLOP/s")
    configs = args.configs.split(",")
    unknown = sorted(set(configs) - set(known))
    if unknown:
        raise SystemExit(f"unknown --configs {unknown}; choose from {', '.join(known)}")
    runners = {name: Worker(name) for name in configs}
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
    for runner in runners.values():
        runner.close()


if __name__ == "__main__":
    main()
