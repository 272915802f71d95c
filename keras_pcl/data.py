"""From image arrays to the tf.data pipelines that `fit` and the E-step expect.

* `multiview_dataset`: `{"views": (v_1, ..., v_n), "index", "labels"}` batches for
  training, one augmentation per view; `contrastive_dataset`: its two-view form;
* `eval_dataset`: `(image, index)` batches in index order, the evaluation
  transform (no augmentation), for the E-step and for feature extraction;
* `load_digits`: scikit-learn's bundled digits, the embedded offline default.
* `holdout_split`: evaluate on held-out training images, for tuning without the test split.

Images are arrays `[N, H, W, C]` (or `[N, H, W]`), uint8 in `[0, 255]` or
float in `[0, 1]`; pipelines feed float32 in `[0, 1]`.
"""

import numpy as np
import tensorflow as tf

from keras_pcl.errors import InvalidInputError


def as_image_array(images):
    """Validates an image array and returns it as `[N, H, W, C]`.

    Raises a one-line ValueError for wrong ranks, empty arrays and NaN/Inf.
    """
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[0] == 0:
        raise InvalidInputError(
            f"images must be a non-empty array [N, H, W, C] or [N, H, W], got shape {images.shape}."
        )
    if images.shape[-1] not in (1, 3):
        raise InvalidInputError(f"images must have 1 or 3 channels, got {images.shape[-1]}.")
    if images.dtype.kind == "f" and not np.isfinite(images).all():
        raise InvalidInputError("images contain NaN or Inf values; clean or drop those images first.")
    return images


def to_float(images):
    """uint8 `[0, 255]` or float `[0, 1]` tensors to float32 `[0, 1]`."""
    if images.dtype == tf.uint8:
        return tf.cast(images, tf.float32) / 255.0
    return tf.cast(images, tf.float32)


def check_labels(labels, count, num_classes=None):
    """Validates training labels: `[count]` integers in `[0, num_classes)` (one-line errors).

    Returns:
        int32 array `[count]`.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != count:
        raise InvalidInputError(f"labels must be a vector of one label per image ({count}), got shape {labels.shape}.")
    if labels.dtype.kind not in "iu" and not (labels.dtype.kind == "f" and np.all(np.mod(labels, 1) == 0)):
        raise InvalidInputError(f"labels must be integer class ids, got dtype {labels.dtype}.")
    if count and labels.min() < 0:
        raise InvalidInputError(f"labels must be class ids >= 0, found {labels.min()}.")
    if num_classes is not None and count and labels.max() >= num_classes:
        raise InvalidInputError(f"label {labels.max()} is out of range for {num_classes} classes (ids 0..{num_classes - 1}).")
    return labels.astype(np.int32)


def multiview_dataset(images, augmentations, batch_size, labels=None, shuffle=True, seed=0, epochs=None,
                      initial_epoch=0, steps_per_epoch=None):
    """Training pipeline: any number of augmented views of each image, its index, optionally its label.

    Yields the batches every keras_pcl model trains on:
    `{"views": (v_1, ..., v_n), "index": [B] int32}` plus `"labels": [B] int32`
    when `labels` are given. View `i` is `augmentations[i]` applied to the
    batch; pass the same layer several times for several views of one group
    (each call draws its own randomness), e.g. SwAV's
    `[large, large] + [small] * 6`. Views may differ in size.

    Args:
        images: `[N, H, W, C]` array.
        augmentations: a list of Keras layers mapping a float `[0, 1]` batch to
            one view each (e.g. `keras_pcl.augment.pcl_v2(...)`).
        batch_size: per-step batch (the global batch under a strategy).
            Remainders are dropped: queues need a fixed batch size.
        labels: optional `[N]` integer class ids (supervised methods).
        shuffle: reshuffle every epoch.
        epochs: `None` (default): one epoch per pass over the dataset, augmented
            in parallel; not bit-reproducible. An int: the pipeline of epochs
            `initial_epoch .. epochs - 1` back to back, where the order of epoch
            `e` and the augmentation of its step `s` are pure functions of
            `(seed, e, s)` -- the same in a resumed run as in an uninterrupted
            one. Pass `steps_per_epoch=len(images) // batch_size` (or the cap)
            to `fit` with it.
        initial_epoch: first epoch of the pipeline (with `epochs`).
        steps_per_epoch: cap on the steps of each epoch (with `epochs`).

    Returns:
        `tf.data.Dataset` of batch dicts.
    """
    images = as_image_array(images)
    augmentations = list(augmentations)
    if not augmentations:
        raise InvalidInputError("augmentations is empty; pass one augmentation layer per view.")
    if batch_size < 1 or batch_size > len(images):
        raise InvalidInputError(
            f"batch_size={batch_size} must be between 1 and the number of images ({len(images)}); "
            "use a smaller batch size."
        )
    if labels is not None:
        labels = check_labels(labels, len(images))
    if epochs is not None:
        return _reproducible_epochs(images, augmentations, labels, batch_size, shuffle, seed, epochs,
                                    initial_epoch, steps_per_epoch)
    ds = tf.data.Dataset.from_tensor_slices(np.arange(len(images), dtype=np.int32))
    if shuffle:
        ds = ds.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
    pixels = tf.constant(images)
    label_table = None if labels is None else tf.constant(labels)
    ds = ds.batch(batch_size, drop_remainder=True)

    def views(index):
        return _views_batch(pixels, label_table, index, augmentations)

    return ds.map(views, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def _views_batch(pixels, label_table, index, augmentations):
    batch = to_float(tf.gather(pixels, index))
    element = {"views": tuple(augment(batch, training=True) for augment in augmentations), "index": index}
    if label_table is not None:
        element["labels"] = tf.gather(label_table, index)
    return element


def contrastive_dataset(images, augment, batch_size, shuffle=True, seed=0, augment_view2=None, epochs=None,
                        initial_epoch=0, steps_per_epoch=None, labels=None):
    """Two augmented views of each image and its index: `multiview_dataset` with
    `[augment, augment_view2 or augment]` (MoCo, PCL, SimCLR, BYOL, SimSiam).

    Args:
        augment: a Keras layer mapping a float `[0, 1]` batch to one augmented view.
        augment_view2: a different augmentation for view 2 (default: `augment`),
            e.g. BYOL's asymmetric blur and solarisation.
        Others: as in `multiview_dataset`.

    Returns:
        `tf.data.Dataset` of `{"views": (view1, view2), "index": [B]}` (plus `"labels"`).
    """
    return multiview_dataset(images, [augment, augment_view2 or augment], batch_size, labels=labels,
                             shuffle=shuffle, seed=seed, epochs=epochs, initial_epoch=initial_epoch,
                             steps_per_epoch=steps_per_epoch)


def _reproducible_epochs(images, augmentations, labels, batch_size, shuffle, seed, epochs, initial_epoch,
                         steps_per_epoch):
    """`multiview_dataset` with `epochs`: every random draw is a function of (seed, epoch, step).

    Keras augmentation layers draw from `SeedGenerator` states (variables). Each
    batch first sets every state from a stateless hash of (seed, epoch, step),
    then augments; batches are augmented one at a time (still ahead of training,
    through prefetch), so no two batches race for the same states.
    """
    count = len(images)
    steps = count // batch_size if not steps_per_epoch else min(count // batch_size, steps_per_epoch)
    pixels = tf.constant(images)
    label_table = None if labels is None else tf.constant(labels)
    states = list({id(v): v for layer in augmentations for v in layer.variables
                   if "seed_generator_state" in v.path}.values())

    def epoch_batches(epoch):
        order = (tf.random.experimental.stateless_shuffle(tf.range(count), seed=tf.stack([seed, epoch]))
                 if shuffle else tf.range(count))
        index = tf.reshape(order[: steps * batch_size], [steps, batch_size])
        return tf.data.Dataset.from_tensor_slices(index).enumerate().map(lambda step, i: (epoch, step, i))

    def views(epoch, step, index):
        batch_seed = tf.stack([tf.constant(seed, tf.int64), epoch * (2**32) + step])
        fresh = tf.random.stateless_uniform([max(1, len(states)), 2], batch_seed, minval=None, maxval=None,
                                            dtype=tf.int64)
        reseeds = [state.assign(tf.cast(fresh[i], state.dtype)) for i, state in enumerate(states)]
        with tf.control_dependencies(reseeds):
            return _views_batch(pixels, label_table, index, augmentations)

    options = tf.data.Options()
    options.deterministic = True
    options.experimental_optimization.map_parallelization = False
    ds = tf.data.Dataset.range(initial_epoch, epochs).flat_map(epoch_batches)
    ds = ds.map(lambda epoch, step, index: views(epoch, step, tf.cast(index, tf.int32)))
    return ds.prefetch(tf.data.AUTOTUNE).with_options(options)


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


# ---------------------------------------------------------------------------
# Sources: each returns a `Split` of uint8 images [N, H, W, C] and labels.


class Split:
    """Train and test images with labels (labels may be None)."""

    def __init__(self, name, train_images, train_labels, test_images, test_labels, notes=""):
        self.name = name
        self.train_images, self.train_labels = train_images, train_labels
        self.test_images, self.test_labels = test_images, test_labels
        self.notes = notes

    @property
    def image_shape(self):
        return tuple(self.train_images.shape[1:])

    @property
    def has_labels(self):
        return self.train_labels is not None and self.test_labels is not None


def holdout_split(split, count, seed=0):
    """Holds `count` labelled training images out as the evaluation set.

    For tuning without looking at the test split: the returned `Split` trains on
    the rest and evaluates on the held-out images (the test images are dropped).
    Which images are held out depends only on `seed` and the training set size,
    so runs with different training seeds and settings share one held-out set.
    """
    total = len(split.train_images)
    if not 0 < count < total:
        raise InvalidInputError(f"holdout count {count} must be between 1 and {total - 1} (the training images minus one).")
    if split.train_labels is None:
        raise InvalidInputError(f"dataset {split.name!r} has no labels to evaluate a held-out set with; drop the holdout.")
    order = np.random.default_rng(seed).permutation(total)
    held, kept = np.sort(order[:count]), np.sort(order[count:])
    return Split(f"{split.name}[holdout {count}]", split.train_images[kept], split.train_labels[kept],
                 split.train_images[held], split.train_labels[held],
                 notes=f"{split.notes}; evaluated on {count} training images held out (seed {seed}), not the test split")


def long_tail_split(split, imbalance, seed=0):
    """A long-tailed training split of a labelled dataset; the test split stays as it is.

    The standard exponential profile (Cao et al., 2019): with C classes in their
    label order and n_max the largest class's training count, class c keeps
    `floor(n_max * imbalance ** (-c / (C - 1)))` images (at least 1, at most what it
    has), chosen at random by `seed`; imbalance = largest / smallest class.

    Args:
        split: a `Split` with integer labels.
        imbalance: R >= 1 (1: balanced, 100: the usual "-LT" benchmarks).
        seed: which images each class keeps.

    Returns:
        A `Split` whose `train_class_counts` lists the kept images per class.
    """
    if split.train_labels is None:
        raise InvalidInputError(f"dataset {split.name!r} has no labels to make a long-tailed split of; "
                                "drop --long_tail_imbalance or give a labelled source.")
    if not imbalance >= 1:
        raise InvalidInputError(f"the imbalance ratio must be >= 1 (largest over smallest class), got {imbalance}.")
    labels = check_labels(split.train_labels, len(split.train_labels))
    num_classes = int(labels.max()) + 1
    n_max = np.bincount(labels, minlength=num_classes).max()
    rng = np.random.default_rng(seed)
    kept = []
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        want = int(n_max * imbalance ** (-c / max(num_classes - 1, 1)))
        kept.append(rng.choice(members, min(len(members), max(1, want)), replace=False))
    kept = np.sort(np.concatenate(kept))
    long_tailed = Split(f"{split.name}[long-tail {imbalance:g}]", split.train_images[kept], labels[kept],
                        split.test_images, split.test_labels,
                        notes=f"{split.notes}; long-tailed training split, imbalance {imbalance:g} (seed {seed})")
    return long_tailed


def class_counts(labels, num_classes):
    """`[num_classes]` images per class."""
    return np.bincount(np.asarray(labels, np.int64), minlength=num_classes)


FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


def read_idx(path):
    """Reads an idx file (gzipped or not): uint8 images `[N, H, W]` or labels `[N]`."""
    import gzip

    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise InvalidInputError(f"{path} is not an unsigned-byte idx file.")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise InvalidInputError(f"{path} is truncated: expected {int(np.prod(dims))} values, found {body.size}.")
    return body.reshape(dims)


def _random_split(images, labels, test_fraction, seed):
    order = np.random.default_rng(seed).permutation(len(images))
    n_test = max(1, int(round(test_fraction * len(images))))
    test, train = order[:n_test], order[n_test:]
    pick = (lambda a, i: None if a is None else a[i])
    return images[train], pick(labels, train), images[test], pick(labels, test)


def digits_source(test_fraction=0.2, seed=0):
    images, labels = load_digits()
    return Split("digits", *_random_split(images, labels, test_fraction, seed),
                 notes="scikit-learn digits, 8x8 grayscale")


def fashion_mnist_source(directory=FASHION_MNIST_DIR):
    import os

    files = {part: os.path.join(directory, f"{part}-ubyte.gz") for part in
             ("train-images-idx3", "train-labels-idx1", "t10k-images-idx3", "t10k-labels-idx1")}
    if all(os.path.exists(f) for f in files.values()):
        arrays = {part: read_idx(f) for part, f in files.items()}
        return Split("fashion_mnist", arrays["train-images-idx3"][..., None], arrays["train-labels-idx1"],
                     arrays["t10k-images-idx3"][..., None], arrays["t10k-labels-idx1"],
                     notes=f"read from {directory}")
    try:
        import keras

        (x, y), (xt, yt) = keras.datasets.fashion_mnist.load_data()
    except Exception as error:  # offline: say both ways to get it
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {directory} and the download failed ({type(error).__name__}); "
            "install it with `apt-get install -y dataset-fashion-mnist` or go online for keras.datasets."
        ) from None
    return Split("fashion_mnist", x[..., None], y, xt[..., None], yt, notes="keras.datasets")


def keras_source(name):
    import keras

    loader = {"cifar10": keras.datasets.cifar10, "cifar100": keras.datasets.cifar100}[name]
    try:
        (x, y), (xt, yt) = loader.load_data()
    except Exception as error:
        raise FileNotFoundError(
            f"{name} could not be loaded through keras.datasets ({type(error).__name__}: it downloads "
            "on first use); connect to the internet once, or use folder:PATH / npz:PATH."
        ) from None
    return Split(name, x, y.reshape(-1), xt, yt.reshape(-1), notes="keras.datasets")


def npz_source(path, test_fraction=0.2, seed=0):
    import os

    if not os.path.isfile(path):
        raise FileNotFoundError(f"npz file {path!r} does not exist.")
    with np.load(path) as arrays:
        if "x" not in arrays:
            raise InvalidInputError(f"{path} has no array named 'x' (found {sorted(arrays.files)}); save images as x=...")
        images = as_image_array(arrays["x"])
        labels = arrays["y"].reshape(-1) if "y" in arrays else None
    if labels is not None and len(labels) != len(images):
        raise InvalidInputError(f"{path}: x has {len(images)} images but y has {len(labels)} labels.")
    if images.dtype != np.uint8:
        images = np.clip(np.round(images.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
    return Split(f"npz:{path}", *_random_split(images, labels, test_fraction, seed), notes=path)


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def folder_source(path, image_size, test_fraction=0.2, seed=0):
    """Every image under `path`; class sub-folders become labels.

    Images are resized to `image_size` (square) and converted to RGB, or to
    grayscale when every image is grayscale. Unreadable files are skipped and
    counted; it fails only when no image can be read.
    """
    import os

    from PIL import Image

    if not os.path.isdir(path):
        raise FileNotFoundError(f"image folder {path!r} does not exist.")
    files = sorted(
        os.path.join(root, name) for root, _, names in os.walk(path) for name in names
        if not name.startswith(".")
    )
    if not files:
        raise InvalidInputError(f"image folder {path!r} is empty; put images (or class sub-folders of images) in it.")
    images, classes, skipped, modes = [], [], 0, set()
    for file in files:
        try:
            with Image.open(file) as image:
                image.load()
                modes.add("L" if image.mode in ("L", "1", "I;16", "I") else "RGB")
                images.append(image.convert("RGB").resize((image_size, image_size), Image.BILINEAR))
        except Exception:
            skipped += 1
            continue
        relative = os.path.relpath(os.path.dirname(file), path)
        classes.append(relative.split(os.sep)[0] if relative != "." else "")
    if not images:
        raise InvalidInputError(f"none of the {len(files)} files in {path!r} is a readable image.")
    grayscale = modes == {"L"}
    array = np.stack([np.asarray(im.convert("L"))[..., None] if grayscale else np.asarray(im) for im in images])
    names = sorted(set(classes))
    labels = np.array([names.index(c) for c in classes], np.int32) if len(names) > 1 else None
    notes = f"{len(images)} images from {path}" + (f", {skipped} unreadable files skipped" if skipped else "")
    split = Split(f"folder:{path}", *_random_split(array, labels, test_fraction, seed), notes=notes)
    split.skipped, split.class_names = skipped, names
    return split


def tfds_source(name):
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise ImportError("tfds:NAME needs tensorflow-datasets: pip install 'keras_pcl[tfds]'.") from None
    train, test = tfds.load(name, split=["train", "test"], as_supervised=True, batch_size=-1)
    x, y = tfds.as_numpy(train)
    xt, yt = tfds.as_numpy(test)
    return Split(f"tfds:{name}", as_image_array(x), y, as_image_array(xt), yt, notes="tensorflow-datasets")


DATASETS = ("digits", "fashion_mnist", "cifar10", "cifar100", "folder:PATH", "npz:PATH", "tfds:NAME")


def load_dataset(spec, image_size=None, seed=0):
    """Loads a dataset by name: one of `DATASETS` (see the module docstring).

    Returns:
        A `Split` with uint8 images.
    """
    if spec == "digits":
        return digits_source(seed=seed)
    if spec == "fashion_mnist":
        return fashion_mnist_source()
    if spec in ("cifar10", "cifar100"):
        return keras_source(spec)
    kind, _, argument = spec.partition(":")
    if kind == "folder" and argument:
        return folder_source(argument, image_size or 32, seed=seed)
    if kind == "npz" and argument:
        return npz_source(argument, seed=seed)
    if kind == "tfds" and argument:
        return tfds_source(argument)
    raise InvalidInputError(f"unknown dataset {spec!r}; choose one of {', '.join(DATASETS)}.")
