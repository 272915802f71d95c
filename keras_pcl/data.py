"""From image arrays to the tf.data pipelines that `fit` and the E-step expect.

* `contrastive_dataset`: `((view1, view2), index)` batches for training;
* `eval_dataset`: `(image, index)` batches in index order, the evaluation
  transform (no augmentation), for the E-step and for feature extraction;
* `load_digits`: scikit-learn's bundled digits, the embedded offline default.

Images are arrays `[N, H, W, C]` (or `[N, H, W]`), uint8 in `[0, 255]` or
float in `[0, 1]`; pipelines feed float32 in `[0, 1]`.
"""

import numpy as np
import tensorflow as tf


def as_image_array(images):
    """Validates an image array and returns it as `[N, H, W, C]`.

    Raises a one-line ValueError for wrong ranks, empty arrays and NaN/Inf.
    """
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(
            f"images must be a non-empty array [N, H, W, C] or [N, H, W], got shape {images.shape}."
        )
    if images.shape[-1] not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got {images.shape[-1]}.")
    if images.dtype.kind == "f" and not np.isfinite(images).all():
        raise ValueError("images contain NaN or Inf values; clean or drop those images first.")
    return images


def to_float(images):
    """uint8 `[0, 255]` or float `[0, 1]` tensors to float32 `[0, 1]`."""
    if images.dtype == tf.uint8:
        return tf.cast(images, tf.float32) / 255.0
    return tf.cast(images, tf.float32)


def contrastive_dataset(images, augment, batch_size, shuffle=True, seed=0, augment_view2=None):
    """Training pipeline: two augmented views of each image and its index.

    Args:
        images: `[N, H, W, C]` array.
        augment: a Keras layer (e.g. `keras_pcl.augment.pcl_v2(...)`) mapping
            a float `[0, 1]` batch to one augmented view; called twice.
        batch_size: per-step batch (the global batch under a strategy).
            Remainders are dropped: MoCo's queue needs a fixed batch size.
        shuffle: reshuffle every epoch.
        augment_view2: a different augmentation for view 2 (default: `augment`).

    Returns:
        `tf.data.Dataset` of `((view1, view2), index)`, index int32 `[B]`.
    """
    images = as_image_array(images)
    if batch_size < 1 or batch_size > len(images):
        raise ValueError(
            f"batch_size={batch_size} must be between 1 and the number of images ({len(images)}); "
            "use a smaller batch size."
        )
    augment_view2 = augment_view2 or augment
    ds = tf.data.Dataset.from_tensor_slices((images, np.arange(len(images), dtype=np.int32)))
    if shuffle:
        ds = ds.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size, drop_remainder=True)

    def two_views(batch, index):
        batch = to_float(batch)
        return (augment(batch, training=True), augment_view2(batch, training=True)), index

    return ds.map(two_views, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def eval_dataset(images, batch_size=256, image_size=None, labels=None):
    """Evaluation pipeline in index order: `(image, index)` or `(image, index, label)`.

    Args:
        images: `[N, H, W, C]` array.
        batch_size: batch size (the last batch may be smaller).
        image_size: resize to this square side if given (the evaluation transform).
        labels: optional `[N]` labels, added as a third element.
    """
    images = as_image_array(images)
    tensors = (images, np.arange(len(images), dtype=np.int32))
    if labels is not None:
        tensors += (np.asarray(labels),)
    ds = tf.data.Dataset.from_tensor_slices(tensors).batch(batch_size)

    def preprocess(batch, *rest):
        batch = to_float(batch)
        if image_size is not None and tuple(batch.shape[1:3]) != (image_size, image_size):
            batch = tf.image.resize(batch, [image_size, image_size])
        return (batch,) + rest

    return ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def load_digits():
    """scikit-learn's bundled 8x8 digits as uint8 images `[1797, 8, 8, 1]` and labels `[1797]`."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return images, digits.target.astype(np.int32)
