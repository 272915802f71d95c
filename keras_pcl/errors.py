"""The exceptions keras_pcl raises for input a user can fix, and for outputs it cannot write.

Constructors, data helpers and callbacks raise `InvalidInputError` (a
`ValueError`) when an argument, an array or a dataset is wrong in a way the
caller can fix; the message is one line that says what is wrong and how to
fix it. `experiments/run.py` prints such errors as one line with exit status
2. Any other exception is a bug or an environment failure and keeps its
traceback.
"""


import contextlib
import sys


class InvalidInputError(ValueError):
    """An argument, array or dataset a user can fix; the message says how."""

    # Exception's own constructor: AutoGraph re-raises an error from inside a
    # tf.function as its own type only for such classes (else as StagingError).
    __init__ = Exception.__init__


class OutputWriteError(OSError):
    """An output file or folder could not be written (disk full, read-only, quota).

    `path` is what was being written, `reason` the system's words. Nothing
    complete is lost: checkpoints become current only once whole, and the other
    outputs are written under a temporary name and renamed.
    """

    def __init__(self, path, reason):
        super().__init__(f"could not write {path}: {reason}")
        self.path, self.reason = path, reason


_WRITE_REASONS = ("No space left on device", "Read-only file system", "Permission denied", "Disk quota exceeded")


def _write_failure(error):
    """The system's reason when `error` is a failed write (an OSError, or TensorFlow's error for one), else None."""
    tf = sys.modules.get("tensorflow")
    if not isinstance(error, OSError) and not (tf is not None and isinstance(error, tf.errors.OpError)):
        return None
    text = getattr(error, "strerror", None) or getattr(error, "message", None) or str(error)
    for known in _WRITE_REASONS:
        if known in text:
            return known
    if isinstance(error, OSError):
        return text.strip().splitlines()[-1][:200] if text.strip() else type(error).__name__
    return None  # a TensorFlow error that does not say it failed to write: not ours to rename


@contextlib.contextmanager
def writing(path):
    """Turns a failure to write `path` (an `OSError`, or TensorFlow's error for a full disk, a
    read-only file system, ...) into one `OutputWriteError` naming it."""
    try:
        yield
    except OutputWriteError:
        raise
    except Exception as error:
        reason = _write_failure(error)
        if reason is None:
            raise
        raise OutputWriteError(path, reason) from None


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


def check_unit_interval(name, value):
    """`float(value)`, or a one-line `InvalidInputError` unless `0 <= value <= 1` (probabilities, pixel levels)."""
    if value is None or isinstance(value, bool) or not 0.0 <= float(value) <= 1.0:
        raise InvalidInputError(f"{name} must be in [0, 1], got {value}.")
    return float(value)


def check_count(name, value, minimum=1):
    """`int(value)`, or a one-line `InvalidInputError` unless it is an integer >= `minimum`."""
    if value is None or isinstance(value, bool) or not float(value).is_integer() or value < minimum:
        raise InvalidInputError(f"{name} must be an integer >= {minimum}, got {value}.")
    return int(value)
