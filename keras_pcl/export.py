"""SavedModel export for serving: preprocessing inside, `embed` and `assign` signatures.

    export_saved_model(model, "out/saved_model")
    served = tf.saved_model.load("out/saved_model")
    served.embed(images)    # {"features": [B, D]}, L2-normalised backbone features
    served.assign(images)   # PCL only: {"prototype": [B, M] int32, "similarity": [B, M]}

Images are uint8 `[B, H, W, C]` in `[0, 255]`, any size: they are resized to
the encoder's input size inside the graph. `assign` gives, per granularity,
the nearest prototype of the momentum encoder's embedding (the encoder the
prototypes were clustered with) and its cosine similarity.
"""

import os
import shutil
import tempfile

import keras
import tensorflow as tf


def _preprocess(images, height, width):
    images = tf.cast(images, tf.float32) / 255.0
    return tf.image.resize(images, [height, width])


def export_saved_model(model, path, overwrite=True):
    """Writes `model` (MoCo or PCL) as a SavedModel at `path`, atomically.

    The archive is written to a temporary sibling folder and renamed into
    place, so `path` never holds a half-written export; an existing export
    is replaced only once the new one is complete.

    Args:
        model: a `keras_pcl.MoCo` or `keras_pcl.PCL`.
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

    def embed(images):
        features = model.backbone(_preprocess(images, height, width), training=False)
        return {"features": tf.math.l2_normalize(tf.cast(features, tf.float32), axis=1)}

    archive.add_endpoint("embed", embed, input_signature=[signature])
    archive.add_endpoint("serve", embed, input_signature=[signature])
    if hasattr(model, "prototypes"):
        def assign(images):
            keys = model.embed_keys(_preprocess(images, height, width), training=False)
            ids, similarities = [], []
            for prototypes in model.prototypes:
                scores = tf.matmul(keys, tf.cast(prototypes, keys.dtype), transpose_b=True)
                ids.append(tf.argmax(scores, axis=1, output_type=tf.int32))
                similarities.append(tf.reduce_max(scores, axis=1))
            return {"prototype": tf.stack(ids, axis=1), "similarity": tf.stack(similarities, axis=1)}

        archive.add_endpoint("assign", assign, input_signature=[signature])
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
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
