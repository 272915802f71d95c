"""Augmentations: the layers Keras core lacks (or reads differently from these recipes), and each method's presets.

All layers take batches of float images in `[0, 1]`, shape `[B, H, W, C]`,
and run inside `tf.data` (the TF backend) or in a model.
"""

import math
import numbers

import keras
import tensorflow as tf

from keras_pcl.errors import InvalidInputError, check_unit_interval
from keras_pcl.rand_augment import RandAugment, luma

_register = keras.saving.register_keras_serializable(package="keras_pcl")


@_register
class RandomResizedCrop(keras.layers.Layer):
    """Crops a random area and aspect ratio of each image, resized to a fixed size.

    The torchvision/Inception crop: area fraction drawn uniformly from
    `scale`, log aspect ratio (width / height, in pixels) uniformly from
    `log(ratio)`, sides rounded to whole pixels; a box that does not fit in
    the image is drawn again (up to `attempts` draws in all), and if none fits
    the crop is the image's centre at the nearest ratio in range; the box
    sits at a random whole-pixel position (`inception_crop_boxes`, torchvision's
    `RandomResizedCrop.get_params`) and is resized as torchvision resizes,
    pixel centres at half-pixel offsets, edges clamped (`resized_crops`).
    Redrawing rather than shrinking the box matters: shrinking makes crops
    larger than `scale` says and bends their aspect ratio out of `ratio`.
    One box per image, drawn on device.

    Args:
        height, width: output size.
        scale: `(min, max)` fraction of the image area to keep, `0 < min <= max <= 1`.
        ratio: `(min, max)` aspect ratio (width / height) of the crop.
        interpolation: "bilinear" or "nearest".
        attempts: draws per image before the centre crop (torchvision: 10).
        seed: optional int for reproducible crops.

    Example:
    >>> crop = RandomResizedCrop(28, 28, scale=(0.2, 1.0))
    >>> crop(tf.random.uniform([4, 32, 32, 3])).shape
    TensorShape([4, 28, 28, 3])
    """

    def __init__(self, height, width, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                 interpolation="bilinear", attempts=10, seed=None, **kwargs):
        super().__init__(**kwargs)
        if not 0 < scale[0] <= scale[1] <= 1:
            raise InvalidInputError(f"scale must satisfy 0 < min <= max <= 1, got {scale}.")
        if not 0 < ratio[0] <= ratio[1]:
            raise InvalidInputError(f"ratio must satisfy 0 < min <= max, got {ratio}.")
        if interpolation not in ("bilinear", "nearest"):
            raise InvalidInputError(f'interpolation must be "bilinear" or "nearest", got {interpolation!r}.')
        if isinstance(attempts, bool) or not isinstance(attempts, numbers.Integral) or attempts < 1:
            raise InvalidInputError(f"attempts must be a positive integer, got {attempts!r}.")
        self.attempts = int(attempts)
        self.height, self.width = int(height), int(width)
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.interpolation, self.seed = interpolation, seed
        # A Keras SeedGenerator, like the core augmentation layers: its state is a
        # variable, so keras_pcl.data can reseed every layer of a pipeline per batch.
        self.generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=True):
        images = tf.convert_to_tensor(images)
        batch = tf.shape(images)[0]
        if not training:
            return tf.image.resize(images, [self.height, self.width], method=self.interpolation)
        draws = keras.random.uniform([batch, self.attempts, 2], seed=self.generator)
        offsets = keras.random.uniform([batch, 2], seed=self.generator)
        boxes = inception_crop_boxes(draws, offsets, tf.shape(images)[1], tf.shape(images)[2], self.scale, self.ratio)
        crops = resized_crops(images, boxes, self.height, self.width, self.interpolation)
        return tf.cast(crops, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.height, self.width, input_shape[-1])

    def get_config(self):
        config = super().get_config()
        config.update(height=self.height, width=self.width, scale=self.scale, ratio=self.ratio,
                      interpolation=self.interpolation, attempts=self.attempts, seed=self.seed)
        return config


def inception_crop_boxes(draws, offsets, height, width, scale, ratio):
    """RandomResizedCrop's boxes in whole pixels from uniform draws: torchvision's `get_params`.

    Args:
        draws: `[B, attempts, 2]` uniforms in [0, 1): per attempt, the area
            fraction's and the log aspect ratio's position in their ranges.
        offsets: `[B, 2]` uniforms in [0, 1): the box's position along y and x
            among the whole-pixel positions it can take.
        height, width: the images' size in pixels.
        scale, ratio: as `RandomResizedCrop`.

    Returns `[B, 4]` int32 boxes `(top, left, box_height, box_width)` in
    pixels: the first attempt whose rounded sides fit, else the centre crop
    at the ratio nearest the image's own.
    """
    # float64 as torchvision's Python floats, so the sides round as its do.
    draws = tf.cast(draws, tf.float64)
    height, width = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
    area = height * width * (scale[0] + (scale[1] - scale[0]) * draws[..., 0])
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    box_ratio = tf.exp(log_low + (log_high - log_low) * draws[..., 1])
    box_w = tf.round(tf.sqrt(area * box_ratio))  # round half to even, as Python's round
    box_h = tf.round(tf.sqrt(area / box_ratio))
    fits = (box_w > 0) & (box_w <= width) & (box_h > 0) & (box_h <= height)
    first = tf.argmax(tf.cast(fits, tf.int32), axis=1, output_type=tf.int32)
    found = tf.reduce_any(fits, axis=1)
    box_w = tf.gather(box_w, first, axis=1, batch_dims=1)
    box_h = tf.gather(box_h, first, axis=1, batch_dims=1)
    offsets = tf.cast(offsets, tf.float64)
    # torch.randint(0, room + 1): each whole-pixel position equally likely.
    top = tf.minimum(tf.floor(offsets[:, 0] * (height - box_h + 1)), height - box_h)
    left = tf.minimum(tf.floor(offsets[:, 1] * (width - box_w + 1)), width - box_w)
    # torchvision's fallback: the whole image, narrowed to the ratio range's nearest end, centred.
    low, high = min(ratio), max(ratio)
    in_ratio = width / height
    centre_w = tf.where(in_ratio > high, tf.round(height * high), width)
    centre_h = tf.where(in_ratio < low, tf.round(width / low), height)
    box_w = tf.where(found, box_w, centre_w)
    box_h = tf.where(found, box_h, centre_h)
    top = tf.where(found, top, tf.floor((height - box_h) / 2))
    left = tf.where(found, left, tf.floor((width - box_w) / 2))
    return tf.cast(tf.stack([top, left, box_h, box_w], axis=1), tf.int32)


def resized_crops(images, boxes, height, width, interpolation="bilinear"):
    """Each image's pixel box resized to `[height, width]`, sampled as torchvision resizes a crop.

    Output pixel `k` reads the box at `(k + 0.5) * box_side / side - 0.5`
    (pixel centres at half-pixel offsets, PyTorch's `align_corners=False`),
    clamped to the box, so no pixel outside it leaks in; "nearest" reads
    pixel `floor(k * box_side / side)`, torch's legacy nearest. Resizing down
    does not low-pass first (torchvision's antialias does): equal for crops
    resized up, as on 28-pixel data.

    Args:
        images: `[B, H, W, C]`.
        boxes: `[B, 4]` ints `(top, left, box_height, box_width)`, as
            `inception_crop_boxes` returns them.
        height, width: output size.
        interpolation: "bilinear" or "nearest".

    Returns:
        `[B, height, width, C]` float32.
    """
    images = tf.cast(images, tf.float32)
    boxes = tf.cast(boxes, tf.int32)

    def resize_rows(x, start, side, size):
        # Separable, one axis at a time: each output row is read from one or two input
        # rows, gathered from the batch's rows flattened (faster than a batched gather).
        shape = tf.shape(x)
        rows = tf.reshape(x, [-1, shape[2], shape[3]])
        first_row = (tf.range(shape[0]) * shape[1] + start)[:, None]
        k = tf.range(size, dtype=tf.float32)[None, :]
        side_f = tf.cast(side, tf.float32)[:, None]
        if interpolation == "nearest":
            index = tf.minimum(tf.cast(tf.floor(k * side_f / size), tf.int32), side[:, None] - 1)
            return tf.gather(rows, first_row + index)
        source = tf.maximum((k + 0.5) * side_f / size - 0.5, 0.0)
        low = tf.minimum(tf.cast(tf.floor(source), tf.int32), side[:, None] - 1)
        high = tf.minimum(low + 1, side[:, None] - 1)
        weight = (source - tf.cast(low, tf.float32))[..., None, None]
        return (1.0 - weight) * tf.gather(rows, first_row + low) + weight * tf.gather(rows, first_row + high)

    rows = resize_rows(images, boxes[:, 0], boxes[:, 2], height)
    columns = resize_rows(tf.transpose(rows, [0, 2, 1, 3]), boxes[:, 1], boxes[:, 3], width)
    return tf.transpose(columns, [0, 2, 1, 3])


def _select_per_image(rate, generator, transformed, images):
    """Each image of `transformed` with probability `rate`, else the same image of `images`."""
    keep = keras.random.uniform([tf.shape(images)[0]], seed=generator) < rate
    return tf.where(tf.reshape(keep, [-1, 1, 1, 1]), transformed, images)


@_register
class RandomApply(keras.layers.Layer):
    """Applies `layer` to each image of a batch with probability `rate`.

    The layer runs on the whole batch and each image keeps either the result
    or its input, so per-image randomness costs one extra select.

    Args:
        layer: a Keras layer mapping `[B, H, W, C]` to the same shape.
        rate: probability in `[0, 1]` of applying it to an image.
        seed: optional int.

    Example:
    >>> jitter = RandomColorJitter(brightness=0.4)
    >>> RandomApply(jitter, rate=0.8)(tf.random.uniform([4, 8, 8, 3])).shape
    TensorShape([4, 8, 8, 3])
    """

    def __init__(self, layer, rate=0.5, seed=None, **kwargs):
        super().__init__(**kwargs)
        if isinstance(layer, dict):
            layer = keras.saving.deserialize_keras_object(layer)
        self.layer, self.rate, self.seed = layer, check_unit_interval("rate", rate), seed
        self.generator = keras.random.SeedGenerator(seed)

    def build(self, input_shape):
        if not self.layer.built:
            self.layer.build(input_shape)

    def call(self, images, training=True):
        if not training or self.rate == 0.0:
            return images
        transformed = self.layer(images, training=True)
        return _select_per_image(self.rate, self.generator, tf.cast(transformed, images.dtype), images)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(layer=keras.saving.serialize_keras_object(self.layer), rate=self.rate, seed=self.seed)
        return config


def gaussian_blur(images, sigma, kernel_size):
    """Blurs each image by an isotropic Gaussian of its own standard deviation.

    A separable `kernel_size` x `kernel_size` kernel, normalised to sum 1, with
    reflect padding (as torchvision's and PIL's blurs pad), so images in `[0, 1]`
    stay in `[0, 1]`.

    Args:
        images: `[B, H, W, C]` floats; `H` and `W` larger than `kernel_size // 2`.
        sigma: `[B]` standard deviations in pixels, > 0.
        kernel_size: odd side of the kernel.

    Returns:
        `[B, H, W, C]` float32.
    """
    x = tf.cast(images, tf.float32)
    half = kernel_size // 2
    if half == 0:
        return x
    offsets = tf.range(-half, half + 1, dtype=tf.float32)
    sigma = tf.reshape(tf.cast(sigma, tf.float32), [-1, 1])
    weights = tf.nn.softmax(-tf.square(offsets)[None, :] / (2.0 * tf.square(sigma)), axis=1)  # [B, k], rows sum 1
    weights = weights[:, :, None, None, None]
    height, width = tf.shape(x)[1], tf.shape(x)[2]
    padded = tf.pad(x, [[0, 0], [half, half], [0, 0], [0, 0]], mode="REFLECT")
    x = tf.add_n([weights[:, i] * padded[:, i:i + height] for i in range(kernel_size)])
    padded = tf.pad(x, [[0, 0], [0, 0], [half, half], [0, 0]], mode="REFLECT")
    return tf.add_n([weights[:, i] * padded[:, :, i:i + width] for i in range(kernel_size)])


@_register
class RandomGaussianBlur(keras.layers.Layer):
    """Blurs each image of a batch with probability `rate`, by a Gaussian of its own sigma.

    The blur of the MoCo v2, SimCLR, BYOL and SwAV recipes: each image, with
    probability `rate`, is blurred by an isotropic Gaussian whose standard
    deviation is drawn uniformly from `sigma` for that image
    (`gaussian_blur`). Keras' `RandomGaussianBlur` is not this: at
    `factor=1.0` it blurs each image with probability 1/2 (`factor` is the
    range a per-image probability is drawn from), and it draws one
    `(sigma_x, sigma_y)` pair for the whole batch.

    Args:
        kernel_size: odd side of the kernel in pixels, >= 1 (the recipes use
            about a tenth of the image side: `blur_kernel_size`).
        sigma: `(min, max)` standard deviation in pixels, `0 < min <= max`.
        rate: probability in `[0, 1]` that an image is blurred.
        seed: optional int.
        **kwargs: passed to `keras.layers.Layer`.

    Example:
    >>> blur = RandomGaussianBlur(3, sigma=(0.1, 2.0), rate=0.5)
    >>> blur(tf.random.uniform([4, 28, 28, 1])).shape
    TensorShape([4, 28, 28, 1])

    Reference: Chen, Kornblith, Norouzi, Hinton, "A Simple Framework for
    Contrastive Learning of Visual Representations", ICML 2020 (appendix A).
    """

    def __init__(self, kernel_size, sigma=(0.1, 2.0), rate=0.5, seed=None, **kwargs):
        super().__init__(**kwargs)
        if isinstance(kernel_size, bool) or not float(kernel_size).is_integer() or kernel_size < 1 \
                or kernel_size % 2 == 0:
            raise InvalidInputError(f"kernel_size must be an odd integer >= 1, got {kernel_size}.")
        if len(sigma) != 2 or not 0 < sigma[0] <= sigma[1]:
            raise InvalidInputError(f"sigma must be (min, max) with 0 < min <= max, got {sigma}.")
        self.kernel_size, self.sigma = int(kernel_size), (float(sigma[0]), float(sigma[1]))
        self.rate, self.seed = check_unit_interval("rate", rate), seed
        self.generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=True):
        images = tf.convert_to_tensor(images)
        if not training or self.rate == 0.0:
            return images
        half = self.kernel_size // 2
        if any(side is not None and side <= half for side in images.shape[1:3]):
            raise InvalidInputError(f"images of {images.shape[1]}x{images.shape[2]} px are too small for a "
                                    f"{self.kernel_size} px blur kernel; use a kernel_size below twice the side.")
        batch = tf.shape(images)[0]
        sigma = keras.random.uniform([batch], self.sigma[0], self.sigma[1], seed=self.generator)
        blurred = gaussian_blur(images, sigma, self.kernel_size)
        return tf.cast(_select_per_image(self.rate, self.generator, blurred, tf.cast(images, tf.float32)),
                       self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(kernel_size=self.kernel_size, sigma=self.sigma, rate=self.rate, seed=self.seed)
        return config


@_register
class RandomSolarize(keras.layers.Layer):
    """Solarises each image of a batch with probability `rate`: pixels at or above `threshold` become `1 - x`.

    BYOL's second view is solarised this way (threshold 0.5, rate 0.2), as in the
    paper's code and torchvision's `RandomSolarize`. Keras' `Solarization` is not
    this: it draws each image's threshold from `U(threshold_factor[0],
    255 * threshold_factor[1])` on a 0-255 scale, so `threshold_factor=(0.5, 0.5)`
    inverts every pixel above a threshold anywhere in `U(0.002, 0.5)` of the range.

    Args:
        threshold: in `[0, 1]`; pixels `>= threshold` are inverted.
        rate: probability in `[0, 1]` that an image is solarised.
        seed: optional int.
        **kwargs: passed to `keras.layers.Layer`.

    Example:
    >>> solarize = RandomSolarize(threshold=0.5, rate=1.0)
    >>> solarize(tf.constant([[[[0.2], [0.7]]]])).numpy().ravel().round(2)
    array([0.2, 0.3], dtype=float32)

    Reference: Grill et al., "Bootstrap Your Own Latent", NeurIPS 2020 (appendix B).
    """

    def __init__(self, threshold=0.5, rate=0.2, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.threshold = check_unit_interval("threshold", threshold)
        self.rate, self.seed = check_unit_interval("rate", rate), seed
        self.generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=True):
        images = tf.convert_to_tensor(images)
        if not training or self.rate == 0.0:
            return images
        x = tf.cast(images, tf.float32)
        solarized = tf.where(x >= self.threshold, 1.0 - x, x)
        return tf.cast(_select_per_image(self.rate, self.generator, solarized, x), self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(threshold=self.threshold, rate=self.rate, seed=self.seed)
        return config


def color_jitter(images, brightness=None, contrast=None, saturation=None, hue=None, brightness_mode="add",
                 order=None):
    """Colour jitter with per-image factors, in the order brightness, contrast, saturation, hue,
    or in each image's own order.

    torchvision's operations (`ColorJitter`): contrast blends each image with the
    mean of its grayscale, saturation with its grayscale, hue shifts the hue
    circle; brightness adds an offset (`brightness_mode="add"`, as the SimCLR
    and BYOL papers) or scales (`"multiply"`, as torchvision). Each operation
    clips to `[0, 1]`; a factor left None skips its operation. Saturation and
    hue need 3 channels.

    Args:
        images: `[B, H, W, C]` floats in `[0, 1]`.
        brightness, contrast, saturation, hue: `[B]` factors (hue: a shift in
            turns of the hue circle), or None.
        brightness_mode: `"add"` or `"multiply"`.
        order: None (the order above), or `[B, 4]` ints: each image's permutation of the
            operations 0 brightness, 1 contrast, 2 saturation, 3 hue, first applied first.

    Returns:
        `[B, H, W, C]` float32.
    """
    x = tf.cast(images, tf.float32)

    def per_image(factor):
        return tf.reshape(tf.cast(factor, tf.float32), [-1, 1, 1, 1])

    def blend(x, other, factor):
        return tf.clip_by_value(per_image(factor) * x + (1.0 - per_image(factor)) * other, 0.0, 1.0)

    def adjust_brightness(x):
        return tf.clip_by_value(x + per_image(brightness) if brightness_mode == "add" else x * per_image(brightness),
                                0.0, 1.0)

    def adjust_hue(x):
        hsv = tf.image.rgb_to_hsv(x)
        shifted = tf.math.floormod(hsv[..., :1] + per_image(hue), 1.0)
        return tf.clip_by_value(tf.image.hsv_to_rgb(tf.concat([shifted, hsv[..., 1:]], axis=-1)), 0.0, 1.0)

    operations = [adjust_brightness if brightness is not None else None,
                  (lambda x: blend(x, tf.reduce_mean(luma(x), axis=[1, 2, 3], keepdims=True), contrast))
                  if contrast is not None else None,
                  (lambda x: blend(x, luma(x), saturation)) if saturation is not None else None,
                  adjust_hue if hue is not None else None]
    if order is None:
        for operation in operations:
            if operation is not None:
                x = operation(x)
        return x
    # Only the operations given take part: each image's order among them (the steps of the
    # missing ones dropped). Each step applies every such operation to the whole batch and keeps
    # it for the images whose order puts it there: n operations cost n times the fixed order's work.
    present = [index for index, operation in enumerate(operations) if operation is not None]
    step_of = tf.gather(tf.argsort(tf.convert_to_tensor(order), axis=1), present, axis=1)
    among = tf.argsort(step_of, axis=1)  # each step's position in `present`
    for step in range(len(present)):
        for position, index in enumerate(present):
            x = tf.where(tf.reshape(tf.equal(among[:, step], position), [-1, 1, 1, 1]), operations[index](x), x)
    return x


@_register
class RandomColorJitter(keras.layers.Layer):
    """Colour jitter with torchvision's ranges: each image draws its own factors.

    Brightness `b`: an offset from `U(-b, b)` (`brightness_mode="add"`, the
    SimCLR and BYOL papers' form) or a factor from `U(max(0, 1 - b), 1 + b)`
    (`"multiply"`, torchvision's). Contrast and saturation `c`: factors from
    `U(max(0, 1 - c), 1 + c)`. Hue `h` in `[0, 0.5]`: a shift from `U(-h, h)`.
    Applied in that order (`order="fixed"`), or in a random order drawn per
    image (`"random"`: torchvision's `ColorJitter` and the SimCLR and BYOL
    code shuffle it), by `color_jitter`. Grayscale images (1 channel) take
    brightness and contrast only. Keras' `RandomColorJitter` reads the same
    numbers otherwise: its saturation factor 0.4 draws multipliers from
    `[0, 0.67]` (never more saturated, sometimes gray) and its hue factor 0.1
    shifts by at most 0.05.

    Args:
        brightness, contrast, saturation: strengths >= 0 (0 skips the operation).
        hue: strength in `[0, 0.5]`.
        brightness_mode: `"add"` or `"multiply"`.
        order: `"fixed"` or `"random"`.
        seed: optional int.
        **kwargs: passed to `keras.layers.Layer`.

    Example:
    >>> jitter = RandomColorJitter(0.4, 0.4, 0.4, 0.1)
    >>> jitter(tf.random.uniform([4, 8, 8, 3])).shape
    TensorShape([4, 8, 8, 3])

    Reference: Chen, Kornblith, Norouzi, Hinton, "A Simple Framework for
    Contrastive Learning of Visual Representations", ICML 2020 (appendix A).
    """

    MODES = ("add", "multiply")
    ORDERS = ("fixed", "random")

    def __init__(self, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, brightness_mode="add", order="fixed",
                 seed=None, **kwargs):
        super().__init__(**kwargs)
        for name, value in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
            if not value >= 0:
                raise InvalidInputError(f"{name} must be >= 0, got {value}.")
        if not 0 <= hue <= 0.5:
            raise InvalidInputError(f"hue must be in [0, 0.5], got {hue}.")
        if brightness_mode not in self.MODES:
            raise InvalidInputError(f"brightness_mode must be one of {self.MODES}, got {brightness_mode!r}.")
        if order not in self.ORDERS:
            raise InvalidInputError(f"order must be one of {self.ORDERS}, got {order!r}.")
        self.brightness, self.contrast = float(brightness), float(contrast)
        self.saturation, self.hue = float(saturation), float(hue)
        self.brightness_mode, self.order, self.seed = brightness_mode, order, seed
        self.generator = keras.random.SeedGenerator(seed)

    def _factor(self, batch, strength):
        if not strength:
            return None
        return keras.random.uniform([batch], max(0.0, 1.0 - strength), 1.0 + strength, seed=self.generator)

    def call(self, images, training=True):
        images = tf.convert_to_tensor(images)
        if not training:
            return images
        batch, rgb = tf.shape(images)[0], images.shape[-1] == 3
        brightness = (keras.random.uniform([batch], -self.brightness, self.brightness, seed=self.generator)
                      if self.brightness and self.brightness_mode == "add" else self._factor(batch, self.brightness))
        hue = keras.random.uniform([batch], -self.hue, self.hue, seed=self.generator) if self.hue and rgb else None
        contrast = self._factor(batch, self.contrast)
        saturation = self._factor(batch, self.saturation) if rgb else None
        # Drawn last, so a seed gives the same factors in either order. The argsort of i.i.d.
        # uniforms: each of the 24 permutations equally likely.
        order = (tf.argsort(keras.random.uniform([batch, 4], seed=self.generator), axis=1)
                 if self.order == "random" else None)
        jittered = color_jitter(images, brightness, contrast, saturation, hue, self.brightness_mode, order)
        return tf.cast(jittered, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(brightness=self.brightness, contrast=self.contrast, saturation=self.saturation, hue=self.hue,
                      brightness_mode=self.brightness_mode, order=self.order, seed=self.seed)
        return config


def _color_layers(channels, brightness, contrast, saturation, hue, jitter_rate, grayscale_rate, brightness_mode,
                  jitter_order):
    """Colour jitter (and grayscale) for RGB; brightness/contrast only for 1 channel."""
    jitter = RandomColorJitter(brightness, contrast, saturation, hue, brightness_mode=brightness_mode,
                               order=jitter_order)
    layers = [RandomApply(jitter, jitter_rate) if jitter_rate < 1 else jitter]
    if channels == 3 and grayscale_rate > 0:
        layers.append(keras.layers.RandomGrayscale(factor=grayscale_rate))
    return layers


def blur_kernel_size(image_size):
    """About 10% of the image side, odd, at least 3 (the reference's 23 px at 224)."""
    return max(3, int(0.1 * image_size) // 2 * 2 + 1)


def pcl_v1(image_size, channels=3, crop_scale=(0.2, 1.0), brightness_mode="add", *, jitter_order="fixed"):
    """PCL v1 / MoCo v1 augmentation: crop, grayscale 0.2, jitter 0.4 x 4, flip.

    Every preset takes the same arguments:

    Args:
        image_size: output side in pixels (crops scale to small images).
        channels: 1 (grayscale data: brightness and contrast only) or 3.
        crop_scale: area range of RandomResizedCrop.
        brightness_mode: the colour jitter's brightness, `"add"` (an offset, the
            SimCLR and BYOL papers' form) or `"multiply"` (torchvision's, so
            lightly's and solo-learn's); see `RandomColorJitter`.
        jitter_order: `"fixed"` (brightness, contrast, saturation, hue) or `"random"`
            (a permutation per image, as torchvision's `ColorJitter` and the SimCLR
            and BYOL code); see `RandomColorJitter`.

    Returns:
        A `keras.layers.Pipeline` mapping `[B, H, W, C]` in `[0, 1]` to views.
    """
    return keras.layers.Pipeline(
        [RandomResizedCrop(image_size, image_size, scale=crop_scale)]
        + _color_layers(channels, 0.4, 0.4, 0.4, 0.4, jitter_rate=1.0, grayscale_rate=0.2,
                        brightness_mode=brightness_mode, jitter_order=jitter_order)
        + [keras.layers.RandomFlip("horizontal")],
        name="pcl_v1_augment",
    )


def pcl_v2(image_size, channels=3, crop_scale=(0.2, 1.0), brightness_mode="add", *, jitter_order="fixed"):
    """PCL v2 / MoCo v2 "aug-plus": crop, jitter (0.4, 0.4, 0.4, 0.1) p=0.8,
    grayscale 0.2, Gaussian blur sigma in [0.1, 2] p=0.5, flip."""
    return keras.layers.Pipeline(
        [RandomResizedCrop(image_size, image_size, scale=crop_scale)]
        + _color_layers(channels, 0.4, 0.4, 0.4, 0.1, jitter_rate=0.8, grayscale_rate=0.2,
                        brightness_mode=brightness_mode, jitter_order=jitter_order)
        + [_blur(image_size, 0.5), keras.layers.RandomFlip("horizontal")],
        name="pcl_v2_augment",
    )


def simclr(image_size, channels=3, crop_scale=(0.08, 1.0), brightness_mode="add", blur=True, *, jitter_order="fixed"):
    """SimCLR's augmentation: crop, flip, colour jitter of strength 1 (0.8, 0.8, 0.8, 0.2)
    with p=0.8, grayscale 0.2, Gaussian blur p=0.5 (the ImageNet recipe; `blur=False` is
    its CIFAR form)."""
    stack = ([RandomResizedCrop(image_size, image_size, scale=crop_scale), keras.layers.RandomFlip("horizontal")]
             + _color_layers(channels, 0.8, 0.8, 0.8, 0.2, jitter_rate=0.8, grayscale_rate=0.2,
                           brightness_mode=brightness_mode, jitter_order=jitter_order))
    if blur:
        stack.append(_blur(image_size, 0.5))
    return keras.layers.Pipeline(stack, name="simclr_augment")


def byol_views(image_size, channels=3, crop_scale=(0.08, 1.0), brightness_mode="add", *, jitter_order="fixed"):
    """BYOL's two asymmetric view augmentations: both crop, flip, jitter (0.4, 0.4, 0.2, 0.1)
    p=0.8 and grayscale 0.2; view 1 is always blurred and never solarised, view 2 blurred
    with p=0.1 and solarised (threshold 0.5) with p=0.2.

    Returns:
        `[view1_augmentation, view2_augmentation]`.
    """

    def view(blur_rate, solarize_rate, name):
        stack = ([RandomResizedCrop(image_size, image_size, scale=crop_scale), keras.layers.RandomFlip("horizontal")]
                 + _color_layers(channels, 0.4, 0.4, 0.2, 0.1, jitter_rate=0.8, grayscale_rate=0.2,
                                 brightness_mode=brightness_mode, jitter_order=jitter_order)
                 + [_blur(image_size, blur_rate)])
        if solarize_rate:
            stack.append(RandomSolarize(0.5, rate=solarize_rate))
        return keras.layers.Pipeline(stack, name=name)

    return [view(1.0, 0.0, "byol_view1_augment"), view(0.1, 0.2, "byol_view2_augment")]


def multi_crop(image_size, channels=3, num_large=2, num_small=6, small_size=None, large_scale=(0.14, 1.0),
               small_scale=(0.05, 0.14), preset="simclr", brightness_mode="add", *, jitter_order="fixed"):
    """SwAV's multi-crop: `num_large` views at `image_size` and `num_small` at `small_size`
    (default: 0.56 of the side, as 18 of 32 and 96 of 224 px), each a `preset` augmentation
    (default SimCLR's colour distortion, flip and blur) with its own crop scale.

    Returns:
        A list of `num_large + num_small` augmentation layers, large ones first (one layer
        per group, repeated: each call draws its own crop).
    """
    if num_large < 1 or num_small < 0:
        raise InvalidInputError(f"multi_crop needs num_large >= 1 and num_small >= 0, got {num_large}, {num_small}.")
    if preset not in PRESETS:
        raise InvalidInputError(f"unknown augmentation {preset!r} for multi-crop; choose one of {sorted(PRESETS)}.")
    small_size = small_size or max(2, round(0.56 * image_size))
    if num_small and not 1 <= small_size <= image_size:
        raise InvalidInputError(f"small crops of {small_size} px must be between 1 and the image size {image_size}.")
    views = [PRESETS[preset](image_size, channels, tuple(large_scale), brightness_mode, jitter_order=jitter_order)
             ] * num_large
    if num_small:
        views += [PRESETS[preset](small_size, channels, tuple(small_scale), brightness_mode, jitter_order=jitter_order)
                  ] * num_small
    return views


def crop_flip(image_size, channels=3, crop_scale=(0.08, 1.0), brightness_mode="add", *, jitter_order="fixed"):
    """The supervised baselines' augmentation: random resized crop and horizontal flip (no colour)."""
    del channels, brightness_mode, jitter_order
    return keras.layers.Pipeline([RandomResizedCrop(image_size, image_size, scale=crop_scale),
                                  keras.layers.RandomFlip("horizontal")], name="crop_flip_augment")


def paco_views(image_size, channels=3, crop_scale=(0.08, 1.0), brightness_mode="add", num_ops=2, magnitude=10.0,
               magnitude_std=0.5, fill_value=0.5, *, jitter_order="fixed"):
    """PaCo's two views (its ImageNet-LT recipe): a strong query view (crop, flip, colour jitter
    (0.4, 0.4, 0.4, 0) always, then timm's RandAugment `rand-n2-m10-mstd0.5`, per image:
    `RandAugment(num_ops, magnitude, magnitude_std, fill_value=fill_value)`) and a MoCo v2 key
    view (`pcl_v2`).

    Returns:
        `[query_augmentation, key_augmentation]`.
    """
    query = keras.layers.Pipeline(
        [RandomResizedCrop(image_size, image_size, scale=crop_scale), keras.layers.RandomFlip("horizontal")]
        + _color_layers(channels, 0.4, 0.4, 0.4, 0.0, jitter_rate=1.0, grayscale_rate=0.0,
                        brightness_mode=brightness_mode, jitter_order=jitter_order)
        + [RandAugment(num_ops, magnitude, magnitude_std, fill_value=fill_value)],
        name="paco_query_augment")
    return [query, pcl_v2(image_size, channels, crop_scale, brightness_mode, jitter_order=jitter_order)]


def _blur(image_size, rate):
    return RandomGaussianBlur(blur_kernel_size(image_size), sigma=(0.1, 2.0), rate=rate)


PRESETS = {"pcl_v1": pcl_v1, "pcl_v2": pcl_v2, "moco_v1": pcl_v1, "moco_v2": pcl_v2, "simclr": simclr,
           "crop_flip": crop_flip}
VIEW_PRESETS = {"byol": byol_views, "paco": paco_views}  # a different augmentation per view
# Presets with no colour jitter, so brightness_mode and jitter_order do not reach them (a test holds this to
# what each preset builds).
COLOURLESS_PRESETS = frozenset({"crop_flip"})


def get_preset(name, image_size, channels=3, crop_scale=(0.2, 1.0), brightness_mode="add", *, jitter_order="fixed"):
    """Looks up a one-augmentation preset by name: one of `PRESETS`."""
    if name not in PRESETS:
        raise InvalidInputError(f"unknown augmentation {name!r}; choose one of {sorted(PRESETS)}.")
    return PRESETS[name](image_size, channels, crop_scale, brightness_mode, jitter_order=jitter_order)


def view_augmentations(name, image_size, channels=3, crop_scale=(0.2, 1.0), num_views=2, brightness_mode="add",
                       *, jitter_order="fixed"):
    """The augmentation of each of `num_views` views for a preset: the same layer for
    every view (one of `PRESETS`), or a different one per view (`VIEW_PRESETS`: BYOL's two
    asymmetric ones, PaCo's strong query and MoCo v2 key)."""
    if name in VIEW_PRESETS:
        if num_views != 2:
            raise InvalidInputError(f"the {name} augmentation makes 2 views, {num_views} were asked for.")
        return VIEW_PRESETS[name](image_size, channels, crop_scale, brightness_mode, jitter_order=jitter_order)
    if name not in PRESETS:
        raise InvalidInputError(f"unknown augmentation {name!r}; choose one of {sorted(PRESETS) + sorted(VIEW_PRESETS)}.")
    preset = get_preset(name, image_size, channels, crop_scale, brightness_mode, jitter_order=jitter_order)
    return [preset] * num_views
