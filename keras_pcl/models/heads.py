"""One configurable MLP, from which every method's projection and prediction heads are made."""

import math

import keras
from keras import layers

from keras_pcl.errors import InvalidInputError

OUTPUT_NORMS = (None, "batch", "batch_no_affine")
INITS = ("keras", "torch")


@keras.saving.register_keras_serializable(package="keras_pcl")
class FanInUniformDense(layers.Dense):
    """A Dense layer initialised as `torch.nn.Linear` is: kernel and bias from
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in being the input width (known at build).

    The heads' `init="torch"`: the initialisation of the PyTorch reference codes the
    methods' recipes were tuned with; its kernel is smaller than Glorot's where the
    layer narrows (a fifth of Glorot's variance at 512 -> 128).

    Example:
    >>> layer = FanInUniformDense(4)
    >>> layer.build((None, 16))
    >>> float(keras.ops.max(keras.ops.abs(layer.kernel))) <= 0.25
    True
    """

    def build(self, input_shape):
        bound = 1.0 / math.sqrt(int(input_shape[-1]))
        self.kernel_initializer = keras.initializers.RandomUniform(-bound, bound)
        self.bias_initializer = keras.initializers.RandomUniform(-bound, bound)
        super().build(input_shape)


def _batch_norm(name, affine=True):
    # Global statistics under a strategy (SimCLR's and BYOL's recipe): the
    # heads' BatchNorm sees the whole batch, so 2 replicas compute what 1 does.
    # PyTorch's momentum and epsilon, as the reference heads use.
    return layers.BatchNormalization(momentum=0.9, epsilon=1e-5, center=affine, scale=affine,
                                     synchronized=True, name=name)


def mlp(output_dim, hidden_dims=(2048,), batch_norm=False, output_norm=None, init="keras", name="mlp"):
    """An MLP head: `Dense -> [BatchNorm] -> ReLU` per hidden layer, then `Dense -> [output norm]`.

    Every method's heads are this function with other arguments:

    | head | call |
    |---|---|
    | MoCo/PCL v1 | `mlp(128, ())` (linear) |
    | MoCo/PCL v2 | `mlp(128, (2048,))` |
    | SimCLR projector | `mlp(128, (2048,), batch_norm=True, output_norm="batch")` |
    | BYOL projector and predictor | `mlp(256, (4096,), batch_norm=True)` |
    | SimSiam projector | `mlp(2048, (2048, 2048), batch_norm=True, output_norm="batch_no_affine")` |
    | SimSiam predictor | `mlp(2048, (512,), batch_norm=True)` |

    A Dense layer followed by BatchNorm has no bias (BatchNorm's shift replaces
    it). BatchNorm here is synchronised across replicas (global statistics).

    Args:
        output_dim: width of the output, >= 1.
        hidden_dims: widths of the hidden layers, each >= 1; `()` makes a linear head.
        batch_norm: BatchNorm after each hidden Dense layer.
        output_norm: None, `"batch"`, or `"batch_no_affine"` (BatchNorm without
            scale and shift on the output, as SimSiam's projector ends).
        init: the Dense layers' initialisation: `"keras"` (Keras' defaults: Glorot
            uniform kernel, zero bias) or `"torch"` (`torch.nn.Linear`'s: kernel and
            bias uniform in +-1/sqrt(fan_in), `FanInUniformDense`), as the PyTorch
            reference codes and lightly initialise their heads.
        name: the model's name.

    Returns:
        A `keras.Sequential` mapping `[B, D]` to `[B, output_dim]`.

    Example:
    >>> head = mlp(64, (256,), batch_norm=True)
    >>> tuple(head(keras.ops.zeros((4, 32))).shape)
    (4, 64)
    """
    hidden_dims = tuple(hidden_dims)
    for width in (output_dim,) + hidden_dims:
        if isinstance(width, bool) or not float(width).is_integer() or width < 1:
            raise InvalidInputError(f"head widths must be integers >= 1, got output_dim={output_dim}, "
                                    f"hidden_dims={hidden_dims}.")
    output_dim, hidden_dims = int(output_dim), tuple(int(w) for w in hidden_dims)
    if output_norm not in OUTPUT_NORMS:
        raise InvalidInputError(f"output_norm must be one of {OUTPUT_NORMS}, got {output_norm!r}.")
    if init not in INITS:
        raise InvalidInputError(f"init must be one of {INITS}, got {init!r}.")
    dense = FanInUniformDense if init == "torch" else layers.Dense
    stack = []
    for i, width in enumerate(hidden_dims, start=1):
        stack.append(dense(width, use_bias=not batch_norm, name=f"fc{i}"))
        if batch_norm:
            stack.append(_batch_norm(f"norm{i}"))
        stack.append(layers.ReLU(name=f"relu{i}"))
    last = len(hidden_dims) + 1
    stack.append(dense(output_dim, use_bias=output_norm is None, name=f"fc{last}"))
    if output_norm is not None:
        stack.append(_batch_norm(f"norm{last}", affine=output_norm == "batch"))
    return keras.Sequential(stack, name=name)
