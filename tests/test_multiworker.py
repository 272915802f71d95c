"""MultiWorkerMirroredStrategy: two worker processes on 127.0.0.1 train PCL in step."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np

WORKER = str(pathlib.Path(__file__).resolve().parent / "multiworker_worker.py")


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def start_workers(cluster, tmp_path, *args):
    processes = []
    for task in range(2):
        env = dict(os.environ, TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": task}}),
                   TF_CPP_MIN_LOG_LEVEL="3")
        processes.append(subprocess.Popen([sys.executable, WORKER, str(tmp_path / f"worker{task}.npz"), *args],
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env))
    return processes


def finish(processes, timeout=400):
    outputs = []
    for process in processes:
        try:
            outputs.append(process.communicate(timeout=timeout)[0])
        finally:
            process.kill()
    return outputs


def test_two_workers_hold_identical_queue_prototypes_and_key_encoder(tmp_path):
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(2)]}
    processes = start_workers(cluster, tmp_path)
    outputs = finish(processes)
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-3000:]
    first, second = (np.load(tmp_path / f"worker{task}.npz") for task in range(2))
    assert sorted(first.files) == sorted(second.files)
    for name in first.files:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)
    assert int(first["pointer"]) == 0  # 12 global steps of 64 keys: 768 = 6 x queue
    assert first["proto_nce"][0] == 0.0 and (first["proto_nce"][1:] > 0.0).all()
    assert len(np.unique(first["assignments"][1])) > 1
    # The last global step (images 192..255, half from each worker) enqueued its keys
    # at queue rows 64..127; the bank holds the same keys at those images' rows.
    np.testing.assert_array_equal(first["bank"][192:], first["queue"][64:])


def test_a_killed_worker_stops_the_job_and_both_resume_from_the_checkpoint(tmp_path):
    import tensorflow as tf

    checkpoints = tmp_path / "checkpoints"
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(2)]}
    processes = start_workers(cluster, tmp_path, str(checkpoints), "500")  # far more epochs than it will live
    deadline = time.time() + 300
    while not (checkpoints / "checkpoint").exists():
        assert time.time() < deadline and all(p.poll() is None for p in processes), finish(processes, 5)
        time.sleep(0.05)
    time.sleep(1.0)  # a few more epochs: the kill lands mid-run
    processes[1].send_signal(signal.SIGKILL)
    survivor = finish(processes[:1], timeout=120)[0]  # a hang would time out here
    processes[1].wait()
    assert processes[0].returncode not in (0, None)
    lines = [line for line in survivor.splitlines() if "WorkerLostError" in line]
    assert lines and "lost contact with /job:worker/replica:0/task:1" in lines[-1], survivor[-3000:]

    # The chief's newest checkpoint is complete; both workers restart from it.
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(checkpoints)))
    saved_epoch = int(reader.get_tensor("epoch/.ATTRIBUTES/VARIABLE_VALUE"))
    assert saved_epoch >= 1
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(2)]}
    processes = start_workers(cluster, tmp_path, str(checkpoints), str(saved_epoch + 2))
    outputs = finish(processes)
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-3000:]
        assert f"starting at epoch {saved_epoch}" in output
    first, second = (np.load(tmp_path / f"worker{task}.npz") for task in range(2))
    for name in first.files:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)
    assert len(first["proto_nce"]) == 2 and (first["proto_nce"] > 0).all()  # the E-step ran after resuming
