"""Pretrain a method (PCL, MoCo, SimCLR, BYOL, SimSiam, SwAV, SupCon, PaCo, supervised), evaluate, export.

    python experiments/run.py                       # PCL on the embedded digits, about a minute
    python experiments/run.py --flagfile=experiments/configs/quickstart.cfg --method=byol
    python experiments/run.py --flagfile=experiments/configs/pcl_v2_fashion_mnist.cfg --epochs=5

The output directory receives config.json, checkpoints/, logs/ (TensorBoard),
history.json, results.json, model.keras, saved_model/ and *.png. Re-running
the same command with the same --output_dir resumes from the newest
checkpoint. User mistakes print one line and exit with status 2; a diverged loss
exits 3, an output that cannot be written (disk full) 4, an interruption (SIGINT,
SIGTERM; training checkpoints the step first) 128 + the signal: 130 or 143.

This file only wires flags to keras_pcl; the algorithm lives in the library.
"""

import json
import os
import sys
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import runner_methods  # noqa: E402  (defines the method flags)
from runner_methods import CHECKS, METHOD_FLAGS, REGISTRY, UsageError  # noqa: E402

FLAGS = flags.FLAGS
_FLAGS_BEFORE = set(FLAGS)
PER_METHOD = " (default: per method, see --method)"

# What to train.
flags.DEFINE_enum("method", "pcl", sorted(REGISTRY), "Method: " + ", ".join(sorted(REGISTRY)) + ".")
flags.DEFINE_string("dataset", "digits",
                    "digits | fashion_mnist | cifar10 | cifar100 | folder:PATH | npz:PATH | tfds:NAME.")
flags.DEFINE_enum("encoder", "small_cnn", ["small_cnn", "small_resnet", "resnet18", "resnet50"], "Backbone.")
flags.DEFINE_integer("width", 0, "Backbone base width (0: the backbone's default).")
flags.DEFINE_enum("norm", None, ["split", "batch", "sync_batch", "none"],
                  "Normalisation: split BatchNorm (the shuffle-BN replacement), batch, sync_batch, none" + PER_METHOD)
flags.DEFINE_integer("num_splits", 4, "Sub-batches of split BatchNorm.")
flags.DEFINE_boolean("small_images", True, "CIFAR-style stem for resnet18/50 (3x3 conv, no max-pool).")
flags.DEFINE_integer("embedding_dim", None, "Output width of the projection head" + PER_METHOD)
flags.DEFINE_integer("hidden_dim", None, "Hidden width of the projection head" + PER_METHOD)
flags.DEFINE_enum("head_init", "keras", ["keras", "torch"],
                  "Heads' Dense initialisation: Keras' (Glorot uniform, zero bias) or torch.nn.Linear's (kernel and "
                  "bias uniform in +-1/sqrt(fan_in), as the PyTorch reference codes and lightly).")
flags.DEFINE_integer("holdout", 0,
                     "Evaluate on this many training images held out of training, not on the test split "
                     "(for tuning; 0: the test split).")
flags.DEFINE_integer("image_size", 0, "Training/eval image side (0: the dataset's own; folders: 32).")
flags.DEFINE_float("long_tail_imbalance", 0, "Train on a long-tailed split of the labelled training images: class c "
                   "keeps n_max * R^(-c/(C-1)) (R: this ratio, largest over smallest class; 0: the whole split). "
                   "The test split stays balanced.")

# How to train.
flags.DEFINE_integer("batch_size", 128, "Global batch size.")
flags.DEFINE_integer("epochs", 40, "Epochs.")
flags.DEFINE_integer("steps_per_epoch", 0, "Cap on steps per epoch for quick runs (0: whole epochs).")
flags.DEFINE_enum("optimizer", None, ["sgd", "lars"], "Optimizer: SGD with momentum, or LARS" + PER_METHOD)
flags.DEFINE_float("learning_rate", None, "Peak learning rate" + PER_METHOD)
flags.DEFINE_float("sgd_momentum", 0.9, "Momentum of SGD and LARS.")
flags.DEFINE_float("weight_decay", None, "Weight decay (SGD: decoupled, Keras'; LARS: added to the gradient)"
                   + PER_METHOD)
flags.DEFINE_float("lars_trust_coefficient", 0.001, "LARS trust coefficient eta.")
flags.DEFINE_float("lars_epsilon", 1e-8, "LARS epsilon in the trust ratio's denominator.")
flags.DEFINE_enum("schedule", "cosine", ["cosine", "step", "constant"], "Learning-rate schedule.")
flags.DEFINE_list("lr_drops", ["120", "160"], "Epochs at which the step schedule multiplies the rate by 0.1.")
flags.DEFINE_integer("lr_warmup_epochs", None, "Linear learning-rate warm-up epochs" + PER_METHOD)
flags.DEFINE_enum("augmentation", None, ["pcl_v1", "pcl_v2", "moco_v1", "moco_v2", "simclr", "byol", "paco", "crop_flip"],
                  "Augmentation preset (byol, paco: a different augmentation per view)" + PER_METHOD)
flags.DEFINE_list("crop_scale", ["0.5", "1.0"], "RandomResizedCrop area range.")
flags.DEFINE_enum("brightness_mode", "add", ["add", "multiply"],
                  "Colour jitter's brightness: add an offset from U(-b, b) (the SimCLR and BYOL papers) or multiply "
                  "by U(1 - b, 1 + b) (torchvision's ColorJitter, so lightly's and solo-learn's).")
flags.DEFINE_enum("jitter_order", "fixed", ["fixed", "random"],
                  "Colour jitter's order: brightness, contrast, saturation, hue (fixed) or a permutation drawn per "
                  "image (random: torchvision's ColorJitter and the SimCLR and BYOL code).")
flags.DEFINE_enum("mixed_precision", "float32", ["float32", "mixed_bfloat16"], "Compute precision.")
flags.DEFINE_enum("jit_compile", "auto", ["auto", "true", "false"],
                  "XLA for the train step and E-step: auto = on GPU/TPU, and on CPU for E-step "
                  "granularities with K <= 128 over >= 20 000 images.")
flags.DEFINE_enum("distribution", "default", ["default", "mirrored"],
                  "default (one device) or mirrored (tf.distribute.MirroredStrategy over visible devices).")
flags.DEFINE_integer("seed", 0, "Random seed.")

# Outputs.
flags.DEFINE_string("output_dir", "runs/{method}", "Where everything is written ({method}: the method's name).")
flags.DEFINE_boolean("overwrite", False, "Start afresh in an output_dir that holds a different run.")
flags.DEFINE_integer("checkpoint_every_steps", 0, "Also checkpoint every N steps (0: each epoch).")
flags.DEFINE_integer("knn_every", 1, "kNN monitor every N epochs (0: off).")
flags.DEFINE_integer("knn_k", 200, "Neighbours of the weighted kNN.")
flags.DEFINE_integer("low_shot_draws", 5, "Draws per shot count of the low-shot SVM.")
flags.DEFINE_boolean("raw_pixels", True, "Also evaluate raw pixels as a baseline beside the encoder.")
flags.DEFINE_boolean("export", True, "Write the SavedModel and model.keras.")
flags.DEFINE_boolean("plots", True, "Write the PNG pictures.")
flags.DEFINE_boolean("debug", False, "Show full tracebacks instead of one-line errors.")

COMMON_FLAGS = sorted(set(FLAGS) - _FLAGS_BEFORE)

# Defaults of the common flags whose absl default is None, where a method does not set its own.
# Like every default here they suit the embedded data (8x8 digits): a bare run is the quickstart.
COMMON_DEFAULTS = dict(norm="split", embedding_dim=64, hidden_dim=256, optimizer="sgd", learning_rate=0.06,
                       weight_decay=5e-4, lr_warmup_epochs=0, augmentation="pcl_v2")

# Flags that do not change what a run computes: they may differ on resume.
RESUMABLE = {"epochs", "output_dir", "overwrite", "debug", "plots", "export", "knn_every", "low_shot_draws",
             "checkpoint_every_steps", "steps_per_epoch", "raw_pixels"}

# Flags added with a default that differs from what runs started before them did: such a run's
# config.json lacks the flag and is compared as what it ran (a biased-Dense SimCLR projector).
FORMER_DEFAULTS = {"projector_output_norm": "none"}

COMMON_CHECKS = {"batch_size": runner_methods.at_least_one,
                 "long_tail_imbalance": lambda r: None if r == 0 or r >= 1 else "must be 0 (off) or >= 1", "epochs": runner_methods.at_least_one,
                 "learning_rate": runner_methods.positive, "weight_decay": runner_methods.non_negative,
                 "sgd_momentum": runner_methods.unit_interval, "embedding_dim": runner_methods.at_least_one,
                 "hidden_dim": runner_methods.at_least_one, "lr_warmup_epochs": runner_methods.non_negative,
                 "lars_trust_coefficient": runner_methods.non_negative,
                 "lars_epsilon": runner_methods.non_negative, "num_splits": runner_methods.at_least_one,
                 "steps_per_epoch": runner_methods.non_negative, "checkpoint_every_steps": runner_methods.non_negative}

# Smallest input side each encoder can take (its total downsampling).
MIN_IMAGE_SIZE = {"small_cnn": 2, "small_resnet": 8, "resnet18": 8, "resnet50": 8}


class TrainingDiverged(Exception):
    """The loss became NaN/Inf: printed as one line, exit status 3."""


class RunInterrupted(BaseException):
    """SIGINT/SIGTERM outside training (start-up, evaluation, export): exit 128 + signal.

    A BaseException, as KeyboardInterrupt: no `except Exception` on the way swallows it."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


# Exit statuses: 2 a user mistake, 3 a diverged loss, 4 an output that could not be written,
# 128 + signal when interrupted (130 SIGINT, 143 SIGTERM).
EXIT_USAGE, EXIT_DIVERGED, EXIT_WRITE = 2, 3, 4
STAGE = {"now": "start-up"}  # what the run is doing, for the interruption message


def on_signal(signum, frame):
    raise RunInterrupted(signum)


class signals_deferred:
    """SIGINT/SIGTERM inside the block stop the run at its end, not mid-way.

    For TensorFlow's SavedModel writing: an exception raised inside its graph
    building unwinds through scopes that then fail with their own error
    ("Exiting device scope without proper scope nesting"), a traceback in place
    of the interruption's message. The block takes seconds.
    """

    def __enter__(self):
        import signal
        self.pending = []
        self.previous = {signum: signal.signal(signum, lambda signum, frame: self.pending.append(signum))
                         for signum in (signal.SIGINT, signal.SIGTERM)}

    def __exit__(self, *error):
        import signal
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        if self.pending and error[0] is None:
            raise RunInterrupted(self.pending[0])


class OutputLock:
    """One run per output folder: an exclusive `flock` on OUT/.lock, held while the run lives.

    The kernel releases the lock when the process dies, however it dies, so a killed
    run never blocks the next; the file keeps the holder's pid for the messages.
    """

    def __init__(self, out):
        import fcntl

        self.path = os.path.join(out, ".lock")
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            raise UsageError(f"--output_dir {out} is in use by a run that is still going (pid {holder}); "
                             "wait for it to finish, or choose another --output_dir.") from None
        previous = os.pread(self.fd, 32, 0).decode(errors="replace").strip()
        if previous.isdigit() and int(previous) != os.getpid():
            print(f"taking over {self.path} from an earlier run (pid {previous}) that is no longer running")
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)

    def release(self):
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None


class Config(dict):
    """The resolved flags of a run (common flags and the method's), readable as attributes."""

    __getattr__ = dict.__getitem__


def default_config(method):
    """Every flag of `method` at its default: the method's, else the runner's."""
    values = {name: method.common_defaults.get(name, COMMON_DEFAULTS.get(name, FLAGS[name].default))
              for name in COMMON_FLAGS}
    values.update(method.flags)
    return values


def resolve_config():
    """The chosen method's config: each flag as given, else its default. Returns (config, ignored flags)."""
    method = REGISTRY[FLAGS.method]
    defaults = default_config(method)
    config = Config({name: FLAGS[name].value if FLAGS[name].present else default
                     for name, default in defaults.items()})
    # Callable defaults depend on other flags: the common flags' first, then the method's.
    for names in (COMMON_FLAGS, sorted(method.flags)):
        for name in names:
            if callable(config[name]):
                config[name] = config[name](config)
    config["output_dir"] = config["output_dir"].replace("{method}", method.name)
    ignored = sorted(name for name in METHOD_FLAGS if FLAGS[name].present and name not in config)
    return config, ignored


COLOUR_FLAGS = ("brightness_mode", "jitter_order")


def colour_flags_ignored(config):
    """The colour-jitter flags given for a preset without colour jitter."""
    given = [name for name in COLOUR_FLAGS if FLAGS[name].present]
    if not given:
        return []
    from keras_pcl import augment  # here, not at the top: a usage error should not wait for TensorFlow

    return given if config.augmentation in augment.COLOURLESS_PRESETS else []


def check_output_dir(config):
    """Checks output_dir can hold this run; returns (resuming, lock): resuming is True when it
    holds this same run, lock the folder's `OutputLock`, held from here on.

    Nothing is written here but the lock: config.json is written only once every
    input has been validated, so a mistyped command never leaves a run behind.
    """
    out = config.output_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--output_dir {out} is a file; choose a folder path.")
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, ".write_test")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as error:
        raise UsageError(f"--output_dir {out} is not writable ({error.strerror}); choose another folder.") from None
    lock = OutputLock(out)
    try:
        return compare_with_previous_run(config, out), lock
    except BaseException:
        lock.release()
        raise


def compare_with_previous_run(config, out):
    path = os.path.join(out, "config.json")
    if os.path.exists(path) and not config.overwrite:
        with open(path) as f:
            previous = json.load(f)
        # A flag added after the run started counts as its default there (or as what the run did).
        defaults = default_config(REGISTRY[previous.get("method", config.method)])
        former = {k: FORMER_DEFAULTS.get(k, value) for k, value in defaults.items()}
        changed = sorted(k for k in set(previous) | set(config) if k not in RESUMABLE
                         and previous.get(k, former.get(k)) != config.get(k))
        if changed:
            raise UsageError(
                f"--output_dir {out} holds a run with a different config (differs in: {', '.join(changed)}); "
                "use another --output_dir, or pass --overwrite to start afresh there.")
        return True
    return False


def write_json(path, value):
    """Writes `value` to a temporary name, then renames it over `path`: never half a file."""
    from keras_pcl.callbacks import writing

    temporary = path + ".tmp"
    with writing(path):
        try:
            with open(temporary, "w") as f:
                json.dump(value, f, indent=2, sort_keys=True)
            os.replace(temporary, path)
        except BaseException:
            if os.path.exists(temporary):
                os.remove(temporary)
            raise


def validate(config):
    """One-line UsageErrors for flags keras_pcl cannot check itself; returns parsed lists."""
    try:
        crop = tuple(float(v) for v in config.crop_scale)
        drops = tuple(int(v) for v in config.lr_drops)
    except ValueError as error:
        raise UsageError(f"--crop_scale and --lr_drops take comma-separated numbers ({error}).") from None
    if len(crop) != 2:
        raise UsageError(f"--crop_scale takes two numbers MIN,MAX, got {','.join(config.crop_scale)}.")
    for name, check in sorted({**COMMON_CHECKS, **CHECKS}.items()):
        if name in config and config[name] is not None:
            problem = check(config[name])
            if problem:
                shown = ",".join(config[name]) if isinstance(config[name], list) else config[name]
                raise UsageError(f"--{name} {problem}, got {shown}.")
    if config.norm == "split" and config.batch_size % config.num_splits:
        raise UsageError(f"--batch_size {config.batch_size} is not divisible by --num_splits {config.num_splits}; "
                         "change either, or use --norm=batch.")
    return crop, drops


def build_strategy(tf, config):
    if config.distribution == "mirrored":
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def learning_rate_schedule(keras, config, steps_per_epoch, drops):
    total = config.epochs * steps_per_epoch
    warmup = config.lr_warmup_epochs * steps_per_epoch
    peak = config.learning_rate
    if config.schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(
            0.0 if warmup else peak, max(1, total - warmup), warmup_target=peak if warmup else None,
            warmup_steps=warmup)
    if config.schedule == "step":
        boundaries = [d * steps_per_epoch for d in drops if d < config.epochs]
        return keras.optimizers.schedules.PiecewiseConstantDecay(
            boundaries, [peak * 0.1 ** i for i in range(len(boundaries) + 1)]) if boundaries else peak
    return peak


def build_optimizer(keras, keras_pcl, config, schedule):
    if config.optimizer == "lars":
        return keras_pcl.optimizers.LARS(schedule, momentum=config.sgd_momentum, weight_decay=config.weight_decay,
                                         trust_coefficient=config.lars_trust_coefficient,
                                         epsilon=config.lars_epsilon)
    return keras.optimizers.SGD(schedule, momentum=config.sgd_momentum, weight_decay=config.weight_decay)


def build_backbone(config, split, image_size):
    from keras_pcl import backbones

    shape = (image_size, image_size, split.image_shape[-1])
    options = dict(norm=config.norm, num_splits=config.num_splits)
    if config.width:
        options["width"] = config.width
    if config.encoder in ("resnet18", "resnet50"):
        options["small_images"] = config.small_images
    return backbones.BACKBONES[config.encoder](shape, **options)


def classification_results(keras_pcl, config, model, split, feature_sets, image_size):
    """Top-1 overall, per class and for the head / middle / tail classes of the training split, from
    the model's classifier (plain logits, no prior), or, without one on long-tailed data, from a
    balanced-softmax linear classifier on the frozen features. None when neither applies.

    A model with a classifier trained on long-tailed data also gets that linear classifier on its
    frozen features (`frozen_features`): where the two differ, the model's classifier, not its
    features, is what its top-1 measures."""
    from keras_pcl import evaluation

    counts = runner_methods.class_counts(keras_pcl, split)

    def frozen_features_classifier():
        train_features, test_features = feature_sets["encoder"]
        predicted = evaluation.balanced_linear_classifier(train_features, split.train_labels, test_features, counts)
        return evaluation.long_tail_report(predicted, split.test_labels, counts)

    def show(source, report):
        print(f"classification ({source}): top-1 {100 * report['top1']:.1f} %, head {100 * report['head_top1']:.1f}, "
              f"middle {100 * report['middle_top1']:.1f}, tail {100 * report['tail_top1']:.1f}")

    probe_source = "a balanced-softmax linear classifier on the frozen features"
    if model.has_classifier:
        images = keras_pcl.data.eval_dataset(split.test_images, 512, image_size).map(lambda x, index: x)
        logits = np.concatenate([model.class_logits(batch, training=False).numpy() for batch in images])
        report = evaluation.long_tail_report(logits.argmax(1), split.test_labels, counts)
        source = "the model's classifier"
        if config.long_tail_imbalance:
            report["frozen_features"] = frozen_features_classifier()
            show(probe_source, report["frozen_features"])
    elif config.long_tail_imbalance:
        report, source = frozen_features_classifier(), probe_source
    else:
        return None
    report.update(classifier=source, train_class_counts=counts)
    show(source, report)
    return report


def format_table(rows):
    columns = ["knn_top1", "linear_top1"] + sorted(
        {k for r in rows.values() for k in r if k.startswith("svm_")}, key=lambda k: int(k[4:-4])) + [
        "ami", "nmi", "ari"]
    header = f"{'features':<12}" + "".join(f"{c.replace('_top1', '').replace('svm_', ''):>9}" for c in columns)
    lines = [header, "-" * len(header)]
    for name, result in rows.items():
        cells = "".join(f"{100 * result[c]:>9.1f}" if c in result and not c in ("ami", "nmi", "ari")
                        else f"{result.get(c, float('nan')):>9.3f}" for c in columns)
        lines.append(f"{name:<12}{cells}")
    return "\n".join(lines) + "\n(accuracies in %, low-shot columns are labelled images per class)"


def main(argv):
    if len(argv) > 1:
        raise UsageError(f"unexpected arguments {argv[1:]}; flags look like --name=value.")
    logging.set_verbosity(logging.WARNING)
    config, ignored = resolve_config()
    method = REGISTRY[config.method]
    crop, drops = validate(config)
    if ignored:
        print(f"--method={method.name} does not use " + ", ".join(f"--{name}" for name in ignored) + "; ignored.")
    colourless = colour_flags_ignored(config)
    if colourless:
        print(f"--augmentation={config.augmentation} has no colour jitter; "
              + ", ".join(f"--{name}" for name in colourless) + " ignored.")
    resuming, lock = check_output_dir(config)
    try:
        train_and_evaluate(config, method, crop, drops, resuming)
    finally:
        lock.release()


def train_and_evaluate(config, method, crop, drops, resuming):
    import keras
    import tensorflow as tf

    import keras_pcl
    from keras_pcl import augment, callbacks, clustering, data, evaluation, export, plots

    keras.utils.set_random_seed(config.seed)
    if config.mixed_precision != "float32":
        keras.mixed_precision.set_global_policy(config.mixed_precision)
    split = data.load_dataset(config.dataset, image_size=config.image_size or None, seed=config.seed)
    if config.holdout:
        try:
            split = data.holdout_split(split, config.holdout)
        except ValueError as error:
            raise UsageError(f"--holdout: {error}") from None
    if split.has_labels:
        for labels in (split.train_labels, split.test_labels):
            data.check_labels(labels, len(labels))
    if config.long_tail_imbalance:
        try:
            split = data.long_tail_split(split, config.long_tail_imbalance, seed=config.seed)
        except ValueError as error:
            raise UsageError(f"--long_tail_imbalance: {error}") from None
    print(f"dataset {split.name}: {len(split.train_images)} train / {len(split.test_images)} test images "
          f"{split.image_shape}; {split.notes}")
    data.as_image_array(split.train_images)
    image_size = config.image_size or split.image_shape[0]
    num_train = len(split.train_images)
    if split.image_shape[0] != split.image_shape[1]:
        raise UsageError(f"images are {split.image_shape[0]}x{split.image_shape[1]}; pass --image_size to square them.")
    if config.batch_size > num_train:
        raise UsageError(f"--batch_size {config.batch_size} is larger than the dataset ({num_train} "
                         "training images); use a smaller batch size.")
    if keras_pcl.models.METHODS[method.name].uses_labels and not split.has_labels:
        raise UsageError(f"--method={method.name} trains on labels, and dataset {split.name} has none; give a "
                         "labelled source (a folder of class sub-folders, npz with y, ...).")
    method.check(config, split)
    smallest = MIN_IMAGE_SIZE[config.encoder] * (4 if config.encoder.startswith("resnet") and not config.small_images else 1)
    if image_size < smallest:
        raise UsageError(f"--encoder {config.encoder} needs images of at least {smallest} px, got {image_size}; "
                         f"pass --image_size={smallest} or a smaller encoder.")

    strategy = build_strategy(tf, config)
    steps = num_train // config.batch_size
    if config.steps_per_epoch:
        steps = min(steps, config.steps_per_epoch)
    jit = {"auto": "auto", "true": True, "false": False}[config.jit_compile]
    train_jit = clustering.resolve_jit_compile(jit) and strategy.num_replicas_in_sync == 1
    with strategy.scope():
        # Built before anything is written: the constructors' checks are part of validation.
        model = method.build(keras_pcl, config, build_backbone(config, split, image_size), split)
        optimizer = build_optimizer(keras, keras_pcl, config, learning_rate_schedule(keras, config, steps, drops))
        model.compile(optimizer=optimizer, jit_compile=train_jit)
    try:
        model.check_batch_size(config.batch_size)
    except keras_pcl.InvalidInputError as error:
        raise UsageError(f"--batch_size {config.batch_size}: {error}") from None
    views = method.views(augment, config, image_size, split.image_shape[-1], crop)

    out = config.output_dir
    if config.overwrite and os.path.isdir(os.path.join(out, "checkpoints")):
        import shutil

        shutil.rmtree(os.path.join(out, "checkpoints"))
        resuming = False
    write_json(os.path.join(out, "config.json"), config)

    train_eval_ds = data.eval_dataset(split.train_images, 512, image_size)
    checkpoint = callbacks.TrainingCheckpoint(os.path.join(out, "checkpoints"), config.checkpoint_every_steps)
    initial_epoch = checkpoint.restore(model)
    # The checkpoint holds the rows of the epochs it finished: history.json is a copy of them.
    history, history_path = checkpoint.history, os.path.join(out, "history.json")
    if resuming and (initial_epoch or checkpoint.replayed_steps):
        again = (f"; the {checkpoint.replayed_steps} steps of epoch {initial_epoch + 1} done before the stop run again"
                 if checkpoint.replayed_steps else "")
        print(f"resuming {out} at epoch {initial_epoch}{again}")
    # Epoch e's order and augmentations depend only on (seed, e): a resumed run sees the same data.
    train_ds = data.multiview_dataset(split.train_images, views, config.batch_size, seed=config.seed,
                                      epochs=config.epochs, initial_epoch=initial_epoch, steps_per_epoch=steps,
                                      labels=split.train_labels if model.uses_labels else None)
    # The guard runs first, so a step with a NaN/Inf loss is never checkpointed.
    fit_callbacks = [callbacks.NonFiniteLossGuard()]
    fit_callbacks += method.callbacks(keras_pcl, config, train_eval_ds, jit)
    if config.knn_every and split.has_labels:
        fit_callbacks.append(evaluation.KNNMonitor(split.train_images, split.train_labels, split.test_images,
                                                   split.test_labels, config.knn_every, config.knn_k,
                                                   image_size=image_size))

    class LogEpochStats(keras.callbacks.Callback):
        """Puts the learning rate and `epoch_seconds` into the epoch logs (TensorBoard, history.json).

        `epoch_seconds`: wall time from the epoch's start (the E-step included)
        to its last step; the checkpoint and kNN monitor that follow are not in it.
        """

        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.time()

        def on_epoch_end(self, epoch, logs=None):
            if logs is not None:
                # convert_to_tensor, not convert_to_numpy: the latter warns under NumPy 2 for a Variable.
                logs["learning_rate"] = float(keras.ops.convert_to_tensor(self.model.optimizer.learning_rate))
                logs["epoch_seconds"] = time.time() - self.started

    # First, so that its clock starts before the E-step's on_epoch_begin.
    fit_callbacks.insert(0, LogEpochStats())
    class TensorBoard(keras.callbacks.TensorBoard):
        """Keras' TensorBoard, whose write failures (a full disk) name the log folder."""

        def on_train_begin(self, logs=None):
            with callbacks.writing(self.log_dir):
                super().on_train_begin(logs)

        def on_epoch_end(self, epoch, logs=None):
            with callbacks.writing(self.log_dir):
                super().on_epoch_end(epoch, logs)

    class WriteHistory(keras.callbacks.Callback):
        """history.json: after each checkpoint, a copy of the epoch rows it holds."""

        def on_epoch_end(self, epoch, logs=None):
            write_json(history_path, history)

    fit_callbacks.append(TensorBoard(os.path.join(out, "logs"), write_graph=False))
    # Last but the copy: it saves the epoch logs every callback above has written.
    fit_callbacks += [checkpoint, WriteHistory()]
    started = time.time()
    if initial_epoch < config.epochs:
        STAGE["now"] = "training"
        try:
            model.fit(train_ds, epochs=config.epochs, initial_epoch=initial_epoch, steps_per_epoch=steps,
                      callbacks=fit_callbacks,
                      verbose=1 if sys.stdout.isatty() else 2)
        except callbacks.NonFiniteLossError as error:
            raise TrainingDiverged(str(error)) from None
        history = checkpoint.history
    write_json(history_path, history)
    train_seconds = time.time() - started

    # Evaluation of the frozen backbone, beside raw pixels.
    STAGE["now"] = "evaluation"
    print("evaluating the frozen encoder and raw pixels")
    rows = {}
    if split.has_labels:
        feature_sets = {"encoder": [evaluation.extract_features(model.backbone, x, image_size=image_size)
                                    for x in (split.train_images, split.test_images)]}
        if config.raw_pixels:
            feature_sets["raw_pixels"] = [evaluation.raw_pixel_features(x)
                                          for x in (split.train_images, split.test_images)]
        for name, (train_f, test_f) in feature_sets.items():
            rows[name] = evaluation.evaluate_features(train_f, split.train_labels, test_f, split.test_labels,
                                                      knn_k=config.knn_k, draws=config.low_shot_draws,
                                                      seed=config.seed)
        print(format_table(rows))
    classification = classification_results(keras_pcl, config, model, split, feature_sets, image_size) \
        if split.has_labels else None
    results = {"dataset": split.name, "holdout": config.holdout, "method": config.method, "epochs": config.epochs,
               "train_seconds_this_invocation": round(train_seconds, 1),
               # Over every invocation of a resumed run (history.json keeps each epoch's time).
               "train_seconds": round(sum(t for t in history.get("epoch_seconds", []) if t is not None), 1),
               "evaluation": rows,
               "final_logs": {k: v[-1] for k, v in history.items() if v and k != "epoch"}}
    if classification:
        results["classification"] = classification
    if model.collapse_monitors:
        results["collapse_monitors"] = collapse_report(history, model.collapse_monitors)
    results.update(method.results(keras_pcl, fit_callbacks))
    write_json(os.path.join(out, "results.json"), results)

    if config.export:
        STAGE["now"] = "export"
        with signals_deferred(), callbacks.writing(os.path.join(out, "saved_model")):
            export.export_saved_model(model, os.path.join(out, "saved_model"))
        temporary = os.path.join(out, "model.tmp.keras")
        with signals_deferred(), callbacks.writing(os.path.join(out, "model.keras")):
            try:
                model.save(temporary)
                os.replace(temporary, os.path.join(out, "model.keras"))
            finally:
                if os.path.exists(temporary):
                    os.remove(temporary)
    if config.plots:
        STAGE["now"] = "plots"
        # The model's own loss terms and metrics, then what the runner adds.
        terms = list(model.loss_names) if len(model.loss_names) == 1 and not model.term_weights else \
            ["loss", *model.loss_names]  # one unweighted term is the loss itself: one panel
        curves = [*terms, *model.metric_names, "val_knn_top1", "learning_rate"]
        plots.training_curves(history, os.path.join(out, "curves.png"), keys=curves)
        if split.has_labels:
            plots.embedding_scatter(feature_sets["encoder"][1], split.test_labels, os.path.join(out, "tsne.png"))
        space = model.prototype_space()
        if space is not None and space.ready():
            embed_step = callbacks.embedding_step(space.embed)
            embeddings = callbacks.embed_dataset(space.embed, train_eval_ds, num_train, step=embed_step).numpy()
            for m, prototypes in enumerate(space.prototypes()):
                prototypes = prototypes.numpy()
                nearest = (embeddings @ prototypes.T).argmax(1)
                plots.prototype_gallery(split.train_images, embeddings, prototypes, nearest,
                                        os.path.join(out, f"prototypes_k{len(prototypes)}.png"))
    print(f"done: results in {os.path.join(out, 'results.json')}")


def _user_errors():
    """Exception types that are user mistakes. keras_pcl's own is known only once keras_pcl is imported
    (importing it here would import TensorFlow before a flag mistake is reported)."""
    errors = sys.modules.get("keras_pcl.errors")
    return (UsageError, FileNotFoundError, NotADirectoryError, ImportError) + (
        (errors.InvalidInputError,) if errors else ())


def collapse_report(history, names):
    """Per monitor the model declares: the last epoch's value and the lowest one (collapse shows as a fall
    that may recover by the end, so the last value alone can hide it)."""
    report = {}
    for name in names:
        epochs = [(value, epoch) for epoch, value in enumerate(history.get(name, []), 1) if value is not None]
        if epochs:
            lowest, at = min(epochs)
            report[name] = {"last": epochs[-1][0], "lowest": lowest, "lowest_epoch": at}
    return report


def user_message(error):
    """The one line a user mistake prints: the error's first line, and for a module this Python lacks, how
    to install it (keras_pcl's own ImportErrors already say which extra; they carry no module name)."""
    message = str(error).splitlines()[0] if str(error) else type(error).__name__
    if isinstance(error, ModuleNotFoundError) and error.name:
        message += (f" in {sys.executable}: run `pip install -e .` in the keras_pcl repository with this "
                    "Python (it installs keras_pcl and what it needs)")
    return message


def run(argv):
    import signal

    STAGE["now"] = "start-up"
    # Outside training, SIGINT and SIGTERM stop the run with a message (inside it,
    # TrainingCheckpoint checkpoints the step first); the previous handlers come back after.
    previous = {signum: signal.signal(signum, on_signal) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        main(argv)
    except TrainingDiverged as error:  # not a usage mistake: its own status
        if FLAGS.debug:
            raise
        stop(str(error), EXIT_DIVERGED)
    except RunInterrupted as interrupt:
        stop(f"interrupted during {STAGE['now']}; run the same command to resume (training resumes from its "
             "newest checkpoint)", 128 + interrupt.signum)
    except KeyboardInterrupt:  # a second Ctrl-C during training: no checkpoint of the moment
        stop("aborted; run the same command to resume from the newest checkpoint", 128 + signal.SIGINT)
    # User mistakes only: anything else is a bug or an environment failure and keeps its traceback.
    except Exception as error:
        if FLAGS.debug:
            raise
        interrupted = sys.modules.get("keras_pcl.callbacks")
        if interrupted is not None and isinstance(error, interrupted.TrainingInterrupted):
            stop(str(error), 128 + error.signum)
        errors = sys.modules.get("keras_pcl.errors")
        if errors is not None and isinstance(error, errors.OutputWriteError):
            stop(f"{error}; free space (or make the folder writable) and run the same command to resume",
                 EXIT_WRITE)
        if not isinstance(error, _user_errors()):
            raise
        fail(user_message(error))
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def stop(message, status):
    print(f"run.py: error: {message}", file=sys.stderr)
    sys.exit(status)


def fail(message):
    stop(message, EXIT_USAGE)


def parse_argv(argv):
    """absl's parser, but a bad flag or flagfile is a one-line error with status 2."""
    try:
        return FLAGS(argv)
    except flags.Error as error:
        fail(f"{str(error).splitlines()[0].removeprefix('ERROR:: ')} (see --helpfull)")


def execute(argv):
    """Runs the command line `argv` in this process (tests use it to share one TensorFlow import)."""
    FLAGS.unparse_flags()
    run(parse_argv(["run.py"] + list(argv)))


if __name__ == "__main__":
    app.run(run, flags_parser=parse_argv)
