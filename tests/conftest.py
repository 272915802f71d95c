"""Shared test setup: quiet TensorFlow, two logical CPUs for MirroredStrategy tests."""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

# Must run before TensorFlow initialises its devices, i.e. before any op.
_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(_cpu, [tf.config.LogicalDeviceConfiguration()] * 2)


@pytest.fixture(scope="session")
def mirrored():
    """The one MirroredStrategy over the two logical CPUs that every test shares: TF's
    collective instance keys clash across several MirroredStrategy objects in one process."""
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def digits():
    from keras_pcl import data

    return data.load_digits()


@pytest.fixture(scope="session")
def runner():
    """experiments/run.py loaded as a module: `runner.execute([...flags])` runs it in-process."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "run.py"
    spec = importlib.util.spec_from_file_location("keras_pcl_run", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _numpy_mixed_bits(size, seed):
    """NumPy reference of `keras_pcl.hashing`: MurmurHash3's finaliser of index + seed * golden ratio."""
    mask = np.uint64(0xFFFFFFFF)
    h = (np.arange(size, dtype=np.uint64) + np.uint64(seed % 2**32) * np.uint64(0x9E3779B9)) & mask
    for shift, multiplier in ((16, 0x85EBCA6B), (13, 0xC2B2AE35)):
        h = ((h ^ (h >> np.uint64(shift))) * np.uint64(multiplier)) & mask
    return h ^ (h >> np.uint64(16))


@pytest.fixture(scope="session")
def numpy_hash():
    return _numpy_mixed_bits
