"""Crash safety: SIGKILL mid-epoch and mid-E-step, then resume from the newest checkpoint."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import keras
import numpy as np
import tensorflow as tf

import keras_pcl
from keras_pcl import backbones

ROOT = pathlib.Path(__file__).resolve().parents[1]
RUN = str(ROOT / "experiments" / "run.py")
QUICKSTART = str(ROOT / "experiments" / "configs" / "quickstart.cfg")
FLAGS = ["--epochs=4", "--warmup_epochs=1", "--checkpoint_every_steps=3", "--knn_every=0", "--export=false",
         "--plots=false", "--low_shot_draws=1", "--num_clusters=10,20", "--queue_size=256"]


def start(out):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.Popen([sys.executable, "-u", RUN, f"--flagfile={QUICKSTART}", f"--output_dir={out}"] + FLAGS,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def kill_when(process, predicate, timeout=240):
    """SIGKILLs the run as soon as `predicate(lines_so_far)` holds (polled every few ms).

    Output is read on a thread, so the predicate may also look at files.
    """
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    deadline = time.time() + timeout
    while process.poll() is None:
        if predicate(lines):
            process.send_signal(signal.SIGKILL)
            process.wait()
            reader.join(5)
            return lines
        assert time.time() < deadline, "".join(lines[-20:])
        time.sleep(0.003)
    raise AssertionError("the run ended before the kill point:\n" + "".join(lines[-20:]))


def checkpoint_variables(directory):
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(directory))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}


def quickstart_model():
    """The model quickstart.cfg with FLAGS builds, to restore the run's checkpoints into."""
    model = keras_pcl.PCL(backbones.small_cnn((8, 8, 1), width=32, num_splits=4), backbones.mlp_head(64, 256),
                          num_samples=1438, num_clusters=(10, 20), warmup_epochs=1, queue_size=256, momentum=0.99)
    # Same optimizer structure as the runner's (a schedule, so no learning-rate variable).
    schedule = keras.optimizers.schedules.CosineDecay(0.06, 44)
    model.compile(optimizer=keras.optimizers.SGD(schedule, momentum=0.9, weight_decay=5e-4))
    return model


def assert_restores_exactly(directory):
    """Every variable restored into a fresh model equals the checkpoint's stored value."""
    stored = checkpoint_variables(directory)
    model = quickstart_model()
    epoch = keras_pcl.callbacks.TrainingCheckpoint(directory).restore(model)
    by_shape = {}
    for name, value in stored.items():
        if not isinstance(value, bytes):  # skips the serialized object graph
            value = np.asarray(value)
            by_shape.setdefault(value.shape, []).append(value)
    for variable in [model.queue.keys, model.queue.pointer, model.assignments] + model.prototypes + model.concentrations \
            + model.backbone.weights + model.key_backbone.weights:
        value = np.asarray(variable)
        assert any(np.array_equal(value, s) for s in by_shape.get(value.shape, [])), variable.path
    assert int(model.prototypes_ready.numpy()) in (0, 1)
    return epoch, model


def test_sigkill_mid_epoch_and_mid_estep_then_resume(tmp_path):
    out = tmp_path / "run"
    checkpoints = str(out / "checkpoints")

    # 1. Killed mid-epoch, right after the first step checkpoint (step 3 of 11 of epoch 1).
    process = start(out)
    kill_when(process, lambda lines: os.path.exists(os.path.join(checkpoints, "checkpoint")))
    epoch, _ = assert_restores_exactly(checkpoints)
    assert epoch == 0  # mid-epoch checkpoints resume at the start of their epoch

    # 2. Restarted, then killed inside the first E-step (epoch 2 starts with it).
    process = start(out)
    kill_when(process, lambda lines: any(line.startswith("E-step: embedding") for line in lines))
    epoch, model = assert_restores_exactly(checkpoints)
    assert epoch == 1  # epoch 1 finished and was checkpointed before the E-step began

    # 3. Restarted again: it resumes and finishes with results.
    process = start(out)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-3000:]
    assert "resuming" in output and "at epoch 1" in output
    history = json.loads((out / "history.json").read_text())
    assert history["epoch"] == [1, 2, 3, 4]
    results = json.loads((out / "results.json").read_text())
    assert results["evaluation"]["encoder"]["knn_top1"] > 0.5
    epoch, model = assert_restores_exactly(checkpoints)
    assert epoch == 4 and int(model.prototypes_ready.numpy()) == 1


def test_resuming_at_an_epoch_boundary_reproduces_the_uninterrupted_run(tmp_path, runner):
    """Data order, augmentations, key shuffles, E-steps: a run killed after epoch 2 and resumed
    ends with every variable bit-identical to the same command trained straight through."""
    common = [f"--flagfile={QUICKSTART}", "--epochs=3", "--warmup_epochs=1", "--knn_every=0", "--export=false",
              "--plots=false", "--low_shot_draws=1", "--num_clusters=10,20", "--queue_size=256",
              "--raw_pixels=false"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    runner.execute(common + [f"--output_dir={straight}"])

    def epochs_done():
        try:
            return len(json.loads((resumed / "history.json").read_text())["epoch"])
        except (OSError, ValueError, KeyError):
            return 0

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    command = [sys.executable, "-u", RUN] + common + [f"--output_dir={resumed}"]
    # history.json is written after the epoch's checkpoint: killed here, epoch 3 was under way.
    kill_when(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env),
              lambda lines: epochs_done() >= 2)
    assert epochs_done() == 2
    runner.execute(common + [f"--output_dir={resumed}"])

    expected, actual = (checkpoint_variables(str(out / "checkpoints")) for out in (straight, resumed))
    assert sorted(expected) == sorted(actual)
    compared = 0
    for name, value in expected.items():
        if isinstance(value, bytes):  # the serialized object graph
            continue
        np.testing.assert_array_equal(actual[name], value, err_msg=name)
        compared += 1
    assert compared > 20
    assert "prototypes" in " ".join(expected)  # E-step state is among what was compared
    history = [json.loads((out / "history.json").read_text()) for out in (straight, resumed)]
    assert history[0]["loss"] == history[1]["loss"]
