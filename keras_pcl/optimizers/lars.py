"""LARS: layer-wise adaptive rate scaling with momentum, as SimCLR, BYOL and SwAV train."""

import re

import keras
from keras import ops

from keras_pcl.errors import InvalidInputError, check_non_negative


def _norm(x):
    """L2 norm over all of `x`, scaled by its largest entry first: squaring float32 entries
    would overflow above ~1e19 and flush to zero below ~1e-19."""
    x = ops.reshape(x, [-1])
    largest = ops.max(ops.abs(x))
    safe = ops.where(largest > 0, largest, ops.ones_like(largest))
    return largest * ops.sqrt(ops.sum(ops.square(x / safe)))


@keras.saving.register_keras_serializable(package="keras_pcl")
class LARS(keras.optimizers.Optimizer):
    """Momentum SGD whose step for each variable is scaled by a trust ratio.

    For a variable `w` with gradient `g` that is adapted and decayed:

        g <- (g + wd * w) * eta * |w| / (|g| + wd * |w| + epsilon)   (if |w| > 0 and |g| > 0)
        v <- momentum * v + g
        w <- w - learning_rate * v

    with `eta` the trust coefficient and `|.|` the L2 norm over the whole
    variable. Weight decay is added to the gradient before the trust ratio
    (coupled, not Keras' decoupled decay). A variable excluded from
    adaptation and decay gets plain momentum SGD (`v <- m v + g`,
    `w <- w - lr v`).

    Excluded by default: every variable of rank <= 1, i.e. biases and
    BatchNorm's scale and shift (SimCLR's and lightly's choice). Also excluded
    from weight decay: whatever `exclude_from_weight_decay(var_list, var_names)`
    names, as for Keras' own optimizers. Excluded from adaptation: with
    `exclude_from_layer_adaptation=None` the variables excluded from weight
    decay; with a list of patterns, the variables whose path
    (`"layer/kernel"`) matches one of them (`re.search`).

    Args:
        learning_rate: float or `keras.optimizers.schedules` schedule (SimCLR:
            0.3 x batch / 256, with warm-up and cosine decay).
        momentum: in `[0, 1)`.
        weight_decay: coefficient `wd` >= 0 (SimCLR 1e-6).
        trust_coefficient: `eta` >= 0.
        epsilon: >= 0, added to the trust ratio's denominator.
        exclude_from_layer_adaptation: None or a list of regex patterns (see above).
        **kwargs: `keras.optimizers.Optimizer` arguments (`clipnorm`, `name`, ...).

    Example:
    >>> optimizer = LARS(0.3, weight_decay=1e-6)
    >>> optimizer.exclude_from_weight_decay(var_names=["head"])

    Reference: You, Gitman, Ginsburg, "Large Batch Training of Convolutional
    Networks", 2017; Chen et al. (SimCLR), 2020.
    """

    def __init__(self, learning_rate=0.001, momentum=0.9, weight_decay=1e-6, trust_coefficient=0.001,
                 epsilon=1e-8, exclude_from_layer_adaptation=None, name="lars", **kwargs):
        if not 0.0 <= float(momentum) < 1.0:
            raise InvalidInputError(f"LARS momentum must be in [0, 1), got {momentum}.")
        weight_decay = check_non_negative("LARS weight_decay", weight_decay)
        super().__init__(learning_rate=learning_rate, weight_decay=weight_decay, name=name, **kwargs)
        self.momentum = float(momentum)
        self.trust_coefficient = check_non_negative("LARS trust_coefficient", trust_coefficient)
        self.epsilon = check_non_negative("LARS epsilon", epsilon)
        if isinstance(exclude_from_layer_adaptation, str):
            exclude_from_layer_adaptation = [exclude_from_layer_adaptation]
        self.exclude_from_layer_adaptation = (
            None if exclude_from_layer_adaptation is None else list(exclude_from_layer_adaptation))

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self._velocities = [self.add_variable_from_reference(v, name="velocity") for v in variables]
        patterns = (None if self.exclude_from_layer_adaptation is None
                    else [re.compile(p) for p in self.exclude_from_layer_adaptation])
        # Python-level decisions per variable, made once: the step itself has no branches.
        self._decayed, self._adapted = [], []
        for variable in variables:
            decayed = len(variable.shape) > 1 and self._use_weight_decay(variable)
            path = getattr(variable, "path", variable.name)
            adapted = decayed if patterns is None else not any(p.search(path) for p in patterns)
            self._decayed.append(decayed)
            self._adapted.append(adapted)

    def _apply_weight_decay(self, variables):
        """Nothing: LARS adds the decay to the gradient in `update_step` (coupled)."""

    def update_step(self, gradient, variable, learning_rate):
        index = self._get_variable_index(variable)
        learning_rate = ops.cast(learning_rate, variable.dtype)
        gradient = ops.cast(gradient, variable.dtype)
        velocity = self._velocities[index]
        decay = self.weight_decay if self._decayed[index] else 0.0
        update = gradient + decay * variable if decay else gradient
        if self._adapted[index]:
            weight_norm, gradient_norm = _norm(variable), _norm(gradient)
            ratio = self.trust_coefficient * weight_norm / (gradient_norm + decay * weight_norm + self.epsilon)
            usable = ops.logical_and(weight_norm > 0, gradient_norm > 0)
            update = update * ops.where(usable, ratio, ops.ones_like(ratio))
        self.assign(velocity, ops.add(ops.multiply(velocity, self.momentum), update))
        self.assign_sub(variable, ops.multiply(learning_rate, velocity))

    def get_config(self):
        config = super().get_config()
        config.update(momentum=self.momentum, trust_coefficient=self.trust_coefficient, epsilon=self.epsilon,
                      exclude_from_layer_adaptation=self.exclude_from_layer_adaptation)
        return config
