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


def kill_one_worker_mid_run(tmp_path, victim):
    """Starts two workers and SIGKILLs worker `victim` once the chief has checkpointed;
    the other must stop with a WorkerLostError naming it. Returns the checkpoint folder."""
    checkpoints = tmp_path / "checkpoints"
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(2)]}
    processes = start_workers(cluster, tmp_path, str(checkpoints), "500")  # far more epochs than it will live
    deadline = time.time() + 300
    while not (checkpoints / "checkpoint").exists():
        assert time.time() < deadline and all(p.poll() is None for p in processes), finish(processes, 5)
        time.sleep(0.05)
    time.sleep(1.0)  # a few more epochs: the kill lands mid-run
    processes[victim].send_signal(signal.SIGKILL)
    survivor = processes[1 - victim]
    output = finish([survivor], timeout=120)[0]  # a hang would time out here
    processes[victim].wait()
    assert survivor.returncode not in (0, None)
    lines = [line for line in output.splitlines() if "WorkerLostError" in line]
    assert lines and f"lost contact with /job:worker/task:{victim} " in lines[-1], output[-3000:]
    return checkpoints


def test_a_killed_chief_stops_the_other_worker_and_leaves_a_whole_checkpoint(tmp_path):
    import tensorflow as tf

    checkpoints = kill_one_worker_mid_run(tmp_path, victim=0)
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(checkpoints)))
    assert int(reader.get_tensor("epoch/.ATTRIBUTES/VARIABLE_VALUE")) >= 1


def test_a_killed_worker_stops_the_job_and_both_resume_from_the_checkpoint(tmp_path):
    import tensorflow as tf

    checkpoints = kill_one_worker_mid_run(tmp_path, victim=1)

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
    # The strategy names worker 0 chief: it keeps the files, worker 1 writes to scratch.
    assert "checkpoint writer: chief=True writes to ." in outputs[0]
    assert "checkpoint writer: chief=False writes to .scratch_worker_1" in outputs[1]
    assert not any(path.name.startswith(".scratch") for path in checkpoints.iterdir())
    first, second = (np.load(tmp_path / f"worker{task}.npz") for task in range(2))
    for name in first.files:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)
    assert len(first["proto_nce"]) == 2 and (first["proto_nce"] > 0).all()  # the E-step ran after resuming


# The survivor's error names the lost peer in one of two forms, depending on what it was
# doing: a collective's failed RPC (almost every local run; trimmed from a real error), or
# the coordination service's heartbeat check (once in CI, where the old parser named the
# survivor itself, task 0; rebuilt around the first line of that error, the rest of which
# the log cut off).
COLLECTIVE_RPC_ERROR = """Graph execution error:

Detected at node allgather/CollectiveGatherV2 defined at (most recent call last):
  File "keras_pcl/callbacks.py", line 80, in embed_dataset

Collective ops is aborted by: failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:56859: Failed to connect to remote host: Connection refused
Additional GRPC error information from remote target /job:worker/replica:0/task:1 while calling /tensorflow.WorkerService/RecvBuf:
The error could be from a previous operation. Restart your program to reset.
	 [[{{node allgather/CollectiveGatherV2}}]] [Op:__inference_compute_gathered_values_2800]"""

HEARTBEAT_ERROR = """Graph execution error:

Detected at node allgather/CollectiveGatherV2 on /job:worker/replica:0/task:0/device:CPU:0:
Collective ops is aborted by: Error reported from /job:worker/task:1: The following tasks are unhealthy (stopped sending heartbeats):
/job:worker/replica:0/task:1
The tasks have crashed. Check the task logs for an earlier error to debug further."""


def test_worker_lost_error_names_the_lost_peer_never_this_worker():
    from keras_pcl.distributed import _worker_lost

    rpc = str(_worker_lost(COLLECTIVE_RPC_ERROR, ("worker", 0)))
    assert rpc.startswith("lost contact with /job:worker/task:1 of the multi-worker job (failed to connect")
    heartbeat = str(_worker_lost(HEARTBEAT_ERROR, ("worker", 0)))
    assert heartbeat.startswith("lost contact with /job:worker/task:1 of the multi-worker job "
                                "(it stopped sending heartbeats)")
    # A text naming no other task says so instead of naming this worker.
    only_self = "Collective ops is aborted by: Socket closed\nfrom remote target /job:worker/replica:0/task:0"
    assert str(_worker_lost(only_self, ("worker", 0))).startswith("lost contact with another worker ")
