"""Data pipelines and sources (all offline: synthetic files written by the tests)."""

import gzip

import keras
import numpy as np
import pytest
from PIL import Image

from keras_pcl import augment, data


def test_contrastive_dataset_yields_two_views_and_indices(digits):
    images = digits[0][:100]
    ds = data.contrastive_dataset(images, augment.pcl_v2(8, 1), 32, shuffle=True)
    batches = list(ds)
    assert len(batches) == 3  # the remainder is dropped
    (view1, view2), index = batches[0]["views"], batches[0]["index"]
    assert view1.shape == view2.shape == (32, 8, 8, 1)
    assert not np.allclose(view1.numpy(), view2.numpy())
    seen = np.concatenate([b["index"].numpy() for b in batches])
    assert len(set(seen)) == 96 and seen.max() < 100


def test_reproducible_epochs_depend_only_on_seed_epoch_and_step(digits):
    def batches(initial_epoch, seed=3):
        keras.utils.set_random_seed(initial_epoch + 100)  # layer seeds differ: the reseeding must not care
        pipeline = augment.pcl_v2(8, 1, crop_scale=(0.5, 1.0))
        ds = data.contrastive_dataset(digits[0][:256], pipeline, 64, seed=seed, epochs=3, initial_epoch=initial_epoch)
        return list(ds.as_numpy_iterator())

    full, resumed = batches(0), batches(2)
    assert len(full) == 12 and len(resumed) == 4  # 4 steps per epoch
    for batch, again in zip(full[8:], resumed):
        np.testing.assert_array_equal(batch["index"], again["index"])
        np.testing.assert_array_equal(batch["views"][0], again["views"][0])
        np.testing.assert_array_equal(batch["views"][1], again["views"][1])
    view1, view2 = full[0]["views"]
    assert not np.array_equal(view1, view2)  # two different augmentations of the same images
    assert not np.array_equal(full[0]["index"], full[4]["index"])  # each epoch has its own order
    assert sorted(np.concatenate([b["index"] for b in full[:4]])) == list(range(256))
    other_seed = batches(2, seed=4)[0]
    assert not np.array_equal(other_seed["index"], resumed[0]["index"])


def test_eval_dataset_keeps_index_order(digits):
    images, labels = digits[0][:70], digits[1][:70]
    batches = list(data.eval_dataset(images, 32, labels=labels))
    index = np.concatenate([b[1].numpy() for b in batches])
    np.testing.assert_array_equal(index, np.arange(70))
    np.testing.assert_allclose(batches[0][0].numpy(), images[:32] / 255.0, atol=1e-6)
    np.testing.assert_array_equal(np.concatenate([b[2].numpy() for b in batches]), labels)


@pytest.mark.parametrize("images,message", [
    (np.zeros((0, 8, 8, 1)), "non-empty"),
    (np.zeros((4, 8)), "non-empty"),
    (np.zeros((4, 8, 8, 2)), "1 or 3 channels"),
    (np.full((4, 8, 8, 1), np.nan), "NaN or Inf"),
])
def test_bad_image_arrays(images, message):
    with pytest.raises(ValueError, match=message):
        data.as_image_array(images)


def test_batch_larger_than_dataset(digits):
    with pytest.raises(ValueError, match="batch_size=64 must be between 1 and the number of images"):
        data.contrastive_dataset(digits[0][:10], augment.pcl_v1(8, 1), 64)


def write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reads_idx_files(tmp_path, rng):
    train = rng.integers(0, 256, (12, 28, 28))
    test = rng.integers(0, 256, (5, 28, 28))
    for name, array in [("train-images-idx3", train), ("train-labels-idx1", np.arange(12) % 10),
                        ("t10k-images-idx3", test), ("t10k-labels-idx1", np.arange(5))]:
        write_idx(tmp_path / f"{name}-ubyte.gz", array)
    split = data.fashion_mnist_source(str(tmp_path))
    assert split.train_images.shape == (12, 28, 28, 1) and split.test_images.shape == (5, 28, 28, 1)
    np.testing.assert_array_equal(split.train_images[..., 0], train)
    np.testing.assert_array_equal(split.train_labels, np.arange(12) % 10)


def test_truncated_idx_file(tmp_path):
    path = tmp_path / "bad-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + (100).to_bytes(4, "big") + b"\x00" * 10)
    with pytest.raises(ValueError, match="truncated"):
        data.read_idx(str(path))


def make_folder(root, rng):
    for cls, mode, size in [("cats", "RGB", (20, 16)), ("dogs", "L", (12, 12))]:
        (root / cls).mkdir(parents=True)
        for i in range(5):
            shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            Image.fromarray(rng.integers(0, 256, shape).astype(np.uint8), mode).save(root / cls / f"{i}.png")
    (root / "dogs" / "notes.txt").write_text("not an image")
    (root / "cats" / "broken.jpg").write_bytes(b"\xff\xd8garbage")


def test_folder_source_mixed_sizes_modes_and_corrupt_files(tmp_path, rng):
    make_folder(tmp_path, rng)
    split = data.folder_source(str(tmp_path), image_size=16)
    assert split.skipped == 2 and "2 unreadable files skipped" in split.notes
    total = len(split.train_images) + len(split.test_images)
    assert total == 10 and split.image_shape == (16, 16, 3)
    assert set(np.concatenate([split.train_labels, split.test_labels])) == {0, 1}
    assert split.class_names == ["cats", "dogs"]


def test_folder_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.folder_source(str(tmp_path / "missing"), 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is empty"):
        data.folder_source(str(tmp_path / "empty"), 8)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.png").write_bytes(b"nope")
    with pytest.raises(ValueError, match="none of the 1 files"):
        data.folder_source(str(tmp_path / "junk"), 8)


def test_npz_source(tmp_path, rng):
    path = tmp_path / "d.npz"
    np.savez(path, x=rng.uniform(size=(20, 6, 6, 3)).astype(np.float32), y=np.arange(20) % 2)
    split = data.npz_source(str(path))
    assert split.train_images.dtype == np.uint8 and split.image_shape == (6, 6, 3)
    np.savez(tmp_path / "nox.npz", images=np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="no array named 'x'"):
        data.npz_source(str(tmp_path / "nox.npz"))


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        data.load_dataset("mnist")


def test_holdout_split_evaluates_on_unseen_training_images():
    images = np.arange(50, dtype=np.uint8).reshape(50, 1, 1, 1)
    split = data.Split("toy", images, np.arange(50) % 5, images[:3], np.zeros(3, int))
    held = data.holdout_split(split, 10)
    train_ids, test_ids = held.train_images.ravel(), held.test_images.ravel()
    assert len(train_ids) == 40 and len(test_ids) == 10
    assert not set(train_ids) & set(test_ids) and set(train_ids) | set(test_ids) == set(range(50))
    np.testing.assert_array_equal(held.test_labels, test_ids % 5)  # labels travel with their images
    # The held-out set depends on the holdout seed only, not on anything about the run.
    np.testing.assert_array_equal(data.holdout_split(split, 10).test_images, held.test_images)
    assert not np.array_equal(data.holdout_split(split, 10, seed=1).test_images, held.test_images)
    with pytest.raises(ValueError, match="between 1 and 49"):
        data.holdout_split(split, 50)
    with pytest.raises(ValueError, match="no labels"):
        data.holdout_split(data.Split("unlabelled", images, None, images, None), 10)


@pytest.mark.parametrize("imbalance", [1, 10, 100])
def test_long_tail_split_follows_the_exponential_profile(imbalance):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 500)
    images = rng.integers(0, 256, (5000, 4, 4, 1)).astype(np.uint8)
    split = data.Split("toy", images, labels, images[:100], labels[:100])
    long_tailed = data.long_tail_split(split, imbalance, seed=3)
    counts = np.bincount(long_tailed.train_labels, minlength=10)
    np.testing.assert_array_equal(counts, [max(1, int(500 * imbalance ** (-c / 9))) for c in range(10)])
    assert long_tailed.test_images is split.test_images  # the test split is untouched
    # The kept images are the labelled ones: every kept image appears in the source with its label.
    source = {img.tobytes(): lab for img, lab in zip(images, labels)}
    assert all(source[img.tobytes()] == lab for img, lab in zip(long_tailed.train_images, long_tailed.train_labels))
    again = data.long_tail_split(split, imbalance, seed=3)
    np.testing.assert_array_equal(again.train_images, long_tailed.train_images)  # seeded


def test_long_tail_split_needs_labels():
    split = data.Split("unlabelled", np.zeros((10, 4, 4, 1), np.uint8), None, np.zeros((2, 4, 4, 1), np.uint8), None)
    with pytest.raises(ValueError, match="no labels"):
        data.long_tail_split(split, 10)
