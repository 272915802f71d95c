"""Representation quality on Fashion-MNIST: PCL v2, PCL v1, MoCo v2, SimCLR, BYOL, SimSiam, SwAV, a random encoder, raw pixels.

Every trained row is one `experiments/run.py` command on its Fashion-MNIST config, with the
same encoder, augmentation budget (--epochs) and seeds; the script only shortens the schedule
consistently (PCL's warm-up and v1's step drops keep their share of the run) and skips work
whose results.json already exists, so it can be stopped and re-run. The random-encoder and
raw-pixel rows are evaluated here with the same protocols (keras_pcl.evaluation).

    apt-get install -y dataset-fashion-mnist
    python bench/quality_table.py --epochs=12 --seeds=0,1 --out=runs/quality

Prints (and writes to OUT/table.md) mean and spread (max - min) over seeds per column;
"train min" is the mean over seeds of each run's training time, E-steps included, summed
over all of its invocations (results.json's `train_seconds`). Below the table, each run's
collapse monitors, the metrics its model declares as such (SwAV's `prototypes_used` and `code_entropy`,
`output_std` of SwAV, BYOL and SimSiam) as results.json reports them: the last epoch's value and the
lowest over the run.
"""

import json
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_runs import CONFIG_DIR, flag_values, read_flagfile, run_once, write_atomically  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"pcl_v2": "pcl_v2_fashion_mnist.cfg", "pcl_v1": "pcl_v1_fashion_mnist.cfg",
           "moco_v2": "moco_v2_fashion_mnist.cfg", "simclr": "simclr_fashion_mnist.cfg",
           "byol": "byol_fashion_mnist.cfg", "simsiam": "simsiam_fashion_mnist.cfg",
           "swav": "swav_fashion_mnist.cfg"}
COLUMNS = ["knn_top1", "linear_top1", "svm_1shot", "svm_2shot", "svm_4shot", "svm_8shot", "svm_16shot", "ami", "nmi"]

flags.DEFINE_integer("epochs", 12, "Training epochs of every trained row.")
flags.DEFINE_list("seeds", ["0", "1"], "Seeds; each row is trained once per seed.")
flags.DEFINE_list("rows", ["pcl_v2", "moco_v2", "pcl_v1"],
                  f"Trained rows, run in this order (seed-major); any of {', '.join(CONFIGS)}.")
flags.DEFINE_string("out", "runs/quality", "Folder for the runs and table.md.")
flags.DEFINE_integer("holdout", 0, "Evaluate every row on this many held-out training images, not the test split "
                     "(run.py --holdout; for choosing settings without touching the test split).")
flags.DEFINE_string("extra_flags", "", "Space-separated run.py flags added to every trained row (a variant under test).")
flags.DEFINE_boolean("train", True, "Train missing rows (false: only tabulate what exists).")
FLAGS = flags.FLAGS


def with_extra_flags(config):
    """The config's flags as run.py sees them once --extra_flags follow the flagfile."""
    return {**config, **flag_values(FLAGS.extra_flags.split())}


def schedule_overrides(config, epochs):
    """Keeps warm-up and step drops at the same fraction of the run as in the 50-epoch config."""
    full = int(config["epochs"])
    overrides = [f"--epochs={epochs}"]
    if "warmup_epochs" in config:
        overrides.append(f"--warmup_epochs={max(1, round(int(config['warmup_epochs']) * epochs / full))}")
    if config.get("schedule") == "step":
        drops = [max(1, round(int(d) * epochs / full)) for d in config["lr_drops"].split(",")]
        overrides.append("--lr_drops=" + ",".join(map(str, drops)))
    return overrides


def train_row(row, seed):
    out = os.path.join(FLAGS.out, f"{row}_seed{seed}")
    config = read_flagfile(CONFIGS[row])
    command = [sys.executable, os.path.join(ROOT, "experiments", "run.py"),
               f"--flagfile={os.path.join(CONFIG_DIR, CONFIGS[row])}",
               *schedule_overrides(config, FLAGS.epochs), f"--seed={seed}", f"--output_dir={out}",
               "--knn_every=0", "--raw_pixels=false", "--plots=false", "--export=false",
               f"--holdout={FLAGS.holdout}", *FLAGS.extra_flags.split()]
    return run_once(out, command, f"{row} seed {seed}")


def baseline_rows(seed):
    """Random-initialised encoder (same architecture as the trained rows) and raw pixels."""
    path = os.path.join(FLAGS.out, f"baselines_seed{seed}.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    import keras

    from keras_pcl import backbones, data, evaluation

    config = with_extra_flags(read_flagfile(CONFIGS["pcl_v2"]))  # a variant's --width etc. apply here too
    keras.utils.set_random_seed(seed)
    split = data.load_dataset("fashion_mnist", seed=seed)
    if FLAGS.holdout:
        split = data.holdout_split(split, FLAGS.holdout)
    encoder = backbones.BACKBONES[config["encoder"]](
        split.image_shape, width=int(config["width"]), norm=config["norm"], num_splits=int(config["num_splits"]))
    features = {"random_init": [evaluation.extract_features(encoder, x) for x in (split.train_images, split.test_images)],
                "raw_pixels": [evaluation.raw_pixel_features(x) for x in (split.train_images, split.test_images)]}
    rows = {name: evaluation.evaluate_features(train, split.train_labels, test, split.test_labels, seed=seed)
            for name, (train, test) in features.items()}
    write_atomically(path, json.dumps(rows, indent=2))
    return rows


def table(results):
    header = "| row | seeds | train min | " + " | ".join(c.replace("_top1", "").replace("svm_", "") for c in COLUMNS) + " |"
    lines = [header, "|" + "---|" * (COLUMNS.__len__() + 3)]
    for name, runs in results.items():
        cells = []
        for column in COLUMNS:
            values = [r[column] * (1 if column in ("ami", "nmi") else 100) for r in runs["scores"]]
            mean, spread = sum(values) / len(values), max(values) - min(values)
            cells.append(f"{mean:.3f} ± {spread:.3f}" if column in ("ami", "nmi") else f"{mean:.1f} ± {spread:.1f}")
        minutes = f"{sum(runs['seconds']) / len(runs['seconds']) / 60:.0f}" if runs["seconds"] else "–"
        lines.append(f"| {name} | {len(runs['scores'])} | {minutes} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def monitor_lines(result, name):
    """One line for the run's collapse monitors (results.json's `collapse_monitors`), if its model has any."""
    cells = [f"{key} {m['last']:.4g} (lowest {m['lowest']:.4g}, epoch {m['lowest_epoch']})"
             for key, m in result.get("collapse_monitors", {}).items()]
    return [f"- {name}: " + "; ".join(cells)] if cells else []


def main(argv):
    del argv
    os.makedirs(FLAGS.out, exist_ok=True)
    results, monitors = {}, []
    for seed in map(int, FLAGS.seeds):
        for row in FLAGS.rows:
            out = os.path.join(FLAGS.out, f"{row}_seed{seed}")
            if FLAGS.train:
                train_row(row, seed)
            if os.path.exists(os.path.join(out, "results.json")):
                with open(os.path.join(out, "results.json")) as f:
                    result = json.load(f)
                entry = results.setdefault(row, {"scores": [], "seconds": []})
                entry["scores"].append(result["evaluation"]["encoder"])
                entry["seconds"].append(result.get("train_seconds") or result["train_seconds_this_invocation"])
                monitors += monitor_lines(result, f"{row} seed {seed}")
        for name, scores in baseline_rows(seed).items():
            results.setdefault(name, {"scores": [], "seconds": []})["scores"].append(scores)
    evaluated_on = (f"{FLAGS.holdout} held-out training images (run.py --holdout)" if FLAGS.holdout
                    else "test split")
    extra = f" with {FLAGS.extra_flags}" if FLAGS.extra_flags else ""
    text = (f"Fashion-MNIST {evaluated_on}, {FLAGS.epochs} epochs per trained row{extra}, "
            f"seeds {','.join(FLAGS.seeds)}; "
            "mean ± spread (max - min) over seeds; accuracies in %, low-shot columns are labelled images per class.\n\n"
            + table(results))
    if monitors:
        text += "\n\nCollapse monitors (last epoch; lowest epoch):\n" + "\n".join(monitors)
    write_atomically(os.path.join(FLAGS.out, "table.md"), text + "\n")
    print(text)


if __name__ == "__main__":
    app.run(main)
