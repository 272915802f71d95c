"""Where keras_pcl's train step spends its time: TensorFlow's profiler, summed per op type.

    python bench/profile_train_step.py --precision=bf16 --steps=2
    python bench/profile_train_step.py --encoder=small_resnet --precision=bf16 --steps=5
    python bench/profile_train_step.py --encoder=small_resnet --steps=5 --symmetric
    python bench/profile_train_step.py --method=swav --precision=fp32 --steps=2

Without `--method`, builds the same PCL step as `train_step_bench.py` (ResNet-18, batch 256, queue
16384, three granularities; or, with `--encoder=small_resnet`, the Fashion-MNIST
config's step: small ResNet, 28x28x1, queue 4096, 50/100/200 prototypes); with `--method`, the
step `train_step_bench.py --methods=...` times (that method's Fashion-MNIST flagfile on the encoder,
SwAV with its small crops). Warms it up, profiles `--steps` steps with
`tf.profiler.experimental` and sums the profiler's op events by op type. Op
times are summed over the threads that ran them, so the total exceeds the wall
time; the shares are what count.
"""

import argparse
import collections
import glob
import os
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def op_times(logdir):
    """Milliseconds per op type over all events of the newest profile in `logdir`."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    path = sorted(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True))[-1]
    space = xplane_pb2.XSpace()
    with open(path, "rb") as f:
        space.ParseFromString(f.read())
    totals = collections.Counter()
    for plane in space.planes:
        for line in plane.lines:
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name  # "scope/op_name:OpType"
                op_type = name.rpartition(":")[2].lstrip("_") if ":" in name else ""
                if op_type[:1].isupper() and "#" not in op_type and op_type not in ("Process", "Run"):
                    totals[op_type] += event.duration_ps / 1e9
    return totals


def profiled(call):
    """Runs `call()` under TensorFlow's profiler; returns its result and `op_times` of that run."""
    import tensorflow as tf

    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        result = call()
        tf.profiler.experimental.stop()
        return result, op_times(logdir)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--norm", choices=["split", "batch"], default="split")
    parser.add_argument("--encoder", choices=["resnet18", "small_resnet"], default="resnet18",
                        help="resnet18: the issue's step; small_resnet: the Fashion-MNIST config's")
    parser.add_argument("--symmetric", action="store_true", help="both views as queries (PCL(symmetric=True))")
    parser.add_argument("--method", choices=["moco_v2", "simclr", "byol", "simsiam", "swav"], default=None,
                        help="a family method's step instead of the PCL step (--norm, --symmetric do not apply)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    if args.method and (args.symmetric or args.norm != "split"):
        parser.error("--norm and --symmetric shape the PCL step; with --method the method's flagfile decides")

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from train_step_bench import keras_method_runner, keras_step_runner

    if args.method:
        run = keras_method_runner(args.method, args.encoder, args.precision)
    else:
        run = keras_step_runner(args.precision, False, args.norm, args.encoder, args.symmetric)
    run(2)  # trace and warm up
    seconds, totals = profiled(lambda: run(args.steps))
    total = sum(totals.values())
    step = args.method or f"PCL, {args.norm} BN{', symmetric' if args.symmetric else ''}"
    print(f"# {step}, {args.encoder}, {args.precision}: {args.steps} steps in {seconds:.2f} s wall; "
          f"op time summed over threads {total / 1000:.2f} s")
    for op_type, ms in totals.most_common(args.top):
        print(f"{op_type:<40}{ms / args.steps:10.1f} ms/step {100 * ms / total:6.1f} %")
    convolutions = sum(ms for op, ms in totals.items() if "Conv2D" in op)
    norms = sum(ms for op, ms in totals.items() if "BatchNorm" in op)
    print(f"convolutions {100 * convolutions / total:.1f} %, batch norm {100 * norms / total:.1f} %, "
          f"everything else {100 * (total - convolutions - norms) / total:.1f} %")


if __name__ == "__main__":
    main()
