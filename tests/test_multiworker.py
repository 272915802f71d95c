"""MultiWorkerMirroredStrategy: two worker processes on 127.0.0.1 train PCL in step."""

import json
import os
import pathlib
import socket
import subprocess
import sys

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


def test_two_workers_hold_identical_queue_prototypes_and_key_encoder(tmp_path):
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(2)]}
    processes = []
    for task in range(2):
        env = dict(os.environ, TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": task}}),
                   TF_CPP_MIN_LOG_LEVEL="3")
        processes.append(subprocess.Popen([sys.executable, WORKER, str(tmp_path / f"worker{task}.npz")],
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env))
    outputs = []
    for process in processes:
        try:
            outputs.append(process.communicate(timeout=400)[0])
        finally:
            process.kill()
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-3000:]
    first, second = (np.load(tmp_path / f"worker{task}.npz") for task in range(2))
    assert sorted(first.files) == sorted(second.files)
    for name in first.files:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)
    assert int(first["pointer"]) == 0  # 4 global steps of 64 keys: 256 = 2 x queue
    assert first["proto_nce"][0] == 0.0 and first["proto_nce"][1] > 0.0
    assert len(np.unique(first["assignments"][1])) > 1
