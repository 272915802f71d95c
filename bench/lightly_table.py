"""keras_pcl vs lightly, method by method, at equal budget on Fashion-MNIST.

    pip install -e ".[bench]" && apt-get install -y dataset-fashion-mnist
    python bench/lightly_table.py --methods=moco_v2,simclr,byol,simsiam,swav --epochs=20 --out=runs/lightly

For each method, the same flagfile (experiments/configs/<method>_fashion_mnist.cfg) trained
`--epochs` epochs twice: by keras_pcl (`experiments/run.py`) and by lightly
(`bench/lightly_peer.py`: lightly's heads, losses, momentum and LARS on a PyTorch copy of
the small ResNet, the same batch, schedule, optimizer and method hyperparameters, its
loss scaled to keras_pcl's gradient where the conventions differ: BYOL's); both
encoders' frozen features are scored by keras_pcl.evaluation (kNN k=200 T=0.1, linear
probe, low-shot SVM, AMI). A pair within 1 kNN point gets a second seed (`--seeds`).
Runs whose results.json exists are skipped, so the script can be stopped and re-run.
`--extra_flags` overrides the flagfile on both sides (e.g. SwAV with two crops:
`--methods=swav --extra_flags=--num_small_crops=0 --out=runs/lightly_swav_2crops`).
Prints (and writes to OUT/table.md) one table per method: each library's mean over
seeds, the spread (max - min), and seconds per epoch (the median epoch).
"""

import json
import os
import statistics
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_runs import CONFIG_DIR, run_once, write_atomically  # noqa: E402
from lightly_peer import CONFIGS  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLUMNS = ["knn_top1", "linear_top1", "svm_1shot", "svm_4shot", "ami"]

flags.DEFINE_list("methods", list(CONFIGS), "Methods both libraries have.")
flags.DEFINE_integer("epochs", 20, "Epochs of every run.")
flags.DEFINE_list("seeds", ["0", "1"], "Seeds; the second only for pairs within 1 kNN point.")
flags.DEFINE_string("out", "runs/lightly", "Folder for the runs and table.md.")
flags.DEFINE_boolean("train", True, "Train missing runs (false: only tabulate what exists).")
flags.DEFINE_string("extra_flags", "", "Space-separated flagfile overrides given to both libraries (a variant, e.g. "
                    "SwAV's --num_small_crops=0); runs are found by folder name, so give a variant its own --out.")
FLAGS = flags.FLAGS


def train(library, method, seed):
    out = os.path.join(FLAGS.out, f"{method}_{library}_seed{seed}")
    if library == "keras_pcl":
        command = [sys.executable, os.path.join(ROOT, "experiments", "run.py"),
                   f"--flagfile={os.path.join(CONFIG_DIR, CONFIGS[method])}",
                   f"--epochs={FLAGS.epochs}", f"--seed={seed}", f"--output_dir={out}", "--knn_every=0",
                   "--raw_pixels=false", "--plots=false", "--export=false", *FLAGS.extra_flags.split()]
    else:
        command = [sys.executable, os.path.join(ROOT, "bench", "lightly_peer.py"), f"--method={method}",
                   f"--epochs={FLAGS.epochs}", f"--seed={seed}", f"--out={out}", f"--extra_flags={FLAGS.extra_flags}"]
    return run_once(out, command, f"{method} {library} seed {seed}", FLAGS.train)


def scores(out):
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    seconds = results.get("epoch_seconds")
    if seconds is None:  # a keras_pcl run keeps them in its history
        with open(os.path.join(out, "history.json")) as f:
            seconds = json.load(f)["epoch_seconds"]
    return {**results["evaluation"]["encoder"], "epoch_seconds": statistics.median(seconds)}


def main(argv):
    del argv
    os.makedirs(FLAGS.out, exist_ok=True)
    sections = []
    for method in FLAGS.methods:
        runs = {"keras_pcl": [], "lightly": []}
        for i, seed in enumerate(map(int, FLAGS.seeds)):
            if i and runs["keras_pcl"] and runs["lightly"] and abs(
                    runs["keras_pcl"][0]["knn_top1"] - runs["lightly"][0]["knn_top1"]) >= 0.01:
                break  # apart by a kNN point or more: one seed tells
            for library in runs:
                out = train(library, method, seed)
                if os.path.exists(os.path.join(out, "results.json")):
                    runs[library].append(scores(out))
        lines = [f"**{method}** ({FLAGS.epochs} epochs)", "",
                 "| library | seeds | " + " | ".join(c.replace("_top1", "").replace("svm_", "") for c in COLUMNS)
                 + " | s/epoch |", "|---|---|" + "---|" * (len(COLUMNS) + 1)]
        for library, found in runs.items():
            if not found:
                continue
            cells = []
            for column in COLUMNS:
                values = [r[column] * (1 if column == "ami" else 100) for r in found]
                mean, spread = sum(values) / len(values), max(values) - min(values)
                cells.append(f"{mean:.3f} ± {spread:.3f}" if column == "ami" else f"{mean:.1f} ± {spread:.1f}")
            seconds = statistics.median(r["epoch_seconds"] for r in found)
            lines.append(f"| {library} | {len(found)} | " + " | ".join(cells) + f" | {seconds:.0f} |")
        sections.append("\n".join(lines))
    variant = f" with {FLAGS.extra_flags}" if FLAGS.extra_flags else ""
    text = (f"keras_pcl vs lightly on Fashion-MNIST (test split), the same flagfile per method{variant}; mean ± spread "
            "(max - min) over seeds, accuracies in %.\n\n" + "\n\n".join(sections))
    write_atomically(os.path.join(FLAGS.out, "table.md"), text + "\n")
    print(text)


if __name__ == "__main__":
    app.run(main)
