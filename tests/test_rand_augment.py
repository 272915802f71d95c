"""keras_pcl.rand_augment against PIL, the library timm's RandAugment (and PaCo's copy of it) runs on."""

import keras
import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps
from scipy import ndimage

from keras_pcl import augment
from keras_pcl.errors import InvalidInputError
from keras_pcl.rand_augment import OPS, RandAugment, rand_augment_op

GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


def _pil_op(image, name, magnitude, sign, fill):
    """timm's `AugmentOp` for one PIL image (bilinear where timm picks bilinear or bicubic)."""
    s = magnitude / 10.0
    factor = 1.8 * s + 0.1
    geometry = dict(fillcolor=fill, resample=Image.BILINEAR)
    width, height = image.size
    affine = {"ShearX": (1, 0.3 * s * sign, 0, 0, 1, 0), "ShearY": (1, 0, 0, 0.3 * s * sign, 1, 0),
              "TranslateXRel": (1, 0, 0.45 * s * sign * width, 0, 1, 0),
              "TranslateYRel": (1, 0, 0, 0, 1, 0.45 * s * sign * height)}
    enhance = {"Color": ImageEnhance.Color, "Contrast": ImageEnhance.Contrast,
               "Brightness": ImageEnhance.Brightness, "Sharpness": ImageEnhance.Sharpness}
    if name in affine:
        return image.transform(image.size, Image.AFFINE, affine[name], **geometry)
    if name in enhance:
        return enhance[name](image).enhance(factor)
    if name == "Rotate":
        return image.rotate(30 * s * sign, **geometry)
    if name == "Posterize":
        return ImageOps.posterize(image, int(4 * s))
    if name == "Solarize":
        return ImageOps.solarize(image, int(256 * s))
    if name == "SolarizeAdd":
        lut = [min(255, i + int(110 * s)) if i < 128 else i for i in range(256)]
        return image.point(lut * len(image.getbands()))
    return {"AutoContrast": ImageOps.autocontrast, "Equalize": ImageOps.equalize, "Invert": ImageOps.invert}[name](image)


def _pil_batch(u8, name, magnitudes, signs, fill=128):
    channels = u8.shape[-1]
    out = []
    for image, magnitude, sign in zip(u8, magnitudes, signs):
        pil = Image.fromarray(image[..., 0] if channels == 1 else image)
        result = _pil_op(pil, name, float(magnitude), float(sign), fill if channels == 1 else (fill,) * 3)
        out.append(np.asarray(result, dtype=np.float64).reshape(image.shape))
    return np.stack(out)


def _images(rng, channels, batch=12, height=20, width=24):
    """Half noise, half smooth random walks (the ops that look at neighbours need structure)."""
    noise = rng.integers(0, 256, size=(batch // 2, height, width, channels))
    walks = np.cumsum(rng.integers(-8, 9, size=(batch - batch // 2, height, width, channels)), axis=2) + 128
    return np.clip(np.concatenate([noise, walks]), 0, 255).astype(np.uint8)


def _draws(rng, batch, low=0.0):
    magnitudes = rng.uniform(low, 10.0, size=batch).astype(np.float32)
    magnitudes[:2] = (low, 10.0)  # the ends of the range
    return magnitudes, np.where(rng.uniform(size=batch) < 0.5, -1.0, 1.0).astype(np.float32)


# Levels PIL computes in integers exactly as here, and those it rounds or truncates its own way.
EXACT = ("AutoContrast", "Equalize", "Invert", "Posterize", "Solarize", "SolarizeAdd")
TOLERANCE = {"Contrast": 1.01, "Brightness": 1.01, "Color": 1.5, "Sharpness": 1.5}


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", [name for name in OPS if name not in GEOMETRIC])
def test_pixel_ops_match_pil(rng, name, channels):
    u8 = _images(rng, channels)
    # Posterize below magnitude 2.5 keeps 0 bits, which PIL 13 refuses (see the test below).
    magnitudes, signs = _draws(rng, len(u8), low=2.5 if name == "Posterize" else 0.0)
    got = rand_augment_op(u8 / 255.0, np.full(len(u8), OPS.index(name)), magnitudes, signs).numpy() * 255.0
    want = _pil_batch(u8, name, magnitudes, signs)
    np.testing.assert_allclose(got, want, atol=1e-3 if name in EXACT else TOLERANCE[name])


@pytest.mark.parametrize("channels", [1, 3])
def test_equalize_matches_pil_on_large_images(rng, channels):
    """PIL's step is (pixels - the top level's count) // 255: at 20 x 24 px dividing by 256 gives
    the same step, at 256 x 260 px it never does."""
    u8 = _images(rng, channels, batch=2, height=256, width=260)
    got = rand_augment_op(u8 / 255.0, np.full(2, OPS.index("Equalize")), np.float32([10, 10])).numpy() * 255.0
    np.testing.assert_allclose(got, _pil_batch(u8, "Equalize", [10, 10], [1, 1]), atol=1e-3)


def test_autocontrast_matches_pil_level_for_level(rng):
    """Every level between a low and a high one, for 300 (low, high) pairs: PIL's table truncates
    `level * scale + offset` in float64, which lands just under a whole number for some pairs."""
    pairs = np.sort(rng.integers(0, 256, size=(300, 2)), axis=1)
    pairs[:2] = [(0, 25), (3, 250)]
    u8 = np.stack([np.clip(np.arange(256), low, high) for low, high in pairs]).astype(np.uint8)[:, None, :, None]
    got = rand_augment_op(u8 / 255.0, np.full(len(u8), OPS.index("AutoContrast")), np.zeros(len(u8), np.float32))
    np.testing.assert_allclose(got.numpy() * 255.0, _pil_batch(u8, "AutoContrast", np.zeros(300), np.ones(300)),
                               atol=1e-3)


def test_posterize_to_zero_bits_is_black(rng):
    """timm's Posterize keeps floor(4 m / 10) bits: none below m = 2.5, which older PIL made black."""
    u8 = _images(rng, 3, batch=4)
    got = rand_augment_op(u8 / 255.0, np.full(4, OPS.index("Posterize")), np.float32([0.0, 1.0, 2.4, 2.5]))
    assert np.all(got.numpy()[:3] == 0.0)
    np.testing.assert_allclose(got.numpy()[3] * 255, u8[3] & 0b10000000, atol=1e-3)  # 1 bit


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", GEOMETRIC)
def test_geometric_ops_match_pil_inside_the_image(rng, name, channels):
    """Where PIL samples wholly inside the image the two agree to PIL's rounding; in the one-pixel
    band at the fill's edge TF blends the fill into the bilinear sample and PIL does not."""
    u8 = _images(rng, channels)
    magnitudes, signs = _draws(rng, len(u8))
    ops = np.full(len(u8), OPS.index(name))
    got = rand_augment_op(u8 / 255.0, ops, magnitudes, signs).numpy() * 255.0
    want = _pil_batch(u8, name, magnitudes, signs)
    covered = rand_augment_op(np.ones(u8.shape, np.float32), ops, magnitudes, signs, fill_value=0.0).numpy()
    inside = np.stack([ndimage.binary_erosion(mask) for mask in covered.min(axis=-1) > 0.999])
    assert inside.mean() > 0.3
    np.testing.assert_allclose(got[inside], want[inside], atol=1.01)  # PIL truncates to a level


def test_geometric_ops_go_the_way_of_their_sign():
    """A ramp left to right: TranslateXRel by +s samples further right (PIL's inverse map), Rotate by
    +30 degrees turns it counter-clockwise (the bright right side rises), ShearX by +s samples
    lower rows further right."""
    ramp = np.tile(np.linspace(0.0, 1.0, 32, dtype=np.float32)[None, :, None], (32, 1, 1))[None]
    ten, plus = np.float32([10.0]), np.float32([1.0])

    def run(name, sign=plus):
        return rand_augment_op(ramp, [OPS.index(name)], ten, sign, fill_value=0.0).numpy()[0, ..., 0]

    shifted = run("TranslateXRel")
    np.testing.assert_allclose(shifted[:, 0], ramp[0, :, 14, 0], atol=0.02)  # 0.45 * 32 = 14.4 px
    assert np.all(shifted[:, -14:] == 0.0)
    assert np.all(run("TranslateXRel", -plus)[:, :14] == 0.0)
    rotated = run("Rotate")
    assert rotated[8, 16] > rotated[24, 16] + 0.2
    sheared = run("ShearX")
    assert sheared[28, 8] > sheared[4, 8]


def test_fill_value_per_channel():
    images = np.full((1, 8, 8, 3), 0.9, np.float32)
    out = rand_augment_op(images, [OPS.index("TranslateYRel")], np.float32([10.0]), np.float32([1.0]),
                          fill_value=(0.1, 0.2, 0.3)).numpy()[0]
    np.testing.assert_allclose(out[-3:], np.broadcast_to([0.1, 0.2, 0.3], (3, 8, 3)), atol=1e-6)
    np.testing.assert_allclose(out[:4], 0.9, atol=1e-6)


def test_no_op_leaves_images_alone(rng):
    images = rng.uniform(size=(3, 8, 8, 3)).astype(np.float32)
    np.testing.assert_array_equal(rand_augment_op(images, [-1, -1, -1], np.float32([10, 5, 0])).numpy(), images)


def test_each_image_draws_its_own_operations(rng):
    """64 copies of one image, one operation each at a fixed magnitude: each of the 15 shows up
    (Keras' RandAugment picks one pair of operations for the whole batch)."""
    image = rng.uniform(0.2, 0.8, size=(1, 8, 8, 3)).astype(np.float32)
    layer = RandAugment(num_ops=1, magnitude=9, magnitude_std=0.0, rate=1.0, seed=0)
    out = layer(np.repeat(image, 256, axis=0)).numpy()
    distinct = np.unique(np.round(out.reshape(256, -1), 4), axis=0)
    assert len(distinct) >= 15  # 15 operations, the geometric ones both ways


def test_draws_follow_the_recipe():
    layer = RandAugment(num_ops=2, magnitude=10, magnitude_std=0.5, rate=0.5, seed=1)
    ops, magnitudes, signs = (t.numpy() for t in layer.draw(20000))
    applied = ops >= 0
    assert abs(applied.mean() - 0.5) < 0.02
    counts = np.bincount(ops[applied], minlength=len(OPS))
    assert len(counts) == len(OPS) and np.all(np.abs(counts / applied.sum() - 1 / len(OPS)) < 0.015)
    assert magnitudes.max() <= 10.0 and magnitudes.min() > 7.0
    assert abs(magnitudes.mean() - (10 - 0.5 / np.sqrt(2 * np.pi))) < 0.02  # E[min(N(10, 0.5), 10)]
    assert set(np.unique(signs)) == {-1.0, 1.0} and abs((signs > 0).mean() - 0.5) < 0.02


def test_share_of_images_left_alone():
    """At magnitude 10 Solarize's threshold is 256, a no-op, and every other operation changes these
    images: an image passes both rounds untouched with probability (1/2 + 1/2 * 1/15)^2."""
    images = np.random.default_rng(3).uniform(0.2, 0.8, size=(3000, 8, 8, 3)).astype(np.float32)
    out = RandAugment(magnitude=10, magnitude_std=0.0, seed=4)(images).numpy()
    untouched = np.all(np.abs(out - images) < 1e-6, axis=(1, 2, 3)).mean()
    assert abs(untouched - (0.5 + 0.5 / 15) ** 2) < 0.04


def test_inference_and_rate_zero_pass_through(rng):
    images = rng.uniform(size=(4, 8, 8, 1)).astype(np.float32)
    np.testing.assert_array_equal(RandAugment()(images, training=False), images)
    np.testing.assert_array_equal(RandAugment(rate=0.0)(images), images)
    np.testing.assert_array_equal(RandAugment(num_ops=0)(images), images)


@pytest.mark.parametrize("kwargs", [dict(num_ops=-1), dict(num_ops=1.5), dict(magnitude=11), dict(magnitude=-1),
                                    dict(magnitude_std=-0.1), dict(magnitude_std=float("inf")), dict(rate=1.5),
                                    dict(fill_value=2.0), dict(fill_value=(0.1, 1.2, 0.3)),
                                    dict(translate_fraction=-0.1)])
def test_bad_arguments(kwargs):
    with pytest.raises(InvalidInputError, match="must be"):
        RandAugment(**kwargs)


def test_fill_value_must_match_the_channels():
    with pytest.raises(InvalidInputError, match="one per channel"):
        RandAugment(fill_value=(0.1, 0.2, 0.3))(np.zeros((2, 8, 8, 1), np.float32))


def test_config_round_trip():
    layer = RandAugment(num_ops=3, magnitude=9, magnitude_std=0.2, rate=0.4, fill_value=(0.1, 0.2, 0.3),
                        translate_fraction=0.3, seed=5)
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(clone) is RandAugment and clone.get_config() == layer.get_config()


def test_paco_query_view_uses_the_per_image_recipe():
    query, key = augment.paco_views(16, channels=1)
    layers = [layer for layer in query.layers if isinstance(layer, RandAugment)]
    assert [(layer.num_ops, layer.magnitude, layer.magnitude_std, layer.rate) for layer in layers] == [(2, 10, 0.5, 0.5)]
    assert not any(isinstance(layer, keras.layers.RandAugment) for layer in query.layers + key.layers)
