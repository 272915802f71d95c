"""What SwAV's small crops cost the encoder: keras_pcl (TensorFlow) vs the PyTorch copy lightly_peer trains.

    python bench/crop_sizes.py --encoder=resnet18 --precision=fp32 --rounds=3

One forward and backward pass of the encoder alone (no head, no loss) over the
crops of one SwAV step of SwAV's Fashion-MNIST flagfile (2 large crops at the
encoder's image size, its small crops at its small size): the 2 large crops as
one batch and the small crops as one batch (how keras_pcl and the official SwAV
code run them: one pass per crop size), and each crop in a call of its own (how
lightly's SwAV step runs them). The encoders are train_step_bench's: ResNet-18
with the CIFAR stem at 32x32x3, the small ResNet at 28x28x1. CPU only. Each
library runs in a process of its own (TensorFlow and the bench extra's torch
build segfault in one process), the two alternating for `--rounds` rounds, each
timing `--steps` passes per case after two untimed ones; the table gives the
fastest round's mean pass. In TensorFlow the one-call-each passes are one graph,
so independent calls may overlap; torch runs them in order, as lightly does.
The matmul peak is measured in the same run.
"""

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ENCODERS = ("resnet18", "small_resnet")


def encoder_spec(encoder):
    """The encoder's image shape and width (train_step_bench's) and SwAV's small crops (its flagfile)."""
    from lightly_peer import CONFIGS, read_flagfile
    from train_step_bench import METHOD_ENCODERS

    config = read_flagfile(CONFIGS["swav"])
    shape = METHOD_ENCODERS[encoder]["shape"]
    return dict(size=shape[0], channels=shape[2], width=METHOD_ENCODERS[encoder]["width"],
                small=int(config["small_crop_size"]), num_small=int(config["num_small_crops"]))


def cases(spec, batch, small_crops):
    large, small, c = spec["size"], spec["small"], spec["channels"]
    return {"2 large crops, one batch": [(2 * batch, large, large, c)],
            f"{small_crops} small crops, one batch": [(small_crops * batch, small, small, c)],
            "2 large crops, one call each": [(batch, large, large, c)] * 2,
            f"{small_crops} small crops, one call each": [(batch, small, small, c)] * small_crops}


def keras_times(encoder, spec, precision, batch, small_crops, steps):
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # a CPU comparison, on any host
    import keras
    import tensorflow as tf

    from keras_pcl import backbones

    keras.mixed_precision.set_global_policy("mixed_bfloat16" if precision == "bf16" else "float32")
    build = backbones.resnet18 if encoder == "resnet18" else backbones.small_resnet
    model = build((None, None, spec["channels"]), width=spec["width"], norm="batch")

    def step_of(shapes):
        xs = [tf.random.uniform(shape) for shape in shapes]

        @tf.function
        def step():
            with tf.GradientTape() as tape:
                loss = tf.add_n([tf.reduce_sum(tf.cast(model(x, training=True), tf.float32)) for x in xs])
            return tape.gradient(loss, model.trainable_variables)
        return lambda: [g.numpy() for g in step()][:1]

    return time_cases({name: step_of(shapes) for name, shapes in cases(spec, batch, small_crops).items()}, steps)


def torch_times(encoder, spec, precision, batch, small_crops, steps):
    import torch
    from lightly_peer import torch_backbone

    torch.set_num_threads(os.cpu_count())  # as train_step_bench's torch workers
    model = torch_backbone(encoder, spec["channels"], spec["width"])
    model.train()

    def step_of(shapes):
        xs = [torch.rand(n, c, h, w) for n, h, w, c in shapes]

        def step():
            model.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = sum(model(x).float().sum() for x in xs)
            loss.backward()
        return step

    return time_cases({name: step_of(shapes) for name, shapes in cases(spec, batch, small_crops).items()}, steps)


def time_cases(cases_, steps):
    """{case: mean seconds of `steps` passes}, after two untimed passes of every case."""
    for step in cases_.values():
        step()
        step()
    seconds = {}
    for name, step in cases_.items():
        start = time.perf_counter()
        for _ in range(steps):
            step()
        seconds[name] = (time.perf_counter() - start) / steps
    return seconds


def worker(args, library):
    """One round of one library in a fresh process: {case: seconds}."""
    command = [sys.executable, os.path.abspath(__file__), f"--worker={library}", f"--encoder={args.encoder}",
               f"--precision={args.precision}", f"--batch={args.batch}", f"--small_crops={args.small_crops}",
               f"--steps={args.steps}"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"the {library} worker failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", choices=ENCODERS, default="resnet18")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--batch", type=int, default=256, help="images per crop (SwAV's batch)")
    parser.add_argument("--small_crops", type=int, default=0, help="0: the SwAV flagfile's count")
    parser.add_argument("--steps", type=int, default=2, help="timed passes per case and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", choices=["keras_pcl", "torch"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.batch < 1 or args.small_crops < 0 or args.steps < 1 or args.rounds < 1:
        parser.error("--batch, --steps and --rounds must be >= 1, --small_crops >= 0")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    spec = encoder_spec(args.encoder)
    args.small_crops = args.small_crops or spec["num_small"]
    if args.worker:
        run = keras_times if args.worker == "keras_pcl" else torch_times
        print(json.dumps(run(args.encoder, spec, args.precision, args.batch, args.small_crops, args.steps)))
        return

    from train_step_bench import measure_peak

    peaks = measure_peak()
    print(f"# peak matmul (TF graph, 4096^2): fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s")
    rounds = {"keras_pcl": [], "torch": []}
    for _ in range(args.rounds):
        for library in rounds:
            rounds[library].append(worker(args, library))
    best = {library: {name: min(r[name] for r in results) for name in results[0]}
            for library, results in rounds.items()}
    pixels = {name: sum(n * h * w for n, h, w, _ in shapes)
              for name, shapes in cases(spec, args.batch, args.small_crops).items()}
    large = next(iter(pixels))
    print(f"# {args.encoder} ({spec['size']} px, small crops {spec['small']} px), {args.precision}, batch {args.batch}, "
          f"encoder forward + backward, mean of {args.steps} passes, fastest of {args.rounds} rounds")
    print("| crops | pixels vs large | keras_pcl s | torch s | torch / keras_pcl | keras_pcl cost vs large "
          "| torch cost vs large |")
    print("|---|---|---|---|---|---|---|")
    for name in pixels:
        k, t = best["keras_pcl"][name], best["torch"][name]
        print(f"| {name} | {pixels[name] / pixels[large]:.2f} | {k:.2f} | {t:.2f} | {t / k:.2f}x "
              f"| {k / best['keras_pcl'][large]:.2f} | {t / best['torch'][large]:.2f} |")


if __name__ == "__main__":
    main()
