"""Evaluation protocols on frozen features, and the `KNNMonitor` callback.

* `knn_accuracy`: weighted kNN top-1 of InstDisc (Wu et al., 2018), k=200, T=0.1;
* `linear_probe`: logistic regression on frozen features;
* `low_shot_svm`: the PCL paper's low-shot protocol, one-vs-rest LinearSVC
  (C=0.5, positive class weight 2) on L2-normalised features, k labelled
  images per class, mean over draws;
* `clustering_scores`: k-means with K = number of classes, AMI/NMI/ARI;
* long-tailed labels: `long_tail_report` (top-1 overall, per class, head /
  middle / tail) of a classifier's predictions, `balanced_linear_classifier`
  on frozen features.

`evaluate_features` runs the first four; `raw_pixel_features` gives the
baseline every number should be read against.
"""

import numpy as np
import keras
from sklearn import metrics
from sklearn.cluster import KMeans
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC


def l2_normalize(features):
    features = np.asarray(features, np.float32)
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


def extract_features(encoder, images, batch_size=512, image_size=None):
    """Frozen-encoder features `[N, D]` (float32 numpy) of an image array.

    Args:
        encoder: a callable model from float `[0, 1]` images to features,
            e.g. `model.backbone` of a trained MoCo/PCL.
        images: `[N, H, W, C]` uint8 or float array.
        image_size: resize to this side first (the evaluation transform).
    """
    from keras_pcl import data

    images_only = data.eval_dataset(images, batch_size, image_size).map(lambda x, index: x)
    return np.asarray(encoder.predict(images_only, verbose=0), np.float32)


def raw_pixel_features(images):
    """Flattened pixels in `[0, 1]`: the baseline representation."""
    images = np.asarray(images)
    flat = images.reshape(len(images), -1).astype(np.float32)
    return flat / 255.0 if images.dtype == np.uint8 else flat


def knn_accuracy(train_features, train_labels, test_features, test_labels, k=200, temperature=0.1,
                 batch_size=1024):
    """Weighted kNN top-1 accuracy (InstDisc): cosine similarity, votes `exp(s / T)`.

    Returns:
        Accuracy in `[0, 1]`.
    """
    train = l2_normalize(train_features)
    test = l2_normalize(test_features)
    train_labels = np.asarray(train_labels)
    classes = np.unique(train_labels)
    label_ids = np.searchsorted(classes, train_labels)
    k = min(k, len(train))
    correct = 0
    for start in range(0, len(test), batch_size):
        similarity = test[start:start + batch_size] @ train.T
        neighbours = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
        weights = np.exp(np.take_along_axis(similarity, neighbours, axis=1) / temperature)
        votes = np.zeros((len(similarity), len(classes)))
        np.add.at(votes, (np.arange(len(similarity))[:, None], label_ids[neighbours]), weights)
        correct += (classes[votes.argmax(1)] == np.asarray(test_labels)[start:start + batch_size]).sum()
    return float(correct / len(test))


def linear_probe(train_features, train_labels, test_features, test_labels, max_iter=1000):
    """Logistic regression on standardised frozen features; returns test accuracy."""
    scaler = StandardScaler().fit(train_features)
    classifier = LogisticRegression(max_iter=max_iter)
    classifier.fit(scaler.transform(train_features), train_labels)
    return float(classifier.score(scaler.transform(test_features), test_labels))


def _one_vs_rest_svm(features, labels, classes):
    scores = []
    for c in classes:
        target = np.where(labels == c, 1, -1)
        svm = LinearSVC(C=0.5, class_weight={1: 2.0, -1: 1.0}, max_iter=5000)
        scores.append(svm.fit(features, target))
    return scores


def low_shot_svm(train_features, train_labels, test_features, test_labels, shots=(1, 2, 4, 8, 16),
                 draws=5, seed=0):
    """The PCL paper's low-shot protocol: k labelled images per class.

    Returns:
        `{k: mean test accuracy over draws}`; shots larger than the smallest
        class are skipped.
    """
    train = l2_normalize(train_features)
    test = l2_normalize(test_features)
    train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
    classes = np.unique(train_labels)
    smallest = min((train_labels == c).sum() for c in classes)
    rng = np.random.default_rng(seed)
    results = {}
    for k in shots:
        if k > smallest:
            continue
        accuracies = []
        for _ in range(draws):
            chosen = np.concatenate([rng.choice(np.flatnonzero(train_labels == c), k, replace=False)
                                     for c in classes])
            svms = _one_vs_rest_svm(train[chosen], train_labels[chosen], classes)
            decision = np.stack([svm.decision_function(test) for svm in svms], axis=1)
            accuracies.append(float((classes[decision.argmax(1)] == test_labels).mean()))
        results[k] = float(np.mean(accuracies))
    return results


def clustering_scores(features, labels, seed=0):
    """k-means (K = number of classes) on L2-normalised features: AMI, NMI, ARI."""
    labels = np.asarray(labels)
    predicted = KMeans(len(np.unique(labels)), n_init=10, random_state=seed).fit_predict(
        l2_normalize(features))
    return {
        "ami": float(metrics.adjusted_mutual_info_score(labels, predicted)),
        "nmi": float(metrics.normalized_mutual_info_score(labels, predicted)),
        "ari": float(metrics.adjusted_rand_score(labels, predicted)),
    }


def evaluate_features(train_features, train_labels, test_features, test_labels, knn_k=200,
                      shots=(1, 2, 4, 8, 16), draws=5, seed=0):
    """All protocols; returns a flat dict of scores (accuracies in `[0, 1]`)."""
    results = {
        "knn_top1": knn_accuracy(train_features, train_labels, test_features, test_labels, knn_k),
        "linear_top1": linear_probe(train_features, train_labels, test_features, test_labels),
    }
    for k, accuracy in low_shot_svm(train_features, train_labels, test_features, test_labels,
                                    shots, draws, seed).items():
        results[f"svm_{k}shot"] = accuracy
    results.update(clustering_scores(test_features, test_labels, seed))
    return results


class KNNMonitor(keras.callbacks.Callback):
    """Logs weighted kNN top-1 (`val_knn_top1`) of the frozen backbone during training.

    Args:
        train_images, train_labels: the labelled memory bank.
        test_images, test_labels: the images scored.
        every_n_epochs: how often; the last epoch is always scored.
        k, temperature: kNN parameters (InstDisc: 200, 0.1).
    """

    def __init__(self, train_images, train_labels, test_images, test_labels, every_n_epochs=1, k=200,
                 temperature=0.1, image_size=None):
        super().__init__()
        self.train_images, self.train_labels = train_images, train_labels
        self.test_images, self.test_labels = test_images, test_labels
        self.every_n_epochs, self.k, self.temperature = every_n_epochs, k, temperature
        self.image_size = image_size
        self.history = []

    def on_epoch_end(self, epoch, logs=None):
        last = self.params and epoch + 1 == self.params.get("epochs")
        if (epoch + 1) % self.every_n_epochs and not last:
            return
        encoder = self.model.backbone
        accuracy = knn_accuracy(
            extract_features(encoder, self.train_images, image_size=self.image_size), self.train_labels,
            extract_features(encoder, self.test_images, image_size=self.image_size), self.test_labels,
            self.k, self.temperature,
        )
        self.history.append((epoch, accuracy))
        if logs is not None:
            logs["val_knn_top1"] = accuracy


def frequency_groups(train_counts):
    """Head, middle and tail classes by training frequency: the most frequent third, the middle
    and the rarest third (for 10 classes: 3, 4 and 3), ties broken by class id.

    Returns:
        `{"head": [...], "middle": [...], "tail": [...]}` class ids.
    """
    counts = np.asarray(train_counts)
    order = sorted(range(len(counts)), key=lambda c: (-counts[c], c))
    third = len(order) // 3
    return {"head": sorted(order[:third]), "middle": sorted(order[third:len(order) - third]),
            "tail": sorted(order[len(order) - third:])}


def long_tail_report(predicted, test_labels, train_counts):
    """Top-1 on a (balanced) test split overall, per class, and for the head / middle / tail
    classes of the training split (`frequency_groups`); a group's accuracy is the mean of
    its classes' accuracies.

    Returns:
        `{"top1", "head_top1", "middle_top1", "tail_top1", "per_class_top1": [C]}`.
    """
    predicted, test_labels = np.asarray(predicted), np.asarray(test_labels)
    num_classes = len(train_counts)
    per_class = [float((predicted[test_labels == c] == c).mean()) if (test_labels == c).any() else float("nan")
                 for c in range(num_classes)]
    report = {"top1": float((predicted == test_labels).mean()), "per_class_top1": per_class}
    for name, classes in frequency_groups(train_counts).items():
        report[f"{name}_top1"] = float(np.nanmean([per_class[c] for c in classes]))
    return report


def balanced_linear_classifier(train_features, train_labels, test_features, class_counts, epochs=100,
                               learning_rate=0.01, seed=0):
    """A linear classifier on frozen features trained with the balanced softmax (cross-entropy on
    `logits + log prior`, prior = `class_counts / sum`); returns its test predictions from the
    plain logits. SupCon's second stage on long-tailed labels.

    Full-batch Adam on standardised features, `epochs` steps.
    """
    import keras
    import tensorflow as tf

    scaler = StandardScaler().fit(train_features)
    x = tf.constant(scaler.transform(train_features), tf.float32)
    y = tf.constant(np.asarray(train_labels), tf.int32)
    counts = np.asarray(class_counts, np.float64)
    log_prior = tf.constant(np.log(counts / counts.sum() + 1e-9), tf.float32)
    keras.utils.set_random_seed(seed)
    layer = keras.layers.Dense(len(counts), dtype="float32")
    layer.build((None, x.shape[1]))
    optimizer = keras.optimizers.Adam(learning_rate)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, layer(x) + log_prior))
        optimizer.apply(tape.gradient(loss, layer.trainable_variables), layer.trainable_variables)
        return loss

    for _ in range(epochs):
        step()
    logits = layer(tf.constant(scaler.transform(test_features), tf.float32))
    return np.asarray(tf.argmax(logits, axis=1))
