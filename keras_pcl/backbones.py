"""Encoders (ResNet-18/50 with a small-image stem, a tiny CNN) and projection heads.

Every backbone maps images `[B, H, W, C]` (float, `[0, 1]`) to pooled
features `[B, D]`. The `norm` argument picks the normalisation layer:

* `"split"` (default): `SplitBatchNormalization`, batch statistics per group
  of `num_splits` sub-batches. This is keras_pcl's single-device replacement
  for MoCo's cross-GPU shuffle-BN: MoCo shuffles the key batch before the key
  encoder, so a query and its key are normalised with statistics of different
  sub-batches and the model cannot cheat through BN statistics. With split
  BN the same happens on one device (and on each replica under a strategy).
* `"batch"`: plain batch normalisation (per-replica statistics), i.e.
  `SplitBatchNormalization(num_splits=1)`;
* `"sync_batch"`: BatchNormalization(synchronized=True), statistics across replicas;
* `"none"`: no normalisation.
"""

import keras
import tensorflow as tf
from keras import layers

from keras_pcl.errors import InvalidInputError
from keras_pcl.models import heads

_register = keras.saving.register_keras_serializable(package="keras_pcl")

NORMS = ("split", "batch", "sync_batch", "none")


@_register
class SplitBatchNormalization(keras.layers.Layer):
    """BatchNormalization whose training statistics are computed per sub-batch.

    The batch (its size must be divisible by `num_splits`) is cut into
    `num_splits` groups; each is normalised with its own mean and variance.
    Moving statistics follow the average over groups. Inference uses the
    moving statistics, as BatchNormalization does. With `num_splits=1` this is
    plain BatchNormalization.

    Each group goes through TensorFlow's fused batch-norm kernel, which keeps
    the activations in the compute dtype (bfloat16 under `mixed_bfloat16`) and
    the statistics, `gamma` and `beta` in float32. Keras' BatchNormalization
    instead upcasts the activations to float32 and normalises in several
    elementwise ops; on CPU the fused kernel is about 3x faster per layer,
    forward and backward (`bench/RESULTS.md`).

    Args:
        num_splits: number of sub-batches (MoCo's GPUs per machine; 8 here).
        momentum, epsilon: as in `keras.layers.BatchNormalization`.

    Input shape: `[B, ..., C]` (rank 2 to 4), `B` divisible by `num_splits`.
    """

    def __init__(self, num_splits=8, momentum=0.9, epsilon=1e-5, **kwargs):
        super().__init__(**kwargs)
        if num_splits < 1:
            raise InvalidInputError(f"num_splits must be >= 1, got {num_splits}.")
        if not 0.0 <= momentum < 1.0:
            raise InvalidInputError(f"momentum must be in [0, 1), got {momentum}.")
        if epsilon <= 0:
            raise InvalidInputError(f"epsilon must be > 0, got {epsilon}.")
        self.num_splits, self.momentum, self.epsilon = int(num_splits), momentum, epsilon

    def build(self, input_shape):
        if not 2 <= len(input_shape) <= 4:
            raise InvalidInputError(f"SplitBatchNormalization takes inputs of rank 2 to 4, got shape {input_shape}.")
        channels = (input_shape[-1],)
        # Float32 parameters and statistics, read as float32 under mixed precision (the
        # fused kernel takes float32 scale and offset with bfloat16 activations).
        self.gamma = self.add_weight(shape=channels, initializer="ones", name="gamma", autocast=False)
        self.beta = self.add_weight(shape=channels, initializer="zeros", name="beta", autocast=False)
        # "mean" aggregation keeps the moving statistics identical across replicas.
        self.moving_mean = self.add_weight(
            shape=channels, initializer="zeros", trainable=False, name="moving_mean",
            aggregation="mean", autocast=False,
        )
        self.moving_variance = self.add_weight(
            shape=channels, initializer="ones", trainable=False, name="moving_variance",
            aggregation="mean", autocast=False,
        )

    def _fused(self, x, training):
        empty = tf.zeros([0], tf.float32)
        y, mean, variance, *_ = tf.raw_ops.FusedBatchNormV3(
            x=x, scale=tf.convert_to_tensor(self.gamma), offset=tf.convert_to_tensor(self.beta),
            mean=empty if training else tf.convert_to_tensor(self.moving_mean),
            variance=empty if training else tf.convert_to_tensor(self.moving_variance),
            epsilon=self.epsilon, is_training=training,
        )
        return y, mean, variance

    def call(self, inputs, training=False):
        shape = tf.shape(inputs)
        x = inputs if len(inputs.shape) == 4 else tf.reshape(inputs, [shape[0], -1, 1, shape[-1]])
        if not training:
            y = self._fused(x, False)[0]
            return tf.reshape(y, shape)
        outputs, means, variances = [], [], []
        for group in tf.split(x, self.num_splits, axis=0):
            y, mean, variance = self._fused(group, True)
            outputs.append(y)
            means.append(mean)
            variances.append(variance)
        y = outputs[0] if self.num_splits == 1 else tf.concat(outputs, axis=0)
        # The kernel returns the unbiased variance; the moving statistics keep the
        # biased one, as Keras' BatchNormalization does.
        count = tf.cast(tf.size(x) // (self.num_splits * shape[-1]), tf.float32)
        batch_mean = tf.add_n(means) / self.num_splits
        batch_var = tf.add_n(variances) / self.num_splits * (count - 1.0) / tf.maximum(count, 1.0)
        self.moving_mean.assign(self.momentum * self.moving_mean + (1 - self.momentum) * batch_mean)
        self.moving_variance.assign(
            self.momentum * self.moving_variance + (1 - self.momentum) * batch_var
        )
        return tf.reshape(y, shape)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(num_splits=self.num_splits, momentum=self.momentum, epsilon=self.epsilon)
        return config


def normalization(norm, num_splits=8, name=None):
    """The normalisation layer named by `norm` (see the module docstring)."""
    if norm == "split":
        return SplitBatchNormalization(num_splits, name=name)
    if norm == "batch":
        # The same statistics as layers.BatchNormalization, through the fused kernel.
        return SplitBatchNormalization(1, name=name)
    if norm == "sync_batch":
        return layers.BatchNormalization(momentum=0.9, epsilon=1e-5, synchronized=True, name=name)
    if norm == "none":
        return layers.Identity(name=name)
    raise InvalidInputError(f"norm must be one of {NORMS}, got {norm!r}.")


def _conv(filters, kernel, stride, name):
    return layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False,
                         kernel_initializer="he_normal", name=name)


def _basic_block(x, filters, stride, norm, num_splits, name):
    shortcut = x
    y = _conv(filters, 3, stride, f"{name}_conv1")(x)
    y = layers.ReLU()(normalization(norm, num_splits, f"{name}_norm1")(y))
    y = _conv(filters, 3, 1, f"{name}_conv2")(y)
    y = normalization(norm, num_splits, f"{name}_norm2")(y)
    if stride != 1 or x.shape[-1] != filters:
        shortcut = normalization(norm, num_splits, f"{name}_down_norm")(
            _conv(filters, 1, stride, f"{name}_down_conv")(x)
        )
    return layers.ReLU()(layers.Add()([y, shortcut]))


def _bottleneck_block(x, filters, stride, norm, num_splits, name):
    shortcut = x
    y = layers.ReLU()(normalization(norm, num_splits, f"{name}_norm1")(_conv(filters, 1, 1, f"{name}_conv1")(x)))
    y = layers.ReLU()(normalization(norm, num_splits, f"{name}_norm2")(_conv(filters, 3, stride, f"{name}_conv2")(y)))
    y = normalization(norm, num_splits, f"{name}_norm3")(_conv(4 * filters, 1, 1, f"{name}_conv3")(y))
    if stride != 1 or x.shape[-1] != 4 * filters:
        shortcut = normalization(norm, num_splits, f"{name}_down_norm")(
            _conv(4 * filters, 1, stride, f"{name}_down_conv")(x)
        )
    return layers.ReLU()(layers.Add()([y, shortcut]))


def resnet(input_shape, blocks_per_stage, widths, bottleneck=False, small_images=True,
           stem_stride=1, norm="split", num_splits=8, name="resnet"):
    """A ResNet (He et al., 2016) returning globally pooled features.

    Args:
        input_shape: `(H, W, C)`.
        blocks_per_stage: blocks in each stage, e.g. `(2, 2, 2, 2)`.
        widths: channels of each stage, e.g. `(64, 128, 256, 512)`.
        bottleneck: bottleneck blocks (ResNet-50) instead of basic blocks.
        small_images: CIFAR-style stem (3x3 conv, no max-pool) instead of the
            ImageNet stem (7x7 stride-2 conv and max-pool).
        stem_stride: stride of the small-image stem conv (2 quarters the cost
            on 28-32 px images).
        norm, num_splits: normalisation, see the module docstring.
    """
    inputs = keras.Input(input_shape, name="images")
    if small_images:
        x = _conv(widths[0], 3, stem_stride, "stem_conv")(inputs)
    else:
        x = _conv(widths[0], 7, 2, "stem_conv")(inputs)
    x = layers.ReLU()(normalization(norm, num_splits, "stem_norm")(x))
    if not small_images:
        x = layers.MaxPooling2D(3, 2, padding="same")(x)
    block = _bottleneck_block if bottleneck else _basic_block
    for stage, (count, width) in enumerate(zip(blocks_per_stage, widths)):
        for i in range(count):
            stride = 2 if stage > 0 and i == 0 else 1
            x = block(x, width, stride, norm, num_splits, f"stage{stage + 1}_block{i + 1}")
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, x, name=name)


def resnet18(input_shape=(32, 32, 3), small_images=True, width=64, stem_stride=1, norm="split",
             num_splits=8):
    """ResNet-18: basic blocks (2, 2, 2, 2), features `[B, 8 * width]` (512)."""
    return resnet(input_shape, (2, 2, 2, 2), [width * m for m in (1, 2, 4, 8)],
                  small_images=small_images, stem_stride=stem_stride, norm=norm,
                  num_splits=num_splits, name="resnet18")


def resnet50(input_shape=(224, 224, 3), small_images=False, width=64, stem_stride=1, norm="split",
             num_splits=8):
    """ResNet-50: bottleneck blocks (3, 4, 6, 3), features `[B, 32 * width]` (2048)."""
    return resnet(input_shape, (3, 4, 6, 3), [width * m for m in (1, 2, 4, 8)], bottleneck=True,
                  small_images=small_images, stem_stride=stem_stride, norm=norm,
                  num_splits=num_splits, name="resnet50")


def small_resnet(input_shape=(28, 28, 1), width=32, norm="split", num_splits=8):
    """A small ResNet for 28-32 px images on CPU: stride-2 3x3 stem, stages
    (width, 2w, 4w) of 2 basic blocks; features `[B, 4 * width]`."""
    return resnet(input_shape, (2, 2, 2), [width, 2 * width, 4 * width], small_images=True,
                  stem_stride=2, norm=norm, num_splits=num_splits, name="small_resnet")


def small_cnn(input_shape=(8, 8, 1), width=32, norm="split", num_splits=2):
    """A tiny CNN for tests and quick CPU runs: two 3x3 conv blocks and pooling;
    features `[B, 2 * width]`."""
    inputs = keras.Input(input_shape, name="images")
    x = inputs
    for i, filters in enumerate((width, 2 * width)):
        x = _conv(filters, 3, 1 if i == 0 else 2, f"conv{i + 1}")(x)
        x = layers.ReLU()(normalization(norm, num_splits, f"norm{i + 1}")(x))
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, x, name="small_cnn")


def linear_head(embedding_dim=128, name="linear_head"):
    """PCL/MoCo v1 head: one linear layer to `embedding_dim` (`keras_pcl.models.heads.mlp`)."""
    return heads.mlp(embedding_dim, (), name=name)


def mlp_head(embedding_dim=128, hidden_dim=2048, name="mlp_head"):
    """PCL/MoCo v2 head: Linear(hidden) -> ReLU -> Linear(embedding_dim), no BatchNorm
    (`keras_pcl.models.heads.mlp`)."""
    return heads.mlp(embedding_dim, (hidden_dim,), name=name)


BACKBONES = {"small_cnn": small_cnn, "small_resnet": small_resnet, "resnet18": resnet18,
             "resnet50": resnet50}
