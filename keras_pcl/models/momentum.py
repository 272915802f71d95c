"""Momentum (EMA) encoders: a structural copy, the EMA of declared variable pairs, its schedule.

A method with a momentum encoder (MoCo, PCL, BYOL, PaCo) makes its target
sub-models with `momentum_copy`, returns `(online, target)` pairs from
`ContrastiveModel.momentum_pairs()`, and sets `momentum` (the base value)
and `momentum_schedule`; the base's `train_step` then applies
`target <- m * target + (1 - m) * online` to every pair after each step,
with `m = momentum_at(...)` of the optimizer step.
"""

import math

import keras
import tensorflow as tf

from keras_pcl.distributed import apply_once
from keras_pcl.errors import InvalidInputError
from keras_pcl.hashing import hashed_permutation

SCHEDULES = ("constant", "cosine")


def momentum_copy(model):
    """A structural copy of `model` with the same weight values, for a momentum encoder.

    Its variables are marked non-trainable (updated by EMA, never by the
    optimizer); its layers stay trainable, so BatchNorm still normalises
    with batch statistics in training mode, as MoCo's key encoder and BYOL's
    target network do.
    """
    copy = keras.models.clone_model(model)
    if not copy.built:
        copy.build(model.input_shape if hasattr(model, "input_shape") else None)
    copy.set_weights(model.get_weights())
    for variable in copy.weights:
        variable.trainable = False
    return copy


def ema_pairs(source, target):
    """`(source_variable, target_variable)` for each trainable variable of `source`.

    Non-trainable variables (BatchNorm's moving statistics) are not averaged:
    the target keeps its own, from its own forward passes.
    """
    return [(s, t) for s, t in zip(source.weights, target.weights) if s.trainable]


def check_momentum(momentum, schedule):
    """Validates a momentum base value and schedule name (one-line `InvalidInputError`)."""
    if not 0.0 <= float(momentum) < 1.0:
        raise InvalidInputError(f"momentum must be in [0, 1), got {momentum}.")
    if schedule not in SCHEDULES:
        raise InvalidInputError(f"momentum_schedule must be one of {SCHEDULES}, got {schedule!r}.")


def momentum_at(base, schedule, step, total_steps):
    """The EMA coefficient at `step` of `total_steps`.

    `"constant"`: `base` throughout (MoCo). `"cosine"`: BYOL's
    `1 - (1 - base) * (cos(pi * step / total_steps) + 1) / 2`, from `base` at
    step 0 to 1 at the end. Both are functions of the step alone, so a resumed
    run continues the schedule exactly where it stopped. With `total_steps`
    0 (not known, e.g. a bare `train_step` outside `fit`) the cosine schedule
    stays at `base`.

    Returns:
        float32 scalar tensor.
    """
    base = tf.constant(float(base), tf.float32)
    if schedule == "constant":
        return base
    step = tf.cast(step, tf.float32)
    total = tf.cast(total_steps, tf.float32)
    progress = tf.where(total > 0, tf.minimum(step / tf.maximum(total, 1.0), 1.0), 0.0)
    return 1.0 - (1.0 - base) * (tf.cos(math.pi * progress) + 1.0) / 2.0


def ema_update(pairs, momentum):
    """`target <- momentum * target + (1 - momentum) * online` for each pair, once per global step."""
    apply_once([(target, tf.cast(momentum, target.dtype) * target
                 + tf.cast(1.0 - momentum, target.dtype) * tf.cast(online, target.dtype))
                for online, target in pairs])


def shuffled_call(fn, x, training, step):
    """Runs `fn` on a permuted batch and restores the order.

    With split BatchNorm this is keras_pcl's shuffle-BN for a key encoder: a
    key is normalised with a different sub-batch than its query (see
    keras_pcl.backbones). The permutation is a function of the optimizer step,
    so a resumed run shuffles as the uninterrupted one would, in graph mode and
    under XLA alike.
    """
    permutation = hashed_permutation(tf.shape(x)[0], step)
    y = fn(tf.gather(x, permutation), training=training)
    return tf.gather(y, tf.math.invert_permutation(permutation))


def key_encoder_call(backbone, head, images, training, shuffle, step):
    """`head(backbone(images))` of a momentum (key) encoder; through `shuffled_call` if training with `shuffle`.

    The one key path of the methods with a momentum encoder and shuffled keys
    (MoCo, PCL, PaCo); the caller normalises.
    """
    def encode(x, training):
        return head(backbone(x, training=training), training=training)
    if training and shuffle:
        return shuffled_call(encode, images, training, step)
    return encode(images, training)
