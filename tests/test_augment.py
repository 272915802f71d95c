"""RandomResizedCrop, RandomApply, RandomGaussianBlur, RandomColorJitter and the presets."""

import colorsys

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_pcl import augment


def test_full_crop_is_a_resize(rng):
    images = rng.uniform(size=(3, 16, 16, 3)).astype(np.float32)
    crop = augment.RandomResizedCrop(16, 16, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    np.testing.assert_allclose(crop(images).numpy(), images, atol=1e-5)


def ramp_images(count, height, width):
    """Channel 0 rises from 0 to 1 left to right, channel 1 top to bottom: a crop's corners read its box."""
    x = np.tile(np.linspace(0, 1, width, dtype=np.float32)[None, :, None], (height, 1, 1))
    y = np.tile(np.linspace(0, 1, height, dtype=np.float32)[:, None, None], (1, width, 1))
    return np.concatenate([x, y], axis=-1)[None].repeat(count, axis=0)


def box_sides(crops, height, width):
    """Width and height in pixels of each crop of `ramp_images(_, height, width)`, resized down or to its size.

    torchvision's grid puts the first and last of n samples (n - 1) / n of the box apart.
    """
    out_h, out_w = crops.shape[1:3]
    return ((crops[:, 0, -1, 0] - crops[:, 0, 0, 0]) * (width - 1) * out_w / (out_w - 1),
            (crops[:, -1, 0, 1] - crops[:, 0, 0, 1]) * (height - 1) * out_h / (out_h - 1))


def test_crop_area_follows_scale():
    """Crops of a quarter of the area of a square image are half its side, at varied whole-pixel positions."""
    crop = augment.RandomResizedCrop(32, 32, scale=(0.25, 0.25), ratio=(1.0, 1.0), seed=1)
    out = crop(ramp_images(256, 64, 64)).numpy()
    widths, heights = box_sides(out, 64, 64)
    np.testing.assert_allclose(widths, 32, atol=1e-3)
    np.testing.assert_allclose(heights, 32, atol=1e-3)
    left = out[:, 0, 0, 0] * 63
    np.testing.assert_allclose(left, np.round(left), atol=1e-3)  # whole pixels
    assert left.min() < 5 and left.max() > 27  # positions vary over the 33 there are


def test_crop_output_shape_and_inference_mode(rng):
    images = rng.uniform(size=(2, 20, 24, 1)).astype(np.float32)
    crop = augment.RandomResizedCrop(8, 8)
    assert crop(images).shape == (2, 8, 8, 1)
    np.testing.assert_allclose(crop(images, training=False), tf.image.resize(images, [8, 8]))


def numpy_inception_box(draws, offset, height, width, scale, ratio):
    """torchvision's RandomResizedCrop.get_params, one image at a time, on given draws: (top, left, h, w)."""
    for area_draw, ratio_draw in draws:
        area = height * width * (scale[0] + (scale[1] - scale[0]) * float(area_draw))
        log_ratio = (np.log(ratio[0]), np.log(ratio[1]))
        box_ratio = np.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * float(ratio_draw))
        w, h = int(round(np.sqrt(area * box_ratio))), int(round(np.sqrt(area / box_ratio)))
        if 0 < w <= width and 0 < h <= height:
            # torch.randint(0, n) on a uniform draw u: floor(u * n)
            return np.array([int(offset[0] * (height - h + 1)), int(offset[1] * (width - w + 1)), h, w])
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return np.array([(height - h) // 2, (width - w) // 2, h, w])


@pytest.mark.parametrize("height, width, scale, ratio", [
    (28, 28, (0.2, 1.0), (3 / 4, 4 / 3)),
    (20, 36, (0.08, 1.0), (3 / 4, 4 / 3)),   # wider than any ratio: the fallback narrows the width
    (40, 10, (0.5, 1.0), (0.5, 2.0)),         # taller than any ratio: the fallback shortens the height
    (10, 40, (0.5, 1.0), (0.5, 2.0)),         # no draw fits this wide image: every crop is the narrowed centre
    (16, 16, (0.9, 1.0), (0.25, 4.0)),        # few draws fit: many images take the centre crop
    (16, 16, (1.0, 1.0), (1.0, 1.0)),         # every draw is the whole image
    (5, 7, (0.01, 0.05), (3 / 4, 4 / 3)),     # boxes that round to 0 or 1 pixel
])
def test_crop_boxes_match_torchvision_loop(rng, height, width, scale, ratio):
    draws = rng.uniform(size=(300, 10, 2)).astype(np.float32)
    offsets = rng.uniform(size=(300, 2)).astype(np.float32)
    boxes = augment.inception_crop_boxes(draws, offsets, height, width, scale, ratio).numpy()
    expected = np.stack([numpy_inception_box(d, o, height, width, scale, ratio) for d, o in zip(draws, offsets)])
    np.testing.assert_array_equal(boxes, expected)
    assert (boxes[:, 2:] >= 1).all() and (boxes[:, 0] + boxes[:, 2] <= height).all()
    assert (boxes[:, 1] + boxes[:, 3] <= width).all()


def numpy_resized_crop(image, box, out_h, out_w, interpolation):
    """torch's interpolate (align_corners=False) of one pixel box, written out sample by sample."""
    top, left, h, w = box
    crop = image[top:top + h, left:left + w].astype(np.float64)
    out = np.zeros((out_h, out_w, image.shape[-1]))
    for i in range(out_h):
        for j in range(out_w):
            if interpolation == "nearest":
                out[i, j] = crop[min(int(np.floor(i * h / out_h)), h - 1), min(int(np.floor(j * w / out_w)), w - 1)]
                continue
            y = max((i + 0.5) * h / out_h - 0.5, 0.0)  # torch clamps a negative source index to 0
            x = max((j + 0.5) * w / out_w - 0.5, 0.0)
            y0, x0 = int(y), int(x)
            y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
            dy, dx = y - y0, x - x0
            out[i, j] = ((1 - dy) * (1 - dx) * crop[y0, x0] + (1 - dy) * dx * crop[y0, x1]
                         + dy * (1 - dx) * crop[y1, x0] + dy * dx * crop[y1, x1])
    return out


@pytest.mark.parametrize("interpolation", ["bilinear", "nearest"])
@pytest.mark.parametrize("out_h, out_w", [(9, 9), (4, 6), (13, 3), (1, 1)])
def test_resized_crops_match_torch_sampling(rng, interpolation, out_h, out_w):
    """Boxes resized up and down, at the edges, one pixel wide, the whole image, and extreme pixel values."""
    images = rng.uniform(size=(6, 11, 8, 2)).astype(np.float32)
    images[1] = 0.0
    images[1, :, -1] = 1.0  # a bright last column: clamping must read it, not a zero beyond the edge
    images[2] = rng.choice([0.0, 1.0], size=(11, 8, 2))
    boxes = np.array([[0, 0, 11, 8], [0, 5, 11, 3], [3, 2, 1, 1], [10, 7, 1, 1], [2, 1, 9, 4], [0, 0, 5, 8]])
    out = augment.resized_crops(images, boxes, out_h, out_w, interpolation).numpy()
    expected = np.stack([numpy_resized_crop(im, box, out_h, out_w, interpolation) for im, box in zip(images, boxes)])
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_crop_redraws_boxes_that_do_not_fit():
    """The layer's crops have torchvision's area distribution (boxes redrawn), not the shrunk boxes' larger one."""
    crop = augment.RandomResizedCrop(8, 8, scale=(0.2, 1.0), seed=0)
    width, height = box_sides(crop(ramp_images(4000, 101, 101)).numpy(), 101, 101)
    area = width * height / 101 ** 2
    rng = np.random.default_rng(0)
    reference = [np.prod(numpy_inception_box(rng.uniform(size=(10, 2)), rng.uniform(size=2), 101, 101,
                                             (0.2, 1.0), (3 / 4, 4 / 3))[2:]) / 101 ** 2 for _ in range(4000)]
    assert abs(area.mean() - np.mean(reference)) < 0.02  # about 0.54; shrinking the boxes gives 0.59
    np.testing.assert_allclose(width, np.round(width), atol=1e-2)  # whole pixels
    assert np.abs(np.log(width / height)).max() <= np.log(4 / 3) + 0.03  # no box bent outside the ratio range


@pytest.mark.parametrize("height, width", [(24, 96), (96, 24)])
def test_crop_ratio_is_in_pixels(height, width):
    """On a non-square image a ratio-1 crop is square in pixels, so its sides are unequal fractions of the image."""
    crop = augment.RandomResizedCrop(6, 6, scale=(0.05, 0.2), ratio=(1.0, 1.0), seed=0)
    box_width, box_height = box_sides(crop(ramp_images(64, height, width)).numpy(), height, width)
    np.testing.assert_allclose(box_width, box_height, atol=1e-2)


@pytest.mark.parametrize("kwargs", [dict(scale=(0.5, 0.2)), dict(scale=(0.0, 1.0)), dict(ratio=(2.0, 1.0)),
                                    dict(attempts=0), dict(attempts=2.5)])
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
    crop = augment.RandomResizedCrop(10, 12, scale=(0.3, 0.9), ratio=(0.5, 2.0), attempts=4, seed=3)
    clone = augment.RandomResizedCrop.from_config(crop.get_config())
    assert (clone.height, clone.width, clone.scale, clone.ratio, clone.attempts, clone.seed) == (
        10, 12, (0.3, 0.9), (0.5, 2.0), 4, 3)
    apply = augment.RandomApply(keras.layers.RandomFlip("horizontal"), 0.4)
    clone = augment.RandomApply.from_config(apply.get_config())
    assert clone.rate == 0.4 and isinstance(clone.layer, keras.layers.RandomFlip)


def numpy_gaussian_blur(images, sigmas, kernel_size):
    """The slow, obvious blur: per image, a 2-D Gaussian kernel summed over reflect-padded pixels."""
    half = kernel_size // 2
    out = np.zeros(images.shape, np.float64)
    for n, (image, sigma) in enumerate(zip(images.astype(np.float64), sigmas)):
        offsets = np.arange(-half, half + 1)
        kernel = np.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2.0 * sigma ** 2))
        kernel /= kernel.sum()
        padded = np.pad(image, [(half, half), (half, half), (0, 0)], mode="reflect")
        for y in range(image.shape[0]):
            for x in range(image.shape[1]):
                window = padded[y:y + kernel_size, x:x + kernel_size]
                out[n, y, x] = np.einsum("ab,abc->c", kernel, window)
    return out


@pytest.mark.parametrize("kernel_size", [1, 3, 5])
def test_gaussian_blur_matches_numpy(rng, kernel_size):
    images = rng.uniform(size=(5, 9, 7, 3)).astype(np.float32)
    # One sigma per image, from nearly no blur through a near box filter.
    sigmas = np.array([1e-3, 0.1, 0.7, 2.0, 1e3], np.float32)
    got = augment.gaussian_blur(images, sigmas, kernel_size).numpy()
    np.testing.assert_allclose(got, numpy_gaussian_blur(images, sigmas, kernel_size), atol=1e-5)
    assert got.min() >= 0.0 and got.max() <= 1.0 + 1e-6


def test_blur_rate_is_the_probability_an_image_is_blurred():
    images = np.tile(np.eye(8, dtype=np.float32)[None, :, :, None], (2000, 1, 1, 1))
    blurred = lambda out: np.abs(out - images).reshape(len(images), -1).max(axis=1) > 1e-3  # noqa: E731
    for rate, low, high in [(0.0, 0.0, 0.0), (1.0, 1.0, 1.0), (0.5, 0.45, 0.55), (0.1, 0.07, 0.13)]:
        layer = augment.RandomGaussianBlur(3, sigma=(0.5, 2.0), rate=rate, seed=1)
        fraction = blurred(layer(images).numpy()).mean()
        assert low <= fraction <= high, (rate, fraction)
    assert np.array_equal(augment.RandomGaussianBlur(3, rate=1.0)(images, training=False), images)


def test_blur_draws_a_sigma_per_image():
    images = np.tile(np.eye(8, dtype=np.float32)[None, :, :, None], (64, 1, 1, 1))
    out = augment.RandomGaussianBlur(3, sigma=(0.5, 2.0), rate=1.0, seed=0)(images).numpy()
    centres = out[:, 4, 4, 0]  # one value per sigma (one sigma for the whole batch: one value)
    assert len(np.unique(centres)) > len(images) // 2
    # Each image is the reference blur of one sigma in the range: its centre pins that sigma down.
    for image, centre in zip(out[:4], centres[:4]):
        grid = np.linspace(0.5, 2.0, 3001)
        weights = np.exp(-1.0 / (2 * grid ** 2))
        sigma = grid[np.argmin(np.abs((1 / (1 + 2 * weights)) ** 2 * (1 + 2 * weights ** 2) - centre))]
        np.testing.assert_allclose(image, numpy_gaussian_blur(images[:1], [sigma], 3)[0], atol=2e-3)


@pytest.mark.parametrize("kwargs", [dict(kernel_size=4), dict(kernel_size=0), dict(kernel_size=3, sigma=(0.0, 1.0)),
                                    dict(kernel_size=3, sigma=(2.0, 1.0)), dict(kernel_size=3, rate=1.5)])
def test_blur_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError, match="kernel_size|sigma|rate"):
        augment.RandomGaussianBlur(**kwargs)


def test_blur_kernel_larger_than_the_image_says_so():
    with pytest.raises(ValueError, match="too small"):
        augment.RandomGaussianBlur(9, rate=1.0)(np.zeros((2, 4, 4, 1), np.float32))


def test_presets_blur_at_their_documented_rates():
    def blur_rates(pipeline):
        return [layer.rate for layer in pipeline.layers if isinstance(layer, augment.RandomGaussianBlur)]

    assert blur_rates(augment.pcl_v2(28, 1)) == [0.5]
    assert blur_rates(augment.simclr(28, 3)) == [0.5]
    assert blur_rates(augment.simclr(28, 3, blur=False)) == []
    assert blur_rates(augment.pcl_v1(28, 3)) == []
    view1, view2 = augment.byol_views(28, 1)
    assert (blur_rates(view1), blur_rates(view2)) == ([1.0], [0.1])
    assert augment.blur_kernel_size(28) == 3 and augment.blur_kernel_size(224) == 23


@pytest.mark.parametrize("name", ["pcl_v1", "pcl_v2", "simclr", "byol", "multi_crop"])
def test_presets_brightness_mode_reaches_their_jitter(name):
    """Black images stay black when brightness multiplies (torchvision's form); an offset lifts some."""
    black = np.zeros((64, 8, 8, 1), np.float32)
    for mode, lifted in (("multiply", False), ("add", True)):
        if name == "multi_crop":
            views = augment.multi_crop(8, 1, num_small=1, small_size=4, brightness_mode=mode)
        else:
            views = augment.view_augmentations(name, 8, 1, (0.5, 1.0), brightness_mode=mode)
        assert any((view(black).numpy() > 0).any() for view in views) == lifted, mode


def jitters_of(views):
    """Every RandomColorJitter inside a list of augmentation layers."""
    def layers(layer):
        yield layer
        for inner in getattr(layer, "layers", []) + [getattr(layer, "layer", None)]:
            if inner is not None:
                yield from layers(inner)

    return [layer for view in views for layer in layers(view) if isinstance(layer, augment.RandomColorJitter)]


@pytest.mark.parametrize("name", sorted(set(augment.PRESETS) | set(augment.VIEW_PRESETS)))
def test_colourless_presets_are_declared(name):
    """COLOURLESS_PRESETS (the runner's "--brightness_mode, --jitter_order ignored") is exactly
    the presets that build no colour jitter."""
    jitters = jitters_of(augment.view_augmentations(name, 8, 1, (0.5, 1.0)))
    assert (not jitters) == (name in augment.COLOURLESS_PRESETS)


@pytest.mark.parametrize("name", sorted((set(augment.PRESETS) | set(augment.VIEW_PRESETS) | {"multi_crop"})
                                        - augment.COLOURLESS_PRESETS))
def test_presets_jitter_order_reaches_every_jitter(name):
    """Every colour jitter a preset builds takes its jitter_order; left out, the fixed order."""
    def views(**order):
        if name == "multi_crop":
            return augment.multi_crop(8, 3, num_small=1, small_size=4, **order)
        return augment.view_augmentations(name, 8, 3, (0.5, 1.0), **order)

    for order in ("fixed", "random"):
        assert {jitter.order for jitter in jitters_of(views(jitter_order=order))} == {order}
    assert {jitter.order for jitter in jitters_of(views())} == {"fixed"}


def test_blur_round_trips_config():
    blur = augment.RandomGaussianBlur(5, sigma=(0.2, 1.5), rate=0.3, seed=4)
    clone = augment.RandomGaussianBlur.from_config(blur.get_config())
    assert (clone.kernel_size, clone.sigma, clone.rate, clone.seed) == (5, (0.2, 1.5), 0.3, 4)


def test_solarize_matches_numpy(rng):
    images = rng.uniform(size=(6, 5, 4, 3)).astype(np.float32)
    images[0, 0, 0] = [0.0, 0.5, 1.0]  # the edges: 0.5 itself is inverted, as torchvision's >= does
    for threshold in [0.0, 0.3, 0.5, 1.0]:
        got = augment.RandomSolarize(threshold, rate=1.0)(images).numpy()
        np.testing.assert_allclose(got, np.where(images >= threshold, 1.0 - images, images), atol=1e-7)
    assert np.array_equal(augment.RandomSolarize(0.5, rate=0.0)(images), images)
    assert np.array_equal(augment.RandomSolarize(0.5, rate=1.0)(images, training=False), images)


def test_solarize_rate_is_the_probability_an_image_is_solarised():
    images = np.full((4000, 2, 2, 1), 0.75, np.float32)
    for rate, low, high in [(0.2, 0.17, 0.23), (0.5, 0.47, 0.53)]:
        out = augment.RandomSolarize(0.5, rate=rate, seed=3)(images).numpy()
        assert set(np.unique(out.round(6))) <= {0.25, 0.75}
        assert low <= (out[:, 0, 0, 0] < 0.5).mean() <= high, rate


def test_byol_solarises_view_two_at_threshold_one_half():
    """Keras' Solarization(threshold_factor=(0.5, 0.5)) inverts pixels above a threshold drawn from
    U(0.002, 0.5): most pixels of 0.3 would be inverted; BYOL's (and torchvision's) leaves them."""
    def solarizers(pipeline):
        return [(layer.threshold, layer.rate) for layer in pipeline.layers if isinstance(layer, augment.RandomSolarize)]

    view1, view2 = augment.byol_views(28, 1)
    assert (solarizers(view1), solarizers(view2)) == ([], [(0.5, 0.2)])
    images = np.full((500, 4, 4, 1), 0.3, np.float32)
    assert np.array_equal(augment.RandomSolarize(0.5, rate=1.0)(images), images)


@pytest.mark.parametrize("kwargs", [dict(threshold=-0.1), dict(threshold=1.5), dict(rate=-0.5), dict(rate=2.0)])
def test_solarize_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError, match="threshold|rate"):
        augment.RandomSolarize(**kwargs)


def test_solarize_round_trips_config():
    layer = augment.RandomSolarize(0.4, rate=0.3, seed=2)
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert (type(clone), clone.threshold, clone.rate, clone.seed) == (augment.RandomSolarize, 0.4, 0.3, 2)


def numpy_color_jitter(images, brightness, contrast, saturation, hue, mode, order=None):
    """torchvision's four operations, one image and one pixel at a time, clipping after each,
    in the order brightness, contrast, saturation, hue or each image's `order[n]`."""
    out = images.astype(np.float64).copy()
    gray = (lambda im: im @ np.array([0.299, 0.587, 0.114]) if im.shape[-1] == 3 else im[..., 0])
    for n, image in enumerate(out):
        for operation in (order[n] if order is not None else range(4)):
            if operation == 0:
                image[:] = np.clip(image + brightness[n] if mode == "add" else image * brightness[n], 0, 1)
            elif operation == 1:
                image[:] = np.clip(contrast[n] * image + (1 - contrast[n]) * gray(image).mean(), 0, 1)
            elif operation == 2 and image.shape[-1] == 3:
                image[:] = np.clip(saturation[n] * image + (1 - saturation[n]) * gray(image)[..., None], 0, 1)
            elif operation == 3 and image.shape[-1] == 3:
                for y in range(image.shape[0]):
                    for x in range(image.shape[1]):
                        h, s, v = colorsys.rgb_to_hsv(*image[y, x])
                        image[y, x] = colorsys.hsv_to_rgb((h + hue[n]) % 1.0, s, v)
    return out


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("mode", ["add", "multiply"])
@pytest.mark.parametrize("ordered", [False, True])
def test_color_jitter_matches_numpy(rng, channels, mode, ordered):
    images = rng.uniform(size=(6, 5, 4, channels)).astype(np.float32)
    # Extremes included: contrast 0 (the grey mean), saturation 0 (grayscale), hue half a turn.
    brightness = np.array([-0.8, 0.0, 0.3, 0.9, 0.5, 0.1]) if mode == "add" else np.array([0.0, 1.0, 1.8, 0.2, 1.4, 0.6])
    contrast = np.array([0.0, 1.0, 1.8, 0.6, 1.4, 0.9])
    saturation = np.array([1.0, 0.0, 1.8, 0.6, 1.4, 1.1])
    hue = np.array([0.0, 0.5, -0.5, 0.1, -0.2, 0.05])
    # The fixed order, its reverse, a 4-cycle (not its own inverse, so reading a row as each
    # operation's step would fail), then random permutations.
    order = (np.stack([np.arange(4), np.arange(4)[::-1], [1, 2, 3, 0]] + [rng.permutation(4) for _ in range(3)])
             if ordered else None)
    got = augment.color_jitter(images, brightness, contrast, saturation if channels == 3 else None,
                               hue if channels == 3 else None, brightness_mode=mode, order=order).numpy()
    np.testing.assert_allclose(got, numpy_color_jitter(images, brightness, contrast, saturation, hue, mode, order),
                               atol=2e-5)


def test_color_jitter_random_order_puts_either_operation_first_half_the_time():
    """Images of a black and a white pixel: brightness then contrast and contrast then brightness
    give different images for (almost) every draw, so the share of images equal to the fixed
    order's (same seed, so the same factors) is the share drawing brightness first."""
    images = np.tile(np.float32([0.0, 1.0]).reshape(1, 1, 2, 1), (4000, 1, 1, 1))
    fixed = augment.RandomColorJitter(0.8, 0.8, seed=3)(images).numpy()
    shuffled = augment.RandomColorJitter(0.8, 0.8, order="random", seed=3)(images).numpy()
    same = np.isclose(fixed, shuffled, atol=1e-6).all(axis=(1, 2, 3))
    assert 0.46 <= same.mean() <= 0.54


def test_color_jitter_draws_torchvision_ranges():
    """Saturation factors fill [1 - s, 1 + s] (Keras' layer at 0.4 never exceeds 0.67), hue shifts [-h, h]."""
    rng = np.random.default_rng(0)
    base = rng.uniform(0.45, 0.55, size=(4000, 1, 1, 1)).astype(np.float32)
    images = np.concatenate([base + 0.05, base, base - 0.05], axis=-1)  # hue 0: a red-ish grey
    gray = images @ np.float32([0.299, 0.587, 0.114])
    out = augment.RandomColorJitter(saturation=0.4, seed=0)(images).numpy()
    factors = ((out - gray[..., None]) / (images - gray[..., None]))[:, 0, 0, 0]
    assert 0.6 <= factors.min() < 0.62 and 1.38 < factors.max() <= 1.4 and abs(factors.mean() - 1.0) < 0.02
    out = augment.RandomColorJitter(hue=0.1, seed=0)(images).numpy()
    shift = np.array([colorsys.rgb_to_hsv(*o[0, 0])[0] - colorsys.rgb_to_hsv(*i[0, 0])[0]
                      for o, i in zip(out, images)])
    shift = (shift + 0.5) % 1.0 - 0.5
    assert -0.1 <= shift.min() < -0.095 and 0.095 < shift.max() <= 0.1
    out = augment.RandomColorJitter(brightness=0.4, seed=0)(images[..., :1]).numpy()
    offsets = (out - images[..., :1])[:, 0, 0, 0]
    assert -0.4 <= offsets.min() < -0.39 and 0.39 < offsets.max() <= 0.4


def test_color_jitter_on_grayscale_skips_saturation_and_hue(rng):
    images = rng.uniform(size=(4, 6, 6, 1)).astype(np.float32)
    assert np.array_equal(augment.RandomColorJitter(saturation=0.8, hue=0.3)(images).numpy(), images)
    assert np.array_equal(augment.RandomColorJitter(0.4, 0.4)(images, training=False).numpy(), images)


def test_contrast_of_other_channel_counts_blends_with_the_channel_mean(rng):
    images = rng.uniform(size=(3, 4, 4, 2)).astype(np.float32)
    factor = np.array([0.0, 0.5, 1.5], np.float32)
    expected = np.clip(factor[:, None, None, None] * images
                       + (1 - factor[:, None, None, None]) * images.mean(axis=(1, 2, 3), keepdims=True), 0, 1)
    np.testing.assert_allclose(augment.color_jitter(images, contrast=factor).numpy(), expected, atol=1e-6)


@pytest.mark.parametrize("kwargs", [dict(brightness=-0.1), dict(contrast=-1.0), dict(hue=0.6),
                                    dict(brightness_mode="scale"), dict(order="shuffled")])
def test_color_jitter_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError, match="brightness|contrast|hue|order"):
        augment.RandomColorJitter(**kwargs)


def test_color_jitter_round_trips_config():
    jitter = augment.RandomColorJitter(0.4, 0.3, 0.2, 0.1, brightness_mode="multiply", order="random", seed=2)
    clone = augment.RandomColorJitter.from_config(jitter.get_config())
    assert (clone.brightness, clone.contrast, clone.saturation, clone.hue, clone.brightness_mode, clone.order,
            clone.seed) == (0.4, 0.3, 0.2, 0.1, "multiply", "random", 2)
