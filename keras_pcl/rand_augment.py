"""RandAugment as timm implements it (and PaCo's code copies): two of 15 operations per image.

Keras' `RandAugment` is a different recipe: it picks the operations once per batch, applies
every one it picks, and reads its `factor` as a range of strengths per operation. This module
follows timm's `rand_augment_transform("rand-n2-m10-mstd0.5")`: each image draws its own
operations (with replacement), applies each with probability 1/2 at a magnitude drawn from
N(m, std) clipped to [0, 10], and the operations act as PIL's `ImageOps` / `ImageEnhance` do.
"""

import math

import keras
import tensorflow as tf

from keras_pcl.errors import InvalidInputError, check_count, check_non_negative, check_unit_interval

OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
       "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
_OP = {name: index for index, name in enumerate(OPS)}
_GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
MAX_MAGNITUDE = 10.0


def _per_image(value):
    return tf.reshape(value, [-1, 1, 1, 1])


def luma(x):
    """Grey level of `[B, H, W, C]` images: PIL's (and ITU-R 601's) RGB weights for 3 channels, the
    channel mean otherwise (one channel is its own grey; other counts have no luma weights)."""
    if x.shape[-1] != 3:
        return tf.reduce_mean(x, axis=-1, keepdims=True)
    return tf.reduce_sum(x * tf.constant([0.299, 0.587, 0.114]), axis=-1, keepdims=True)


def _blend(degenerate, x, factor):
    """PIL's `ImageEnhance`: `degenerate + factor * (x - degenerate)`, clipped."""
    return tf.clip_by_value(degenerate + _per_image(factor) * (x - degenerate), 0.0, 1.0)


def _equalize(levels):
    """PIL's `ImageOps.equalize` per image and channel, on integer levels 0..255 (float32)."""
    batch, height, width, channels = tf.unstack(tf.shape(levels))
    per_channel = tf.reshape(tf.transpose(tf.cast(levels, tf.int32), [0, 3, 1, 2]), [batch * channels, -1])
    rows = batch * channels
    histogram = tf.math.unsorted_segment_sum(
        tf.ones_like(per_channel), per_channel + 256 * tf.range(rows)[:, None], rows * 256)
    histogram = tf.reshape(histogram, [rows, 256])
    total = height * width
    last_used = 255 - tf.argmax(tf.reverse(tf.cast(histogram > 0, tf.int32), [1]), axis=1, output_type=tf.int32)
    step = (total - tf.gather(histogram, last_used, batch_dims=1)) // 255
    safe_step = tf.maximum(step, 1)
    lut = tf.minimum((safe_step[:, None] // 2 + tf.cumsum(histogram, axis=1, exclusive=True)) // safe_step[:, None],
                     255)
    # One used level (or too few pixels off the top one) leaves the channel as it is, as PIL does.
    lut = tf.where((step > 0)[:, None], lut, tf.range(256)[None, :])
    equalized = tf.gather(lut, per_channel, batch_dims=1)
    return tf.transpose(tf.reshape(tf.cast(equalized, tf.float32), [batch, channels, height, width]), [0, 2, 3, 1])


def _smooth(x):
    """PIL's `ImageFilter.SMOOTH` (3x3, centre 5, the rest 1, over 13); the border rows and columns stay."""
    channels = x.shape[-1]
    kernel = tf.constant([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, channels, 1])
    smoothed = tf.nn.depthwise_conv2d(x, kernel, [1, 1, 1, 1], "SAME")
    height, width = tf.shape(x)[1], tf.shape(x)[2]
    rows, cols = tf.range(height), tf.range(width)
    interior = ((rows > 0) & (rows < height - 1))[:, None] & ((cols > 0) & (cols < width - 1))[None, :]
    return tf.where(interior[None, :, :, None], smoothed, x)


def _affine(op, strength, height, width, translate_fraction):
    """Each image's inverse map (output pixel -> input pixel) as TF's 8-vector, identity for non-geometric ops.

    Built as PIL builds it, in coordinates whose pixel centres sit at +0.5 (rotation about
    (W/2, H/2)), then moved to TF's, whose centres are the integer indices.
    """
    h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    zero, one = tf.zeros_like(strength), tf.ones_like(strength)
    angle = -strength * 30.0 * math.pi / 180.0
    cos, sin = tf.cos(angle), tf.sin(angle)
    shear, shift = strength * 0.3, strength * translate_fraction

    def rotation():
        cx, cy = w / 2.0, h / 2.0
        return cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy

    candidates = {
        "Rotate": rotation(),
        "ShearX": (one, shear, zero, zero, one, zero),
        "ShearY": (one, zero, zero, shear, one, zero),
        "TranslateXRel": (one, zero, shift * w, zero, one, zero),
        "TranslateYRel": (one, zero, zero, zero, one, shift * h),
    }
    a = [one, zero, zero, zero, one, zero]
    for name, matrix in candidates.items():
        chosen = tf.equal(op, _OP[name])
        a = [tf.where(chosen, new, old) for new, old in zip(matrix, a)]
    a00, a01, b0, a10, a11, b1 = a
    # x_pil = x_tf + 0.5 on both sides of the map: the offset picks up A @ (0.5, 0.5) - 0.5.
    b0 = b0 + 0.5 * (a00 + a01) - 0.5
    b1 = b1 + 0.5 * (a10 + a11) - 0.5
    return tf.stack([a00, a01, b0, a10, a11, b1, zero, zero], axis=1)


def rand_augment_op(images, ops, magnitudes, signs=None, fill_value=0.5, translate_fraction=0.45):
    """Applies one RandAugment operation to each image, as timm's `AugmentOp` with PIL.

    Magnitude `m` in [0, 10] sets the strength `s = m / 10`: Rotate by `30 s` degrees, ShearX/Y
    by `0.3 s`, TranslateX/YRel by `translate_fraction * s` of the side (these three times the
    sign); Posterize keeps `floor(4 s)` bits; Solarize inverts levels `>= floor(256 s)`;
    SolarizeAdd adds `floor(110 s)` levels to those below 128; Color, Contrast, Brightness and
    Sharpness blend with PIL's degenerate image by a factor `1.8 s + 0.1`; AutoContrast,
    Equalize and Invert ignore `m`. Operations PIL defines on 8-bit levels (AutoContrast,
    Equalize, Posterize, Solarize, SolarizeAdd) round the image to levels first; the others
    stay continuous. Geometric operations interpolate bilinearly (timm picks bilinear or
    bicubic at random) and fill uncovered pixels with `fill_value`.

    Args:
        images: `[B, H, W, C]` floats in `[0, 1]`.
        ops: `[B]` integers, an index into `OPS` per image, or -1 to leave the image as it is.
        magnitudes: `[B]` magnitudes in `[0, 10]`.
        signs: `[B]` of +1 or -1 for the geometric operations' direction (default +1).
        fill_value: a level in `[0, 1]`, or one per channel.
        translate_fraction: the largest translation, as a fraction of the side.

    Returns:
        `[B, H, W, C]` float32.
    """
    x = tf.clip_by_value(tf.cast(images, tf.float32), 0.0, 1.0)
    ops = tf.cast(ops, tf.int32)
    strength = tf.cast(magnitudes, tf.float32) / MAX_MAGNITUDE
    if signs is not None:
        strength_signed = strength * tf.cast(signs, tf.float32)
    else:
        strength_signed = strength
    levels = tf.round(x * 255.0)
    factor = 1.8 * strength + 0.1
    fill = tf.constant(fill_value, tf.float32)

    def autocontrast():
        # PIL's lookup table, int(level * scale + offset), in float64 as PIL computes it.
        wide = tf.cast(levels, tf.float64)
        low = tf.reduce_min(wide, axis=[1, 2], keepdims=True)
        high = tf.reduce_max(wide, axis=[1, 2], keepdims=True)
        scale = 255.0 / tf.maximum(high - low, 1.0)
        stretched = tf.clip_by_value(tf.floor(wide * scale + (-low * scale)), 0.0, 255.0)
        return tf.cast(tf.where(high > low, stretched, wide), tf.float32) / 255.0

    def posterize():
        step = tf.pow(2.0, 8.0 - tf.floor(4.0 * strength))
        return tf.floor(levels / _per_image(step)) * _per_image(step) / 255.0

    def solarize():
        threshold = _per_image(tf.floor(256.0 * strength))
        return tf.where(levels >= threshold, 255.0 - levels, levels) / 255.0

    def solarize_add():
        added = tf.minimum(levels + _per_image(tf.floor(110.0 * strength)), 255.0)
        return tf.where(levels < 128.0, added, levels) / 255.0

    def contrast():
        mean = tf.floor(tf.reduce_mean(tf.round(luma(x) * 255.0), axis=[1, 2, 3], keepdims=True) + 0.5) / 255.0
        return _blend(mean, x, factor)

    pixel_ops = {
        "AutoContrast": autocontrast,
        "Equalize": lambda: _equalize(levels) / 255.0,
        "Invert": lambda: 1.0 - x,
        "Posterize": posterize,
        "Solarize": solarize,
        "SolarizeAdd": solarize_add,
        "Color": lambda: _blend(luma(x), x, factor),
        "Contrast": contrast,
        "Brightness": lambda: _blend(tf.zeros_like(x), x, factor),
        "Sharpness": lambda: _blend(_smooth(x), x, factor),
    }
    out = x
    for name, op in pixel_ops.items():
        out = tf.where(_per_image(tf.equal(ops, _OP[name])), op(), out)

    height, width = tf.shape(x)[1], tf.shape(x)[2]
    transforms = _affine(ops, strength_signed, height, width, translate_fraction)
    # Transform (x - fill) and fill with 0: bilinear sampling is linear, so this fills with a
    # per-channel colour, which TF's constant fill (one scalar) cannot.
    moved = tf.raw_ops.ImageProjectiveTransformV3(
        images=x - fill, transforms=transforms, output_shape=tf.stack([height, width]), fill_value=0.0,
        interpolation="BILINEAR", fill_mode="CONSTANT") + fill
    geometric = tf.reduce_any(tf.stack([tf.equal(ops, _OP[name]) for name in _GEOMETRIC]), axis=0)
    return tf.where(_per_image(geometric), tf.clip_by_value(moved, 0.0, 1.0), out)


@keras.saving.register_keras_serializable(package="keras_pcl")
class RandAugment(keras.layers.Layer):
    """timm's RandAugment, drawn per image: `num_ops` of 15 operations, each applied with probability `rate`.

    Each image draws its own `num_ops` operations from `OPS` (with replacement), and for each
    one whether it applies (`rate`), its magnitude from `N(magnitude, magnitude_std)` clipped
    to `[0, 10]`, and its direction. The operations are `rand_augment_op`'s. The defaults are
    PaCo's `rand-n2-m10-mstd0.5`. Not Keras' `RandAugment`, which draws the operations once per
    batch, applies all of them, and reads `factor` as a range of strengths.

    Args:
        num_ops: operations drawn per image (timm's `n`).
        magnitude: in `[0, 10]` (timm's `m`).
        magnitude_std: standard deviation of the magnitude's noise (timm's `mstd`), >= 0.
        rate: probability in `[0, 1]` that a drawn operation applies (timm: 0.5).
        fill_value: the level geometric operations fill with, in `[0, 1]`, or one per channel
            (timm's default grey is 0.5; PaCo's ImageNet code fills with the dataset's mean).
        translate_fraction: the largest translation, as a fraction of the side (timm: 0.45).
        seed: optional int.
        **kwargs: passed to `keras.layers.Layer`.

    Example:
    >>> layer = RandAugment(num_ops=2, magnitude=10, magnitude_std=0.5)
    >>> layer(tf.random.uniform([4, 16, 16, 3])).shape
    TensorShape([4, 16, 16, 3])

    Reference: Cubuk, Zoph, Shlens, Le, "RandAugment: Practical automated data augmentation
    with a reduced search space", NeurIPS 2020; the operations and their scales are timm's.
    """

    def __init__(self, num_ops=2, magnitude=10.0, magnitude_std=0.5, rate=0.5, fill_value=0.5,
                 translate_fraction=0.45, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.num_ops = check_count("num_ops", num_ops, minimum=0)
        self.magnitude = check_non_negative("magnitude", magnitude)
        if self.magnitude > MAX_MAGNITUDE:
            raise InvalidInputError(f"magnitude must be in [0, {MAX_MAGNITUDE:g}], got {magnitude}.")
        self.magnitude_std = check_non_negative("magnitude_std", magnitude_std)
        if math.isinf(self.magnitude_std):
            raise InvalidInputError("magnitude_std must be finite; for uniform magnitudes lower `magnitude`.")
        self.rate = check_unit_interval("rate", rate)
        if isinstance(fill_value, (list, tuple)):
            self.fill_value = tuple(check_unit_interval("fill_value", value) for value in fill_value)
        else:
            self.fill_value = check_unit_interval("fill_value", fill_value)
        self.translate_fraction = check_non_negative("translate_fraction", translate_fraction)
        self.seed = seed
        self.generator = keras.random.SeedGenerator(seed)

    def build(self, input_shape):
        channels = input_shape[-1]
        if isinstance(self.fill_value, tuple) and channels is not None and len(self.fill_value) != channels:
            raise InvalidInputError(f"fill_value has {len(self.fill_value)} levels for images of {channels} "
                                    "channels; give one level, or one per channel.")
        super().build(input_shape)

    def draw(self, batch):
        """One round of draws for `batch` images: `(ops, magnitudes, signs)`, `ops` -1 where nothing applies."""
        ops = keras.random.randint([batch], 0, len(OPS), seed=self.generator, dtype="int32")
        applied = keras.random.uniform([batch], seed=self.generator) < self.rate
        magnitudes = self.magnitude + self.magnitude_std * keras.random.normal([batch], seed=self.generator)
        signs = tf.where(keras.random.uniform([batch], seed=self.generator) < 0.5, -1.0, 1.0)
        return tf.where(applied, ops, -1), tf.clip_by_value(magnitudes, 0.0, MAX_MAGNITUDE), signs

    def call(self, images, training=True):
        images = tf.convert_to_tensor(images)
        if not training or self.num_ops == 0 or self.rate == 0.0:
            return images
        x = tf.cast(images, tf.float32)
        for _ in range(self.num_ops):
            ops, magnitudes, signs = self.draw(tf.shape(x)[0])
            x = rand_augment_op(x, ops, magnitudes, signs, self.fill_value, self.translate_fraction)
        return tf.cast(x, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(num_ops=self.num_ops, magnitude=self.magnitude, magnitude_std=self.magnitude_std,
                      rate=self.rate, fill_value=self.fill_value, translate_fraction=self.translate_fraction,
                      seed=self.seed)
        return config
