"""Evaluation protocols against slow references and on data with a known answer."""

import numpy as np
import pytest
from sklearn.datasets import make_blobs

from keras_pcl import evaluation


def reference_knn(train, train_y, test, test_y, k, t):
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    correct = 0
    for x, y in zip(test, test_y):
        sims = train @ x
        order = np.argsort(-sims)[:k]
        votes = {}
        for j in order:
            votes[train_y[j]] = votes.get(train_y[j], 0.0) + np.exp(sims[j] / t)
        correct += max(votes, key=votes.get) == y
    return correct / len(test)


@pytest.mark.parametrize("k", [1, 5, 50])
def test_knn_matches_reference(rng, k):
    train, test = rng.normal(size=(200, 6)), rng.normal(size=(40, 6))
    train_y, test_y = rng.integers(0, 4, 200), rng.integers(0, 4, 40)
    got = evaluation.knn_accuracy(train, train_y, test, test_y, k=k, batch_size=7)
    assert got == pytest.approx(reference_knn(train, train_y, test, test_y, k, 0.1))


@pytest.fixture(scope="module")
def separable():
    x, y = make_blobs(600, n_features=8, centers=4, cluster_std=0.5, random_state=1)
    return x[:400], y[:400], x[400:], y[400:]


def test_protocols_are_perfect_on_separable_data(separable):
    results = evaluation.evaluate_features(*separable, knn_k=20, shots=(1, 4), draws=2)
    assert results["knn_top1"] == 1.0 and results["linear_top1"] == 1.0
    assert results["svm_4shot"] > 0.95
    assert results["ami"] > 0.95 and results["nmi"] > 0.95 and results["ari"] > 0.95


def test_protocols_are_at_chance_on_noise(rng):
    train, test = rng.normal(size=(400, 8)), rng.normal(size=(400, 8))
    train_y, test_y = rng.integers(0, 4, 400), rng.integers(0, 4, 400)
    results = evaluation.evaluate_features(train, train_y, test, test_y, knn_k=20, shots=(2,), draws=2)
    assert results["knn_top1"] < 0.4 and results["linear_top1"] < 0.4 and results["svm_2shot"] < 0.4
    assert results["ami"] < 0.05


def test_low_shot_skips_shots_larger_than_a_class(separable):
    train, train_y, test, test_y = separable
    keep = np.concatenate([np.flatnonzero(train_y == c)[:3] for c in range(4)])
    assert set(evaluation.low_shot_svm(train[keep], train_y[keep], test, test_y, shots=(1, 2, 4), draws=1)) == {1, 2}


def test_raw_pixels_scale_uint8():
    images = np.full((2, 4, 4, 1), 255, np.uint8)
    np.testing.assert_array_equal(evaluation.raw_pixel_features(images), np.ones((2, 16)))


def test_frequency_groups_and_the_long_tail_report():
    from keras_pcl import evaluation

    counts = [500, 300, 200, 120, 80, 50, 30, 20, 10, 5]
    groups = evaluation.frequency_groups(counts)
    assert groups == {"head": [0, 1, 2], "middle": [3, 4, 5, 6], "tail": [7, 8, 9]}
    test_labels = np.repeat(np.arange(10), 10)
    predicted = test_labels.copy()
    predicted[test_labels >= 7] = 0  # the tail is always wrong
    predicted[:5] = 1  # half of class 0 wrong
    report = evaluation.long_tail_report(predicted, test_labels, counts)
    assert report["per_class_top1"][0] == 0.5 and report["per_class_top1"][9] == 0.0
    assert report["head_top1"] == pytest.approx((0.5 + 1 + 1) / 3)
    assert report["middle_top1"] == 1.0 and report["tail_top1"] == 0.0
    assert report["top1"] == pytest.approx(65 / 100)
    assert evaluation.frequency_groups([5, 9, 1, 7, 3, 8]) == {"head": [1, 5], "middle": [0, 3], "tail": [2, 4]}


def test_balanced_linear_classifier_lifts_the_tail(rng):
    """On separable features with a 100:1 training prior, the balanced softmax keeps rare classes."""
    from keras_pcl import evaluation

    centres = rng.normal(size=(4, 8)) * 3
    train_counts = [400, 100, 20, 4]
    train_labels = np.concatenate([np.full(n, c) for c, n in enumerate(train_counts)])
    train = centres[train_labels] + rng.normal(size=(len(train_labels), 8))
    test_labels = np.repeat(np.arange(4), 50)
    test = centres[test_labels] + rng.normal(size=(200, 8))
    predicted = evaluation.balanced_linear_classifier(train, train_labels, test, train_counts)
    per_class = [(predicted[test_labels == c] == c).mean() for c in range(4)]
    assert min(per_class) > 0.8, per_class
