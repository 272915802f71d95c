"""Backbones, heads and split BatchNorm."""

import keras
import numpy as np
import pytest

from keras_pcl import backbones


def test_split_batch_norm_matches_per_group_reference(rng):
    x = rng.normal(2.0, 3.0, size=(8, 3, 3, 4)).astype(np.float32)
    layer = backbones.SplitBatchNormalization(num_splits=4, momentum=0.5)
    y = layer(x, training=True).numpy()
    groups = x.reshape(4, 2, 3, 3, 4)
    mean = groups.mean(axis=(1, 2, 3), keepdims=True)
    var = groups.var(axis=(1, 2, 3), keepdims=True)
    want = ((groups - mean) / np.sqrt(var + 1e-5)).reshape(x.shape)
    np.testing.assert_allclose(y, want, atol=1e-4)
    np.testing.assert_allclose(layer.moving_mean.numpy(), 0.5 * mean.reshape(4, 4).mean(0), atol=1e-5)
    np.testing.assert_allclose(layer.moving_variance.numpy(), 0.5 + 0.5 * var.reshape(4, 4).mean(0), atol=1e-4)
    # Inference uses the moving statistics.
    inference = layer(x, training=False).numpy()
    want = (x - layer.moving_mean.numpy()) / np.sqrt(layer.moving_variance.numpy() + 1e-5)
    np.testing.assert_allclose(inference, want, atol=1e-4)


@pytest.mark.parametrize("build,shape,dim", [
    (lambda: backbones.small_cnn((8, 8, 1), width=8), (8, 8, 1), 16),
    (lambda: backbones.small_resnet((28, 28, 1), width=8), (28, 28, 1), 32),
    (lambda: backbones.resnet18((32, 32, 3), width=4), (32, 32, 3), 32),
    (lambda: backbones.resnet50((32, 32, 3), small_images=True, width=2, norm="batch"), (32, 32, 3), 64),
])
def test_backbone_feature_shapes(rng, build, shape, dim):
    model = build()
    features = model(rng.uniform(size=(8,) + shape).astype(np.float32), training=True)
    assert features.shape == (8, dim)


def test_resnet18_imagenet_stem_downsamples():
    model = backbones.resnet18((64, 64, 3), small_images=False, width=4, norm="none")
    assert model.get_layer("stem_conv").strides == (2, 2)
    assert any(isinstance(layer, keras.layers.MaxPooling2D) for layer in model.layers)


def test_heads():
    assert backbones.linear_head(16)(np.zeros((2, 8), np.float32)).shape == (2, 16)
    assert backbones.mlp_head(16, 32)(np.zeros((2, 8), np.float32)).shape == (2, 16)


def test_unknown_norm():
    with pytest.raises(ValueError, match="norm must be one of"):
        backbones.small_cnn(norm="group")


def test_backbone_round_trips_through_keras_file(tmp_path, rng):
    model = backbones.small_cnn((8, 8, 1), width=4)
    x = rng.uniform(size=(4, 8, 8, 1)).astype(np.float32)
    model(x, training=True)  # move the BN statistics away from their init
    path = str(tmp_path / "cnn.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(loaded(x).numpy(), model(x).numpy(), atol=1e-6)
