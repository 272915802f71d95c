"""The exception keras_pcl raises for input a user can fix.

Constructors, data helpers and callbacks raise `InvalidInputError` (a
`ValueError`) when an argument, an array or a dataset is wrong in a way the
caller can fix; the message is one line that says what is wrong and how to
fix it. `experiments/run.py` prints such errors as one line with exit status
2. Any other exception is a bug or an environment failure and keeps its
traceback.
"""


class InvalidInputError(ValueError):
    """An argument, array or dataset a user can fix; the message says how."""

    # Exception's own constructor: AutoGraph re-raises an error from inside a
    # tf.function as its own type only for such classes (else as StagingError).
    __init__ = Exception.__init__


def check_positive(name, value):
    """`float(value)`, or a one-line `InvalidInputError` unless `value > 0` (temperatures, rates)."""
    if value is None or isinstance(value, bool) or not float(value) > 0:
        raise InvalidInputError(f"{name} must be > 0, got {value}.")
    return float(value)


def check_non_negative(name, value):
    """`float(value)`, or a one-line `InvalidInputError` unless `value >= 0` (weights, coefficients)."""
    if value is None or isinstance(value, bool) or not float(value) >= 0:
        raise InvalidInputError(f"{name} must be >= 0, got {value}.")
    return float(value)


def check_count(name, value, minimum=1):
    """`int(value)`, or a one-line `InvalidInputError` unless it is an integer >= `minimum`."""
    if value is None or isinstance(value, bool) or not float(value).is_integer() or value < minimum:
        raise InvalidInputError(f"{name} must be an integer >= {minimum}, got {value}.")
    return int(value)
