"""Pictures of a run: prototype gallery, embedding scatter, training curves (PNG files).

Every function writes its figure to a temporary name and renames it into
place, so a crash never leaves a half-written PNG.
"""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(figure, path):
    from keras_pcl.errors import writing

    temporary = path + ".tmp.png"
    with writing(path):
        try:
            figure.savefig(temporary, dpi=110, bbox_inches="tight")
            os.replace(temporary, path)
        finally:
            plt.close(figure)
            if os.path.exists(temporary):
                os.remove(temporary)
    return path


def _show(axis, image):
    image = np.asarray(image)
    if image.shape[-1] == 1:
        axis.imshow(image[..., 0], cmap="gray", vmin=0, vmax=255 if image.dtype == np.uint8 else 1)
    else:
        axis.imshow(image)
    axis.set_xticks([])
    axis.set_yticks([])


def prototype_gallery(images, features, prototypes, assignments, path, prototypes_per_row=6,
                      images_per_prototype=8, title=None):
    """For the largest clusters of one granularity, the training images nearest their prototype.

    Args:
        images: `[N, H, W, C]` training images.
        features: `[N, d]` L2-normalised momentum-encoder features.
        prototypes: `[K, d]` L2-normalised prototypes.
        assignments: `[N]` cluster of each image.
        path: PNG file to write.
    """
    sizes = np.bincount(assignments, minlength=len(prototypes))
    shown = np.argsort(-sizes)[:prototypes_per_row]
    figure, axes = plt.subplots(len(shown), images_per_prototype,
                                figsize=(1.1 * images_per_prototype, 1.2 * len(shown)), squeeze=False)
    for row, prototype in enumerate(shown):
        similarity = features @ prototypes[prototype]
        nearest = np.argsort(-similarity)[:images_per_prototype]
        for column in range(images_per_prototype):
            axis = axes[row, column]
            if column < len(nearest):
                _show(axis, images[nearest[column]])
            else:
                axis.axis("off")
        axes[row, 0].set_ylabel(f"#{prototype}\n{sizes[prototype]} img", fontsize=7)
    figure.suptitle(title or f"Nearest images to the {len(shown)} largest of {len(prototypes)} prototypes",
                    fontsize=9)
    return _save(figure, path)


def embedding_scatter(features, labels, path, max_points=2000, seed=0, title="t-SNE of the features"):
    """2-D t-SNE of the features, coloured by label when labels exist."""
    from sklearn.manifold import TSNE

    rng = np.random.default_rng(seed)
    chosen = rng.permutation(len(features))[:max_points]
    points = TSNE(2, init="pca", random_state=seed, perplexity=min(30, len(chosen) - 1)).fit_transform(
        np.asarray(features)[chosen])
    figure, axis = plt.subplots(figsize=(5.5, 5))
    colours = None if labels is None else np.asarray(labels)[chosen]
    scatter = axis.scatter(points[:, 0], points[:, 1], c=colours, s=4, cmap="tab10")
    if colours is not None:
        axis.legend(*scatter.legend_elements(), fontsize=6, loc="best", markerscale=0.7)
    axis.set_title(title, fontsize=9)
    axis.set_xticks([])
    axis.set_yticks([])
    return _save(figure, path)


def training_curves(history, path, keys=None):
    """One panel per logged quantity present in `history` (a Keras History dict).

    `keys`: the quantities to draw, in order (the runner passes the model's
    declared loss terms and metrics, the kNN monitor and the learning rate);
    None draws every key of `history` but `epoch`.

    `history["epoch"]`, when present, gives the x values; None entries (epochs
    where a quantity was not measured) are skipped.
    """
    keys = [k for k in history if k != "epoch"] if keys is None else keys
    present = [k for k in keys if k in history and any(v is not None for v in history[k])]
    figure, axes = plt.subplots(1, max(1, len(present)), figsize=(3.2 * max(1, len(present)), 2.8),
                                squeeze=False)
    for axis, key in zip(axes[0], present):
        values = np.array([np.nan if v is None else v for v in history[key]], float)
        epochs = np.asarray(history.get("epoch") or np.arange(1, len(values) + 1))
        measured = ~np.isnan(values)
        axis.plot(epochs[measured], values[measured], marker="o", markersize=3)
        axis.set_title(key, fontsize=9)
        axis.set_xlabel("epoch", fontsize=8)
        axis.tick_params(labelsize=7)
    return _save(figure, path)
