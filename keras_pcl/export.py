"""SavedModel export for serving: preprocessing inside, one signature per endpoint the model declares.

    export_saved_model(model, "out/saved_model")
    served = tf.saved_model.load("out/saved_model")
    served.embed(images)    # every method: {"features": [B, D]}, L2-normalised backbone features
    served.assign(images)   # models with prototypes (PCL): {"prototype": [B, M] int32, "similarity": [B, M]}

Images are uint8 `[B, H, W, C]` in `[0, 255]`, any size: they are resized to
the encoder's input size inside the graph. The endpoints are the model's
`serving_endpoints()`: `embed` for all; `assign` for a model with a
`prototype_space()` gives, per set of prototypes, the nearest prototype of
the embedding and its cosine similarity (for PCL, the momentum encoder's
embedding, the one its prototypes were clustered with).
"""

import os
import shutil
import tempfile

import keras
import tensorflow as tf


def _preprocess(images, height, width):
    images = tf.cast(images, tf.float32) / 255.0
    return tf.image.resize(images, [height, width])


def _with_preprocessing(endpoint, height, width):
    def serve(images):
        return endpoint(_preprocess(images, height, width))

    return serve


def export_saved_model(model, path, overwrite=True):
    """Writes `model` as a SavedModel at `path`, atomically.

    The archive is written to a temporary sibling folder and renamed into
    place, so `path` never holds a half-written export; an existing export
    is replaced only once the new one is complete.

    Args:
        model: a `keras_pcl.models.ContrastiveModel` (any method).
        path: target folder.
        overwrite: replace an existing folder at `path`.

    Returns:
        `path`.
    """
    path = os.path.abspath(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it.")
    height, width, channels = model.backbone.input_shape[1:]
    signature = tf.TensorSpec([None, None, None, channels], tf.uint8, name="images")
    archive = keras.export.ExportArchive()
    archive.track(model)

    # Each endpoint the model declares, behind the same preprocessing; `serve` is `embed`.
    endpoints = model.serving_endpoints()
    for name, endpoint in list(endpoints.items()) + [("serve", endpoints["embed"])]:
        archive.add_endpoint(name, _with_preprocessing(endpoint, height, width), input_signature=[signature])
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    # Staging folders left by an export that was killed: ours by their prefix, never complete.
    for name in os.listdir(parent):
        if name.startswith((".export-", ".old-")):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
    staging = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        archive.write_out(staging, verbose=False)
        replace_directory(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def replace_directory(source, target):
    """Moves folder `source` to `target`, replacing it with two renames (never half-written)."""
    backup = None
    if os.path.exists(target):
        backup = tempfile.mkdtemp(prefix=".old-", dir=os.path.dirname(target))
        os.rmdir(backup)
        os.rename(target, backup)
    os.rename(source, target)
    if backup:
        shutil.rmtree(backup, ignore_errors=True)
