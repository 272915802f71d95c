"""Long-tailed Fashion-MNIST: cross-entropy, balanced softmax, SupCon and PaCo at equal budget.

    apt-get install -y dataset-fashion-mnist
    python bench/long_tail_table.py --imbalance=100,50,10 --seeds=0,1 --second_seed_at=100 --out=runs/long_tail

Every row is one `experiments/run.py` command on its long-tailed Fashion-MNIST config
(supervised_fashion_mnist_lt.cfg twice, supcon_ and paco_fashion_mnist_lt.cfg) with
`--long_tail_imbalance=R` and `--seed=S`: the same small ResNet, epochs and batch. The
training split keeps `n_max * R^(-c/(C-1))` images of class c; the test split stays
balanced. Columns: top-1 on the test split, the mean per-class top-1 of the 3 most
frequent training classes (head), the 4 in the middle and the 3 rarest (tail), all from
the model's classifier (its plain logits, without the prior) or, for SupCon, from a
balanced-softmax linear classifier trained on its frozen features; "frozen": that linear
classifier on every row's frozen features (results.json's `frozen_features` for rows with
their own classifier; blank for runs made before it existed); and kNN (k = 200, T = 0.1)
on the frozen encoder features. Work whose results.json exists is skipped, so
the script can be stopped and re-run. Prints (and writes to OUT/table.md) the mean and
spread (max - min) over the seeds of each imbalance.
"""

import json
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_runs import CONFIG_DIR, run_once, write_atomically  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = {  # row -> (config, extra flags)
    "cross_entropy": ("supervised_fashion_mnist_lt.cfg", ["--supervised_loss=ce"]),
    "balanced_softmax": ("supervised_fashion_mnist_lt.cfg", ["--supervised_loss=balanced_softmax"]),
    "supcon": ("supcon_fashion_mnist_lt.cfg", []),
    "paco": ("paco_fashion_mnist_lt.cfg", []),
}
COLUMNS = ["top1", "head_top1", "middle_top1", "tail_top1", "frozen_top1", "knn_top1"]

flags.DEFINE_list("imbalance", ["100", "50", "10"], "Imbalance ratios R (largest over smallest class).")
flags.DEFINE_list("seeds", ["0", "1"], "Seeds; every imbalance gets the first, --second_seed_at the rest.")
flags.DEFINE_list("second_seed_at", ["100"], "Imbalances that run every seed of --seeds.")
flags.DEFINE_list("rows", list(ROWS), "Rows, run in this order.")
flags.DEFINE_integer("epochs", 50, "Training epochs of every row.")
flags.DEFINE_string("out", "runs/long_tail", "Folder for the runs and table.md.")
flags.DEFINE_boolean("train", True, "Train missing rows (false: only tabulate what exists).")
FLAGS = flags.FLAGS


def run_row(row, imbalance, seed):
    out = os.path.join(FLAGS.out, f"{row}_lt{imbalance}_seed{seed}")
    config, extra = ROWS[row]
    command = [sys.executable, os.path.join(ROOT, "experiments", "run.py"),
               f"--flagfile={os.path.join(CONFIG_DIR, config)}", *extra,
               f"--long_tail_imbalance={imbalance}", f"--epochs={FLAGS.epochs}", f"--seed={seed}",
               f"--output_dir={out}", "--knn_every=0", "--raw_pixels=false", "--plots=false", "--export=false"]
    return run_once(out, command, f"{row} imbalance {imbalance} seed {seed}", FLAGS.train)


def scores(out):
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    report = results["classification"]
    row = {key: report[key] for key in COLUMNS[:4]}
    # The model's own classifier, or the frozen-features one already (SupCon); None: a run older than the field.
    row["frozen_top1"] = report["frozen_features"]["top1"] if "frozen_features" in report else \
        report["top1"] if report["classifier"] != "the model's classifier" else None
    row["knn_top1"] = results["evaluation"]["encoder"]["knn_top1"]
    row["train_seconds"] = results["train_seconds"]
    return row


def main(argv):
    del argv
    os.makedirs(FLAGS.out, exist_ok=True)
    plan = [(r, int(imbalance), int(seed)) for imbalance in FLAGS.imbalance
            for seed in (FLAGS.seeds if imbalance in FLAGS.second_seed_at else FLAGS.seeds[:1]) for r in FLAGS.rows]
    # The first seed of every imbalance first, so a stopped run has one complete table.
    plan.sort(key=lambda item: (FLAGS.seeds.index(str(item[2])), FLAGS.imbalance.index(str(item[1]))))
    table = {}
    for row, imbalance, seed in plan:
        out = run_row(row, imbalance, seed)
        if os.path.exists(os.path.join(out, "results.json")):
            table.setdefault((imbalance, row), []).append(scores(out))
    lines = ["| imbalance | row | seeds | train min | top-1 | head | middle | tail | frozen | kNN |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for imbalance in map(int, FLAGS.imbalance):
        for row in FLAGS.rows:
            runs = table.get((imbalance, row))
            if not runs:
                continue
            cells = []
            for column in COLUMNS:
                values = [100 * r[column] for r in runs if r[column] is not None]
                cells.append(f"{sum(values) / len(values):.1f} ± {max(values) - min(values):.1f}" if values else "")
            minutes = sum(r["train_seconds"] for r in runs) / len(runs) / 60
            lines.append(f"| {imbalance} | {row} | {len(runs)} | {minutes:.0f} | " + " | ".join(cells) + " |")
    text = (f"Long-tailed Fashion-MNIST, {FLAGS.epochs} epochs per row, balanced test split; mean ± spread "
            "(max - min) over seeds, top-1 in %; head / middle / tail: the 3 / 4 / 3 classes by training "
            "frequency.\n\n" + "\n".join(lines))
    write_atomically(os.path.join(FLAGS.out, "table.md"), text + "\n")
    print(text)


if __name__ == "__main__":
    app.run(main)
