"""RandomResizedCrop, RandomApply and the presets."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_pcl import augment


def test_full_crop_is_a_resize(rng):
    images = rng.uniform(size=(3, 16, 16, 3)).astype(np.float32)
    crop = augment.RandomResizedCrop(16, 16, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    np.testing.assert_allclose(crop(images).numpy(), images, atol=1e-5)


def test_crop_area_follows_scale():
    """A crop of a horizontal ramp spans a fraction of its range set by the crop width."""
    ramp = np.tile(np.linspace(0, 1, 64, dtype=np.float32)[None, :, None], (64, 1, 1))
    images = np.repeat(ramp[None], 256, axis=0)
    crop = augment.RandomResizedCrop(32, 32, scale=(0.25, 0.25), ratio=(1.0, 1.0), seed=1)
    out = crop(images).numpy()
    spans = out[:, 0, -1, 0] - out[:, 0, 0, 0]  # width fraction of each crop, about 0.5
    assert spans.shape == (256,)
    np.testing.assert_allclose(spans, 0.5, atol=0.05)
    starts = out[:, 0, 0, 0]
    assert starts.min() < 0.1 and starts.max() > 0.4  # positions vary


def test_crop_output_shape_and_inference_mode(rng):
    images = rng.uniform(size=(2, 20, 24, 1)).astype(np.float32)
    crop = augment.RandomResizedCrop(8, 8)
    assert crop(images).shape == (2, 8, 8, 1)
    np.testing.assert_allclose(crop(images, training=False), tf.image.resize(images, [8, 8]))


@pytest.mark.parametrize("kwargs", [dict(scale=(0.5, 0.2)), dict(scale=(0.0, 1.0)), dict(ratio=(2.0, 1.0))])
def test_crop_rejects_bad_ranges(kwargs):
    with pytest.raises(ValueError):
        augment.RandomResizedCrop(8, 8, **kwargs)


class AddOne(keras.layers.Layer):
    def call(self, x, training=None):
        return x + 1.0


def test_random_apply_rate(rng):
    images = np.zeros((2000, 2, 2, 1), np.float32)
    assert np.all(augment.RandomApply(AddOne(), 0.0)(images).numpy() == 0)
    assert np.all(augment.RandomApply(AddOne(), 1.0)(images).numpy() == 1)
    applied = augment.RandomApply(AddOne(), 0.3, seed=0)(images).numpy()[:, 0, 0, 0]
    assert set(np.unique(applied)) <= {0.0, 1.0}
    assert 0.25 < applied.mean() < 0.35
    with pytest.raises(ValueError, match="rate"):
        augment.RandomApply(AddOne(), 1.5)


@pytest.mark.parametrize("preset", ["pcl_v1", "pcl_v2"])
@pytest.mark.parametrize("channels", [1, 3])
def test_presets_make_views_in_range(rng, preset, channels):
    images = rng.uniform(size=(8, 28, 28, channels)).astype(np.float32)
    pipeline = augment.get_preset(preset, 24, channels)
    a, b = pipeline(images).numpy(), pipeline(images).numpy()
    assert a.shape == (8, 24, 24, channels)
    assert a.min() >= -1e-4 and a.max() <= 1 + 1e-4
    assert not np.allclose(a, b)  # two draws give two different views


def test_presets_run_inside_tf_data(rng):
    images = rng.uniform(size=(8, 16, 16, 3)).astype(np.float32)
    pipeline = augment.pcl_v2(12, 3)
    ds = tf.data.Dataset.from_tensor_slices(images).batch(4).map(lambda x: pipeline(x, training=True))
    assert [b.shape for b in ds] == [(4, 12, 12, 3)] * 2


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown augmentation"):
        augment.get_preset("nope", 8)


def test_layers_round_trip_config():
    crop = augment.RandomResizedCrop(10, 12, scale=(0.3, 0.9), ratio=(0.5, 2.0), seed=3)
    clone = augment.RandomResizedCrop.from_config(crop.get_config())
    assert (clone.height, clone.width, clone.scale, clone.ratio, clone.seed) == (10, 12, (0.3, 0.9), (0.5, 2.0), 3)
    apply = augment.RandomApply(keras.layers.RandomFlip("horizontal"), 0.4)
    clone = augment.RandomApply.from_config(apply.get_config())
    assert clone.rate == 0.4 and isinstance(clone.layer, keras.layers.RandomFlip)
