"""The E-step's share of training time, read from finished `experiments/run.py` runs.

    python bench/estep_share.py runs/quality_e20/pcl_v2_seed0 [more run folders]

An epoch's wall time is the gap between consecutive epoch-end events in the run's
TensorBoard log (`OUTPUT_DIR/logs/train`); the E-step runs at the start of its epoch,
so that gap holds both. The E-step time is `estep_embed_seconds +
estep_cluster_seconds` from `history.json`. Epoch 0 has no start event and is
skipped; the first E-step includes tracing and is reported apart from the median. With
`--estep_every` > 1, the share over all epochs from the second E-step on is reported too
(and returned). A run with a single E-step has no steady-state share and is left out of
the range over several runs.
"""

import glob
import json
import os
import statistics
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def epoch_end_times(run_dir):
    import tensorflow as tf

    times = {}
    for path in sorted(glob.glob(os.path.join(run_dir, "logs", "train", "*tfevents*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            if any(value.tag == "epoch_loss" for value in event.summary.value):
                times[event.step] = event.wall_time
    return times


def share(run_dir):
    with open(os.path.join(run_dir, "history.json")) as f:
        history = json.load(f)
    with open(os.path.join(run_dir, "config.json")) as f:
        config = json.load(f)
    ends = epoch_end_times(run_dir)
    # The E-step epochs, from the run's flags: runs made before the E-step timers read 0 on
    # epochs without one logged the last E-step's timers again there.
    warmup, every = config["warmup_epochs"], config.get("estep_every", 1)
    rows = []
    for epoch, (embed, cluster) in enumerate(zip(history.get("estep_embed_seconds", []),
                                                 history.get("estep_cluster_seconds", []))):
        ran = epoch >= warmup and (epoch - warmup) % every == 0
        if not ran or embed is None or epoch not in ends or epoch - 1 not in ends:
            continue
        rows.append((epoch, embed, cluster, ends[epoch] - ends[epoch - 1]))
    if not rows:
        raise SystemExit(f"{run_dir}: no E-step epochs with timings (is it a PCL run with a TensorBoard log?)")
    first, rest = rows[0], rows[1:]
    estep_epochs = {row[0] for row in rows}
    without_estep = [ends[e] - ends[e - 1] for e in ends if e - 1 in ends and e not in estep_epochs]
    print(f"{run_dir}: {len(rows)} E-steps")
    print(f"  first E-step (epoch {first[0]}, with tracing): embed {first[1]:.1f} s + k-means/phi {first[2]:.1f} s "
          f"of a {first[3]:.1f} s epoch = {100 * (first[1] + first[2]) / first[3]:.1f} %")
    if not rest:
        # The first E-step's tracing would pass for the steady-state cost (here and in the
        # range over several runs below); say so instead and return no share.
        print("  later E-steps: none (train past the first E-step epoch to measure the share without tracing)")
        return None
    median = statistics.median
    estep = median([r[1] + r[2] for r in rest])
    epoch = median([r[3] for r in rest])
    print(f"  later E-steps (median of {len(rest)}): embed {median([r[1] for r in rest]):.1f} s + k-means/phi "
          f"{median([r[2] for r in rest]):.1f} s = {estep:.1f} s of a {epoch:.1f} s epoch = {100 * estep / epoch:.1f} %")
    if without_estep:
        print(f"  epochs without E-step (median of {len(without_estep)}): {median(without_estep):.1f} s")
    if every == 1:
        return estep / epoch
    # With E-steps every n > 1 epochs the per-E-step share overstates the cost: the share
    # of the training time from the second E-step on is the one a run pays (a sum, so a run
    # paused or resumed in that span reads wrong; the medians above do not).
    estep_total = sum(r[1] + r[2] for r in rest)
    span = [e for e in ends if e - 1 in ends and e >= rest[0][0]]
    total = sum(ends[e] - ends[e - 1] for e in span)
    print(f"  epochs {min(span)}-{max(span)} together: E-steps {estep_total:.1f} s "
          f"of {total:.1f} s = {100 * estep_total / total:.1f} %")
    return estep_total / total


def main():
    if len(sys.argv) < 2:
        raise SystemExit("usage: python bench/estep_share.py RUN_DIR [RUN_DIR ...]")
    shares = [value for value in (share(run_dir) for run_dir in sys.argv[1:]) if value is not None]
    if len(shares) > 1:
        print(f"E-step share over {len(shares)} runs: {100 * min(shares):.1f}-{100 * max(shares):.1f} %")


if __name__ == "__main__":
    main()
