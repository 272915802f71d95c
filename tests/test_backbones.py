"""Backbones, heads and split BatchNorm."""

import keras
import numpy as np
import pytest

from keras_pcl import backbones


def _split_norm_reference(x, gamma, beta, num_splits, eps=1e-5):
    """Per-group batch norm in float64 NumPy: output, normalised input, and the
    per-group means and variances `[num_splits, 1, C]`."""
    groups = x.astype(np.float64).reshape((num_splits, -1, x.shape[-1]))
    mean = groups.mean(axis=1, keepdims=True)
    var = groups.var(axis=1, keepdims=True)
    xhat = (groups - mean) / np.sqrt(var + eps)
    return (xhat * gamma + beta).reshape(x.shape), xhat.reshape(x.shape), mean, var


def test_split_batch_norm_matches_per_group_reference(rng):
    x = rng.normal(2.0, 3.0, size=(8, 3, 3, 4)).astype(np.float32)
    layer = backbones.SplitBatchNormalization(num_splits=4, momentum=0.5)
    y = layer(x, training=True).numpy()
    want, _, mean, var = _split_norm_reference(x, np.ones(4), np.zeros(4), 4)
    np.testing.assert_allclose(y, want, atol=1e-4)
    np.testing.assert_allclose(layer.moving_mean.numpy(), 0.5 * mean.reshape(4, 4).mean(0), atol=1e-5)
    np.testing.assert_allclose(layer.moving_variance.numpy(), 0.5 + 0.5 * var.reshape(4, 4).mean(0), atol=1e-4)
    # Inference uses the moving statistics.
    inference = layer(x, training=False).numpy()
    want = (x - layer.moving_mean.numpy()) / np.sqrt(layer.moving_variance.numpy() + 1e-5)
    np.testing.assert_allclose(inference, want, atol=1e-4)


@pytest.mark.parametrize("shape,num_splits", [((8, 5, 3, 4), 4), ((12, 6), 3), ((6, 7, 4), 1)])
def test_split_batch_norm_gradients_match_reference(rng, shape, num_splits):
    import tensorflow as tf

    x = rng.normal(1.0, 2.0, size=shape).astype(np.float32)
    w = rng.normal(size=shape).astype(np.float32)
    layer = backbones.SplitBatchNormalization(num_splits=num_splits)
    layer.build(shape)
    gamma = rng.uniform(0.5, 1.5, size=shape[-1]).astype(np.float32)
    beta = rng.normal(size=shape[-1]).astype(np.float32)
    layer.gamma.assign(gamma)
    layer.beta.assign(beta)
    x_tensor = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x_tensor)
        y = layer(x_tensor, training=True)
        loss = tf.reduce_sum(y * w)
    grad_x, grad_gamma, grad_beta = tape.gradient(loss, [x_tensor, layer.gamma, layer.beta])
    want, xhat, _, var = _split_norm_reference(x, gamma, beta, num_splits)
    np.testing.assert_allclose(y.numpy(), want, atol=1e-4)
    np.testing.assert_allclose(grad_gamma.numpy(), (w * xhat).reshape(-1, shape[-1]).sum(0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(grad_beta.numpy(), w.reshape(-1, shape[-1]).sum(0), rtol=1e-4, atol=1e-4)
    # d/dx of sum(w * (gamma * xhat + beta)) per group: gamma / sigma * (w - mean(w) - xhat * mean(w * xhat)).
    wg = (w * gamma).astype(np.float64).reshape((num_splits, -1, shape[-1]))
    hg = xhat.reshape(wg.shape)
    want_grad = (wg - wg.mean(1, keepdims=True) - hg * (wg * hg).mean(1, keepdims=True)) / np.sqrt(var + 1e-5)
    np.testing.assert_allclose(grad_x.numpy(), want_grad.reshape(shape), rtol=1e-3, atol=1e-4)


def test_split_batch_norm_under_mixed_bfloat16_keeps_float32_statistics(rng):
    x = rng.normal(2.0, 3.0, size=(8, 4, 4, 6)).astype(np.float32)
    layer = backbones.SplitBatchNormalization(num_splits=2, momentum=0.0, dtype="mixed_bfloat16")
    y = layer(x, training=True)
    assert y.dtype == "bfloat16"
    assert layer.gamma.dtype == layer.moving_mean.dtype == "float32"
    want, _, _, var = _split_norm_reference(x, np.ones(6), np.zeros(6), 2)
    # Only the activations are rounded to bfloat16 (8 bits of mantissa).
    np.testing.assert_allclose(np.asarray(y, np.float32), want, atol=0.05)
    np.testing.assert_allclose(layer.moving_variance.numpy(), var.reshape(2, 6).mean(0), rtol=0.02)


def test_split_batch_norm_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_splits must be >= 1"):
        backbones.SplitBatchNormalization(num_splits=0)
    with pytest.raises(ValueError, match="momentum must be in"):
        backbones.SplitBatchNormalization(momentum=1.0)
    with pytest.raises(ValueError, match="rank 2 to 4"):
        backbones.SplitBatchNormalization()(np.zeros((2, 2, 2, 2, 8), np.float32))


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
