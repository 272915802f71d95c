"""Reliability under real faults: kills at any moment, a full disk, signals, two runs on one folder.

Each test runs experiments/run.py on the quickstart data (subprocesses where a signal or a
kill is the point, in-process where a fault is injected), then checks what a user relies on:
history.json has one row per epoch, results.json counts every epoch once, the SavedModel loads,
a complete checkpoint is always the newest, the messages are one line with their own status.
"""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import tensorflow as tf

ROOT = pathlib.Path(__file__).resolve().parents[1]
RUN = str(ROOT / "experiments" / "run.py")
QUICKSTART = str(ROOT / "experiments" / "configs" / "quickstart.cfg")
SHORT = ["--epochs=4", "--warmup_epochs=1", "--checkpoint_every_steps=4", "--knn_every=2", "--low_shot_draws=1",
         "--num_clusters=10,20", "--queue_size=256"]


class Run:
    """run.py in a subprocess; its output is read on a thread, so tests can wait on lines and files."""

    def __init__(self, out, extra=(), method="pcl"):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
        self.process = subprocess.Popen(
            [sys.executable, "-u", RUN, f"--flagfile={QUICKSTART}", f"--method={method}", f"--output_dir={out}",
             *SHORT, *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.process.stdout), daemon=True)
        self.reader.start()

    def wait_for(self, predicate, timeout=240):
        deadline = time.time() + timeout
        while not predicate(self.lines):
            assert self.process.poll() is None, "ended before the moment:\n" + "".join(self.lines[-20:])
            assert time.time() < deadline, "".join(self.lines[-20:])
            time.sleep(0.003)

    def signal(self, signum=signal.SIGKILL):
        self.process.send_signal(signum)

    def finish(self, timeout=300):
        self.process.wait(timeout)
        self.reader.join(5)
        return self.process.returncode, "".join(self.lines)


def printed(text):
    return lambda lines: any(text in line for line in lines)


def checkpoint_epoch(path):
    return int(tf.train.load_checkpoint(str(path)).get_tensor("epoch/.ATTRIBUTES/VARIABLE_VALUE"))


def latest_checkpoint_epoch(directory):
    return checkpoint_epoch(tf.train.latest_checkpoint(str(directory)))


def running_checkpoint_epoch(directory):
    """`latest_checkpoint_epoch` while another process is saving there: -1 until it reads whole.

    TF's file reader takes the size from the path but reads the file it opened, so a save's
    atomic rename of `checkpoint` in between hands it a truncated state; and a pruned
    checkpoint's files vanish. Python's read sees one file, old or new, whole."""
    try:
        state = (directory / "checkpoint").read_text()
        name = re.search(r'^model_checkpoint_path: "(.+)"$', state, re.MULTILINE).group(1)
        return checkpoint_epoch(directory / name)
    except (OSError, AttributeError, tf.errors.OpError):
        return -1


def assert_complete(out, epochs=4):
    """What a finished run must hold, however many times it was killed on the way."""
    history = json.loads((out / "history.json").read_text())
    assert history["epoch"] == list(range(1, epochs + 1))
    assert all(len(values) == epochs for values in history.values())
    results = json.loads((out / "results.json").read_text())
    assert results["train_seconds"] == pytest.approx(sum(history["epoch_seconds"]), abs=0.06)
    assert results["evaluation"]["encoder"]["knn_top1"] > 0.3
    served = tf.saved_model.load(str(out / "saved_model"))
    assert served.embed(tf.zeros([2, 8, 8, 1], tf.uint8))["features"].shape == (2, 64)
    assert not [p.name for p in out.iterdir() if p.name.startswith((".export-", ".old-")) or ".tmp" in p.name]


def test_sigkill_during_training_at_every_moment_loses_no_epoch_row(tmp_path):
    """Killed at start-up, right after a mid-epoch checkpoint, right after an epoch's checkpoint
    (where history.json used to lag behind it) and inside the E-step; each re-run resumes."""
    out = tmp_path / "run"
    checkpoints = out / "checkpoints"
    moments = [
        printed("dataset digits"),  # start-up: nothing trained yet
        lambda lines: (checkpoints / "checkpoint").exists(),  # the first step checkpoint
        lambda lines: running_checkpoint_epoch(checkpoints) >= 2,
        printed("E-step: embedding"),
    ]
    for moment in moments:
        run = Run(out)
        run.wait_for(moment)
        run.signal()
        run.finish()
    code, output = Run(out).finish()
    assert code == 0, output[-3000:]
    assert "resuming" in output
    assert_complete(out)


def test_sigkill_during_evaluation_and_export_then_rerun(tmp_path):
    out = tmp_path / "run"
    for moment in (printed("evaluating the frozen encoder"),
                   lambda lines: any(p.name.startswith(".export-") for p in out.iterdir())):
        run = Run(out)
        run.wait_for(moment)
        run.signal()
        run.finish()
        assert not (out / "saved_model").exists() or (out / "saved_model" / "saved_model.pb").exists()
    code, output = Run(out).finish()
    assert code == 0, output[-3000:]
    assert_complete(out)


@pytest.mark.parametrize("method", ["pcl", "byol"])
def test_sigterm_checkpoints_the_step_and_the_rerun_resumes_there(tmp_path, method):
    out = tmp_path / method
    run = Run(out, ["--checkpoint_every_steps=0"], method=method)
    run.wait_for(printed("Epoch 3/4"))
    run.signal(signal.SIGTERM)
    code, output = run.finish()
    assert code == 143, output[-2000:]
    message = [line for line in output.splitlines() if line.startswith("run.py: error: ")]
    assert len(message) == 1 and "interrupted at epoch 3, step " in message[0], output[-2000:]
    assert message[0].endswith("; run the same command to resume")
    step = int(message[0].split("step ")[1].split(";")[0])
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(out / "checkpoints")))
    assert int(reader.get_tensor("epoch/.ATTRIBUTES/VARIABLE_VALUE")) == 2  # epochs 1-2 done, 3 under way
    assert int(reader.get_tensor("optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE")) == 2 * 11 + step
    assert json.loads((out / "history.json").read_text())["epoch"] == [1, 2]
    code, output = Run(out, ["--checkpoint_every_steps=0"], method=method).finish()
    assert code == 0, output[-3000:]
    assert f"resuming {out} at epoch 2; the {step} steps of epoch 3 done before the stop run again" in output
    assert_complete(out)
    # The replayed steps do not count twice: the schedule ends with the last epoch, not `step` steps early.
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(out / "checkpoints")))
    assert int(reader.get_tensor("optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE")) == 4 * 11


def test_sigint_during_evaluation_stops_the_run(tmp_path):
    out = tmp_path / "run"
    run = Run(out)
    run.wait_for(printed("evaluating the frozen encoder"))
    run.signal(signal.SIGINT)
    code, output = run.finish()
    assert code == 130, output[-2000:]
    assert "run.py: error: interrupted during evaluation; run the same command to resume" in output
    assert not (out / "results.json").exists()


def test_sigint_during_export_stops_the_run_with_its_message(tmp_path):
    """Ctrl-C once the results are written ends with the stage's message and 130, never a traceback.

    Raised mid-way through TF's SavedModel graph building, the interruption ended in TF's own
    scope error and exit 1 (1 of 24 hand-run tries with the signal delayed 0-3 s, training
    sharing the cores); the export now defers the signal to its end. This test lands in that
    window only by chance: it pins the outcome, not the race.
    """
    out = tmp_path / "run"
    run = Run(out)
    run.wait_for(lambda lines: (out / "results.json").exists())  # written just before the export
    run.signal(signal.SIGINT)
    code, output = run.finish()
    assert code == 130, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    message = [line for line in output.splitlines() if line.startswith("run.py: error: ")]
    assert len(message) == 1 and re.match(r"run.py: error: interrupted during (export|plots); ", message[0]), output[-2000:]


def test_a_second_sigint_aborts_at_once(digits):
    """The first Ctrl-C asks for a checkpoint at the next step; a second one does not wait for it."""
    import keras

    import keras_pcl
    from keras_pcl import backbones

    model = keras_pcl.SimCLR(backbones.small_cnn((8, 8, 1), width=8), keras_pcl.models.heads.mlp(8, (8,)))
    model.compile(optimizer="sgd")
    checkpoint = keras_pcl.callbacks.TrainingCheckpoint("/nonexistent-never-written")
    checkpoint.set_model(model)
    checkpoint.on_train_begin()
    try:
        assert signal.getsignal(signal.SIGINT) == checkpoint._on_signal
        checkpoint._on_signal(signal.SIGINT, None)  # the first: remembered, nothing raised
        with pytest.raises(KeyboardInterrupt):
            checkpoint._on_signal(signal.SIGINT, None)
    finally:
        checkpoint.on_train_end()
    assert signal.getsignal(signal.SIGINT) != checkpoint._on_signal
    del keras


def test_a_mid_epoch_checkpoint_sets_the_step_counter_back_to_the_epoch_start(tmp_path):
    """Restoring a checkpoint saved 3 steps into epoch 2 resumes at that epoch's start with the
    optimizer's counter there too (the 3 steps run again); checkpoints are numbered by save, so a
    step reached again never overwrites an earlier checkpoint."""
    import keras_pcl
    from keras_pcl import backbones

    def model():
        built = keras_pcl.SimCLR(backbones.small_cnn((8, 8, 1), width=8), keras_pcl.models.heads.mlp(8, (8,)))
        built.compile(optimizer="sgd")
        built.optimizer.build(built.trainable_variables)
        return built

    def checkpoint(model):  # one per model, as run.py makes
        made = keras_pcl.callbacks.TrainingCheckpoint(str(tmp_path / "ckpt"))
        made.set_model(model)
        return made

    first = model()
    first.optimizer.iterations.assign(5 + 3)  # epoch 1 had 5 steps; 3 of epoch 2 done
    paths = [checkpoint(first).save(1, 3)]
    resumed = model()
    saver = checkpoint(resumed)
    assert saver.restore(resumed) == 1 and saver.replayed_steps == 3
    assert int(resumed.optimizer.iterations.numpy()) == 5
    resumed.optimizer.iterations.assign(5 + 3)  # the same step, reached again
    paths.append(saver.save(1, 3))
    resumed.optimizer.iterations.assign(10)
    paths.append(saver.save(2))
    assert len(set(paths)) == 3 and tf.train.latest_checkpoint(str(tmp_path / "ckpt")) == paths[-1]
    again = model()
    reader = checkpoint(again)
    assert reader.restore(again) == 2 and reader.replayed_steps == 0
    assert int(again.optimizer.iterations.numpy()) == 10


def test_a_full_disk_stops_with_one_line_and_exit_4_and_the_run_resumes(runner, tmp_path, capsys, monkeypatch):
    """ENOSPC injected into the third checkpoint write: one line naming the folder and the cause,
    status 4, the newest checkpoint complete and its epochs the history's; once space is back the
    same command resumes and finishes."""
    out = tmp_path / "run"
    argv = [f"--flagfile={QUICKSTART}", f"--output_dir={out}", "--knn_every=0", "--low_shot_draws=1",
            "--num_clusters=10,20", "--queue_size=256", "--epochs=4", "--warmup_epochs=1"]
    saves = []
    original = tf.train.CheckpointManager.save

    def full_disk(self, *args, **kwargs):
        saves.append(1)
        if len(saves) == 3:
            raise tf.errors.ResourceExhaustedError(None, None, "ckpt-33.data-00000-of-00001.tempstate; "
                                                   "No space left on device [Op:SaveV2]")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(tf.train.CheckpointManager, "save", full_disk)
    with pytest.raises(SystemExit) as exit_info:
        runner.execute(argv)
    assert exit_info.value.code == 4
    err = capsys.readouterr().err.strip()
    assert err == (f"run.py: error: could not write {out / 'checkpoints'}: No space left on device; free space "
                   "(or make the folder writable) and run the same command to resume")
    assert latest_checkpoint_epoch(out / "checkpoints") == 2
    assert json.loads((out / "history.json").read_text())["epoch"] == [1, 2]
    monkeypatch.setattr(tf.train.CheckpointManager, "save", original)
    runner.execute(argv)
    assert f"resuming {out} at epoch 2" in capsys.readouterr().out
    assert_complete(out)

    # A full disk while results.json is rewritten (a re-run re-evaluates): the old one stays whole.
    before = {name: (out / name).read_bytes() for name in ("results.json", "model.keras")}
    import json as json_module

    real_dump = json_module.dump

    def failing_dump(value, f, **kwargs):
        if "evaluation" in value:
            f.write('{"half": ')
            raise OSError(28, "No space left on device")
        return real_dump(value, f, **kwargs)

    monkeypatch.setattr(json_module, "dump", failing_dump)
    with pytest.raises(SystemExit) as exit_info:
        runner.execute(argv)
    assert exit_info.value.code == 4
    assert f"could not write {out / 'results.json'}: No space left on device" in capsys.readouterr().err
    assert {name: (out / name).read_bytes() for name in before} == before
    assert not list(out.glob("*.tmp"))


def test_a_second_run_on_a_live_folder_is_refused_and_a_dead_ones_lock_taken_over(runner, tmp_path, capsys):
    out = tmp_path / "run"
    first = Run(out, ["--epochs=400"])
    first.wait_for(printed("Epoch 2/400"))
    pid = first.process.pid
    listing = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(SystemExit) as exit_info:
        runner.execute([f"--flagfile={QUICKSTART}", f"--output_dir={out}", *SHORT, "--epochs=400"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"run.py: error: --output_dir {out} is in use by a run that is still going (pid {pid}); "
                   "wait for it to finish, or choose another --output_dir.")
    assert first.process.poll() is None  # the first run goes on
    first.signal()
    first.finish()
    listing_after = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert set(listing) <= set(listing_after)  # the refused run removed nothing
    assert {name: listing_after[name] for name in ("config.json", ".lock")} == \
        {name: listing[name] for name in ("config.json", ".lock")}
    # The same run (epochs and monitors may differ on resume): it takes the lock and finishes.
    runner.execute([f"--flagfile={QUICKSTART}", f"--output_dir={out}", *SHORT, "--epochs=2", "--knn_every=0",
                    "--export=false", "--plots=false", "--raw_pixels=false"])
    assert f"taking over {out / '.lock'} from an earlier run (pid {pid}) that is no longer running" in \
        capsys.readouterr().out


def test_the_checkpoint_holds_the_history_of_every_epoch(tmp_path, digits):
    """In user code: TrainingCheckpoint.history has each finished epoch's logs, restored with the state."""
    import keras

    import keras_pcl
    from keras_pcl import backbones, data

    def build():
        model = keras_pcl.MoCo(backbones.small_cnn((8, 8, 1), width=8, norm="none"), backbones.mlp_head(8, 16),
                               queue_size=32)
        model.compile(optimizer=keras.optimizers.SGD(0.01))
        return model

    x = data.to_float(digits[0][:64])
    ds = tf.data.Dataset.from_tensor_slices({"views": (x, x)}).batch(16, drop_remainder=True)
    model = build()
    checkpoint = keras_pcl.callbacks.TrainingCheckpoint(str(tmp_path))
    keras_history = model.fit(ds, epochs=3, callbacks=[checkpoint], verbose=0).history
    assert checkpoint.history["epoch"] == [1, 2, 3]
    np.testing.assert_allclose(checkpoint.history["loss"], keras_history["loss"], rtol=1e-6)
    again = keras_pcl.callbacks.TrainingCheckpoint(str(tmp_path))
    assert again.restore(build()) == 3
    assert again.history == checkpoint.history
