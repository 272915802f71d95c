"""Pretrain PCL or MoCo, evaluate the frozen encoder, export it and draw pictures.

    python experiments/run.py --flagfile=experiments/configs/quickstart.cfg
    python experiments/run.py --flagfile=experiments/configs/pcl_v2_fashion_mnist.cfg --epochs=5

The output directory receives config.json, checkpoints/, logs/ (TensorBoard),
history.json, results.json, model.keras, saved_model/ and *.png. Re-running
the same command with the same --output_dir resumes from the newest
checkpoint. User mistakes print one line and exit with status 2.

This file only wires flags to keras_pcl; the algorithm lives in the library.
"""

import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402

FLAGS = flags.FLAGS
_FLAGS_BEFORE = set(FLAGS)

# What to train.
flags.DEFINE_enum("method", "pcl", ["pcl", "moco"], "Method: pcl (MoCo + prototypes) or moco.")
flags.DEFINE_string("dataset", "digits",
                    "digits | fashion_mnist | cifar10 | cifar100 | folder:PATH | npz:PATH | tfds:NAME.")
flags.DEFINE_enum("encoder", "small_cnn", ["small_cnn", "small_resnet", "resnet18", "resnet50"], "Backbone.")
flags.DEFINE_integer("width", 0, "Backbone base width (0: the backbone's default).")
flags.DEFINE_enum("norm", "split", ["split", "batch", "sync_batch", "none"],
                  "Normalisation: split BatchNorm (the shuffle-BN replacement), batch, sync_batch, none.")
flags.DEFINE_integer("num_splits", 8, "Sub-batches of split BatchNorm.")
flags.DEFINE_boolean("small_images", True, "CIFAR-style stem for resnet18/50 (3x3 conv, no max-pool).")
flags.DEFINE_enum("head", "mlp", ["mlp", "linear"], "Projection head: mlp (v2) or linear (v1).")
flags.DEFINE_integer("embedding_dim", 128, "Embedding size.")
flags.DEFINE_integer("hidden_dim", 2048, "Hidden size of the MLP head.")
flags.DEFINE_integer("holdout", 0,
                     "Evaluate on this many training images held out of training, not on the test split "
                     "(for tuning; 0: the test split).")
flags.DEFINE_integer("image_size", 0, "Training/eval image side (0: the dataset's own; folders: 32).")

# How to train.
flags.DEFINE_integer("batch_size", 256, "Global batch size.")
flags.DEFINE_integer("epochs", 200, "Epochs.")
flags.DEFINE_integer("steps_per_epoch", 0, "Cap on steps per epoch for quick runs (0: whole epochs).")
flags.DEFINE_float("learning_rate", 0.03, "Peak SGD learning rate.")
flags.DEFINE_float("sgd_momentum", 0.9, "SGD momentum.")
flags.DEFINE_float("weight_decay", 1e-4, "Weight decay.")
flags.DEFINE_enum("schedule", "cosine", ["cosine", "step", "constant"], "Learning-rate schedule.")
flags.DEFINE_list("lr_drops", ["120", "160"], "Epochs at which the step schedule multiplies the rate by 0.1.")
flags.DEFINE_integer("lr_warmup_epochs", 0, "Linear learning-rate warm-up epochs.")
flags.DEFINE_float("temperature", 0.2,
                   "InfoNCE temperature (and the mean of phi, unless --prototype_temperature is set).")
flags.DEFINE_float("momentum", 0.999, "Momentum (EMA) of the key encoder, in [0, 1).")
flags.DEFINE_integer("queue_size", 16384, "Negative keys in the queue; a multiple of the batch size.")
flags.DEFINE_boolean("symmetric", False,
                     "Use both views as queries, for InfoNCE and (PCL) ProtoNCE; about twice the step cost.")
flags.DEFINE_list("num_clusters", ["25000", "50000", "100000"], "PCL: clusters per granularity.")
flags.DEFINE_integer("warmup_epochs", 20, "PCL: epochs of InfoNCE only before the first E-step.")
flags.DEFINE_float("prototype_temperature", 0.0,
                   "PCL: the mean of phi, ProtoNCE's temperature (0: the same as --temperature, as the reference).")
flags.DEFINE_float("prototype_weight", 1.0, "PCL: weight of ProtoNCE against InfoNCE (the reference: 1).")
flags.DEFINE_integer("num_negative_prototypes", 0, "PCL: sampled negatives per step (0: exact softmax).")
flags.DEFINE_boolean("feature_bank", False,
                     "PCL: after the first E-step, cluster a bank of each image's latest training key "
                     "instead of re-embedding the dataset (E-step costs k-means only).")
flags.DEFINE_integer("estep_every", 1, "PCL: run the E-step every this many epochs.")
flags.DEFINE_integer("kmeans_iters", 20, "PCL: k-means iterations (upper bound; stops early).")
flags.DEFINE_integer("kmeans_restarts", 1, "PCL: k-means restarts.")
flags.DEFINE_enum("augmentation", "pcl_v2", ["pcl_v1", "pcl_v2", "moco_v1", "moco_v2"], "Augmentation preset.")
flags.DEFINE_list("crop_scale", ["0.2", "1.0"], "RandomResizedCrop area range.")
flags.DEFINE_enum("mixed_precision", "float32", ["float32", "mixed_bfloat16"], "Compute precision.")
flags.DEFINE_enum("jit_compile", "auto", ["auto", "true", "false"],
                  "XLA for the train step and E-step: auto = on GPU/TPU, and on CPU for E-step "
                  "granularities with K <= 128 over >= 20 000 images.")
flags.DEFINE_enum("distribution", "default", ["default", "mirrored"],
                  "default (one device) or mirrored (tf.distribute.MirroredStrategy over visible devices).")
flags.DEFINE_integer("seed", 0, "Random seed.")

# Outputs.
flags.DEFINE_string("output_dir", "runs/quickstart", "Where everything is written.")
flags.DEFINE_boolean("overwrite", False, "Start afresh in an output_dir that holds a different run.")
flags.DEFINE_integer("checkpoint_every_steps", 0, "Also checkpoint every N steps (0: each epoch).")
flags.DEFINE_integer("knn_every", 1, "kNN monitor every N epochs (0: off).")
flags.DEFINE_integer("knn_k", 200, "Neighbours of the weighted kNN.")
flags.DEFINE_integer("low_shot_draws", 5, "Draws per shot count of the low-shot SVM.")
flags.DEFINE_boolean("raw_pixels", True, "Also evaluate raw pixels as a baseline beside the encoder.")
flags.DEFINE_boolean("export", True, "Write the SavedModel and model.keras.")
flags.DEFINE_boolean("plots", True, "Write the PNG pictures.")
flags.DEFINE_boolean("debug", False, "Show full tracebacks instead of one-line errors.")

RUN_FLAGS = sorted(set(FLAGS) - _FLAGS_BEFORE)

# Flags that do not change what a run computes: they may differ on resume.
RESUMABLE = {"epochs", "output_dir", "overwrite", "debug", "plots", "export", "knn_every", "low_shot_draws",
             "checkpoint_every_steps", "steps_per_epoch", "raw_pixels"}


# Smallest input side each encoder can take (its total downsampling).
MIN_IMAGE_SIZE = {"small_cnn": 2, "small_resnet": 8, "resnet18": 8, "resnet50": 8}


class UsageError(Exception):
    """A user mistake: printed as one line, exit status 2."""


class TrainingDiverged(Exception):
    """The loss became NaN/Inf: printed as one line, exit status 3."""


def run_config():
    return {name: FLAGS[name].value for name in RUN_FLAGS}


def check_output_dir(config):
    """Checks output_dir can hold this run; returns True when it holds this same run (resume).

    Nothing is written here: config.json is written only once every input has
    been validated, so a mistyped command never leaves a run behind.
    """
    out = FLAGS.output_dir
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
    path = os.path.join(out, "config.json")
    if os.path.exists(path) and not FLAGS.overwrite:
        with open(path) as f:
            previous = json.load(f)
        # A flag added after the run started counts as its default there.
        changed = sorted(k for k in set(previous) | set(config) if k not in RESUMABLE
                         and previous.get(k, FLAGS[k].default if k in FLAGS else None) != config.get(k))
        if changed:
            raise UsageError(
                f"--output_dir {out} holds a run with a different config (differs in: {', '.join(changed)}); "
                "use another --output_dir, or pass --overwrite to start afresh there.")
        return True
    return False


def write_json(path, value):
    temporary = path + ".tmp"
    with open(temporary, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)
    os.replace(temporary, path)


def parse_flags():
    """Validates flags that keras_pcl cannot check itself; returns parsed values."""
    try:
        crop = tuple(float(v) for v in FLAGS.crop_scale)
        clusters = tuple(int(v) for v in FLAGS.num_clusters)
        drops = tuple(int(v) for v in FLAGS.lr_drops)
    except ValueError as error:
        raise UsageError(f"--crop_scale, --num_clusters and --lr_drops take comma-separated numbers ({error}).")
    if len(crop) != 2:
        raise UsageError(f"--crop_scale takes two numbers MIN,MAX, got {FLAGS.crop_scale}.")
    for name in ("batch_size", "epochs"):
        if FLAGS[name].value < 1:
            raise UsageError(f"--{name} must be >= 1, got {FLAGS[name].value}.")
    if FLAGS.learning_rate <= 0:
        raise UsageError(f"--learning_rate must be > 0, got {FLAGS.learning_rate}.")
    if FLAGS.temperature <= 0:
        raise UsageError(f"--temperature must be > 0, got {FLAGS.temperature}.")
    if FLAGS.prototype_temperature < 0:
        raise UsageError(f"--prototype_temperature must be > 0, or 0 to use --temperature; got "
                         f"{FLAGS.prototype_temperature}.")
    if FLAGS.prototype_weight < 0:
        raise UsageError(f"--prototype_weight must be >= 0, got {FLAGS.prototype_weight}.")
    if not 0 <= FLAGS.momentum < 1:
        raise UsageError(f"--momentum must be in [0, 1), got {FLAGS.momentum}.")
    if FLAGS.queue_size % FLAGS.batch_size:
        raise UsageError(f"--queue_size {FLAGS.queue_size} is not a multiple of --batch_size {FLAGS.batch_size}; "
                         f"use e.g. {-(-FLAGS.queue_size // FLAGS.batch_size) * FLAGS.batch_size}.")
    if FLAGS.norm == "split" and (FLAGS.num_splits < 1 or FLAGS.batch_size % FLAGS.num_splits):
        raise UsageError(f"--batch_size {FLAGS.batch_size} is not divisible by --num_splits {FLAGS.num_splits}; "
                         "change either, or use --norm=batch.")
    return crop, clusters, drops


def build_strategy(tf):
    if FLAGS.distribution == "mirrored":
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def learning_rate_schedule(keras, steps_per_epoch, drops):
    total = FLAGS.epochs * steps_per_epoch
    warmup = FLAGS.lr_warmup_epochs * steps_per_epoch
    peak = FLAGS.learning_rate
    if FLAGS.schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(
            0.0 if warmup else peak, max(1, total - warmup), warmup_target=peak if warmup else None,
            warmup_steps=warmup)
    if FLAGS.schedule == "step":
        boundaries = [d * steps_per_epoch for d in drops if d < FLAGS.epochs]
        return keras.optimizers.schedules.PiecewiseConstantDecay(
            boundaries, [peak * 0.1 ** i for i in range(len(boundaries) + 1)]) if boundaries else peak
    return peak


def build_model(keras_pcl, keras, split, image_size, clusters):
    from keras_pcl import backbones

    shape = (image_size, image_size, split.image_shape[-1])
    options = dict(norm=FLAGS.norm, num_splits=FLAGS.num_splits)
    if FLAGS.width:
        options["width"] = FLAGS.width
    if FLAGS.encoder in ("resnet18", "resnet50"):
        options["small_images"] = FLAGS.small_images
    backbone = backbones.BACKBONES[FLAGS.encoder](shape, **options)
    head = (backbones.mlp_head(FLAGS.embedding_dim, FLAGS.hidden_dim) if FLAGS.head == "mlp"
            else backbones.linear_head(FLAGS.embedding_dim))
    common = dict(queue_size=FLAGS.queue_size, momentum=FLAGS.momentum, temperature=FLAGS.temperature,
                  symmetric=FLAGS.symmetric)
    if FLAGS.method == "moco":
        return keras_pcl.MoCo(backbone, head, **common)
    return keras_pcl.PCL(backbone, head, num_samples=len(split.train_images), num_clusters=clusters,
                         warmup_epochs=FLAGS.warmup_epochs,
                         num_negative_prototypes=FLAGS.num_negative_prototypes or None,
                         use_feature_bank=FLAGS.feature_bank,
                         prototype_temperature=FLAGS.prototype_temperature or None,
                         prototype_weight=FLAGS.prototype_weight, **common)


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
    crop, clusters, drops = parse_flags()
    config = run_config()
    resuming = check_output_dir(config)

    import keras
    import tensorflow as tf

    import keras_pcl
    from keras_pcl import augment, callbacks, clustering, data, evaluation, export, plots

    keras.utils.set_random_seed(FLAGS.seed)
    if FLAGS.mixed_precision != "float32":
        keras.mixed_precision.set_global_policy(FLAGS.mixed_precision)
    split = data.load_dataset(FLAGS.dataset, image_size=FLAGS.image_size or None, seed=FLAGS.seed)
    if FLAGS.holdout:
        try:
            split = data.holdout_split(split, FLAGS.holdout)
        except ValueError as error:
            raise UsageError(f"--holdout: {error}") from None
    print(f"dataset {split.name}: {len(split.train_images)} train / {len(split.test_images)} test images "
          f"{split.image_shape}; {split.notes}")
    data.as_image_array(split.train_images)
    image_size = FLAGS.image_size or split.image_shape[0]
    if split.image_shape[0] != split.image_shape[1]:
        raise UsageError(f"images are {split.image_shape[0]}x{split.image_shape[1]}; pass --image_size to square them.")
    if FLAGS.batch_size > len(split.train_images):
        raise UsageError(f"--batch_size {FLAGS.batch_size} is larger than the dataset ({len(split.train_images)} "
                         "training images); use a smaller batch size.")
    if FLAGS.method == "pcl" and max(clusters) > len(split.train_images):
        raise UsageError(f"--num_clusters {max(clusters)} exceeds the {len(split.train_images)} training images; "
                         "use fewer clusters.")
    smallest = MIN_IMAGE_SIZE[FLAGS.encoder] * (4 if FLAGS.encoder.startswith("resnet") and not FLAGS.small_images else 1)
    if image_size < smallest:
        raise UsageError(f"--encoder {FLAGS.encoder} needs images of at least {smallest} px, got {image_size}; "
                         f"pass --image_size={smallest} or a smaller encoder.")
    if FLAGS.overwrite and os.path.isdir(os.path.join(FLAGS.output_dir, "checkpoints")):
        import shutil

        shutil.rmtree(os.path.join(FLAGS.output_dir, "checkpoints"))
        resuming = False
    write_json(os.path.join(FLAGS.output_dir, "config.json"), config)

    strategy = build_strategy(tf)
    steps = len(split.train_images) // FLAGS.batch_size
    if FLAGS.steps_per_epoch:
        steps = min(steps, FLAGS.steps_per_epoch)
    jit = {"auto": "auto", "true": True, "false": False}[FLAGS.jit_compile]
    train_jit = clustering.resolve_jit_compile(jit) and strategy.num_replicas_in_sync == 1
    with strategy.scope():
        model = build_model(keras_pcl, keras, split, image_size, clusters)
        optimizer = keras.optimizers.SGD(learning_rate_schedule(keras, steps, drops), momentum=FLAGS.sgd_momentum,
                                         weight_decay=FLAGS.weight_decay)
        model.compile(optimizer=optimizer, jit_compile=train_jit)

    channels = split.image_shape[-1]
    pipeline = augment.get_preset(FLAGS.augmentation, image_size, channels, crop)
    train_eval_ds = data.eval_dataset(split.train_images, 512, image_size)

    out = FLAGS.output_dir
    checkpoint = callbacks.TrainingCheckpoint(os.path.join(out, "checkpoints"), FLAGS.checkpoint_every_steps)
    initial_epoch = checkpoint.restore(model)
    if resuming and initial_epoch:
        print(f"resuming {out} at epoch {initial_epoch}")
    # Epoch e's order and augmentations depend only on (seed, e): a resumed run sees the same data.
    train_ds = data.contrastive_dataset(split.train_images, pipeline, FLAGS.batch_size, seed=FLAGS.seed,
                                        epochs=FLAGS.epochs, initial_epoch=initial_epoch, steps_per_epoch=steps)
    # The guard runs first, so a step with a NaN/Inf loss is never checkpointed.
    fit_callbacks = [callbacks.NonFiniteLossGuard(), checkpoint]
    if FLAGS.method == "pcl":
        estep = callbacks.PrototypeUpdate(train_eval_ds, every_n_epochs=FLAGS.estep_every,
                                          num_iters=FLAGS.kmeans_iters, num_restarts=FLAGS.kmeans_restarts,
                                          jit_compile=jit, seed=FLAGS.seed, verbose=1)
        fit_callbacks.insert(1, estep)
    if FLAGS.knn_every and split.has_labels:
        fit_callbacks.append(evaluation.KNNMonitor(split.train_images, split.train_labels, split.test_images,
                                                   split.test_labels, FLAGS.knn_every, FLAGS.knn_k,
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
    fit_callbacks.append(keras.callbacks.TensorBoard(os.path.join(out, "logs"), write_graph=False))
    history = {}
    history_path = os.path.join(out, "history.json")
    if resuming and os.path.exists(history_path):
        with open(history_path) as f:
            history = {k: v[:initial_epoch] for k, v in json.load(f).items()}

    class SaveHistory(keras.callbacks.Callback):
        """history.json: one entry per epoch for every key (None where not measured)."""

        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            history.setdefault("epoch", [])
            done = len(history["epoch"])
            for key in set(logs) - set(history):
                history[key] = [None] * done
            for key in history:
                history[key].append(epoch + 1 if key == "epoch" else
                                    (float(logs[key]) if key in logs else None))
            write_json(history_path, history)

    fit_callbacks.append(SaveHistory())
    started = time.time()
    if initial_epoch < FLAGS.epochs:
        try:
            model.fit(train_ds, epochs=FLAGS.epochs, initial_epoch=initial_epoch, steps_per_epoch=steps,
                      callbacks=fit_callbacks,
                      verbose=1 if sys.stdout.isatty() else 2)
        except callbacks.NonFiniteLossError as error:
            raise TrainingDiverged(str(error)) from None
    train_seconds = time.time() - started

    # Evaluation of the frozen backbone, beside raw pixels.
    print("evaluating the frozen encoder and raw pixels")
    rows = {}
    if split.has_labels:
        feature_sets = {"encoder": [evaluation.extract_features(model.backbone, x, image_size=image_size)
                                    for x in (split.train_images, split.test_images)]}
        if FLAGS.raw_pixels:
            feature_sets["raw_pixels"] = [evaluation.raw_pixel_features(x)
                                          for x in (split.train_images, split.test_images)]
        for name, (train_f, test_f) in feature_sets.items():
            rows[name] = evaluation.evaluate_features(train_f, split.train_labels, test_f, split.test_labels,
                                                      knn_k=FLAGS.knn_k, draws=FLAGS.low_shot_draws,
                                                      seed=FLAGS.seed)
        print(format_table(rows))
    results = {"dataset": split.name, "holdout": FLAGS.holdout, "method": FLAGS.method, "epochs": FLAGS.epochs,
               "train_seconds_this_invocation": round(train_seconds, 1),
               # Over every invocation of a resumed run (history.json keeps each epoch's time).
               "train_seconds": round(sum(t for t in history.get("epoch_seconds", []) if t is not None), 1),
               "evaluation": rows,
               "final_logs": {k: v[-1] for k, v in history.items() if v and k != "epoch"}}
    if FLAGS.method == "pcl" and estep.stats:
        results["last_estep"] = estep.stats
    write_json(os.path.join(out, "results.json"), results)

    if FLAGS.export:
        export.export_saved_model(model, os.path.join(out, "saved_model"))
        temporary = os.path.join(out, "model.tmp.keras")
        model.save(temporary)
        os.replace(temporary, os.path.join(out, "model.keras"))
    if FLAGS.plots:
        plots.training_curves(history, os.path.join(out, "curves.png"))
        if split.has_labels:
            plots.embedding_scatter(feature_sets["encoder"][1], split.test_labels, os.path.join(out, "tsne.png"))
        if FLAGS.method == "pcl" and int(model.prototypes_ready.numpy()):
            keys = callbacks.embed_dataset(model.embed_keys, train_eval_ds, len(split.train_images)).numpy()
            for m, k in enumerate(model.num_clusters):
                plots.prototype_gallery(split.train_images, keys, model.prototypes[m].numpy(),
                                        model.assignments.numpy()[m], os.path.join(out, f"prototypes_k{k}.png"))
    print(f"done: results in {os.path.join(out, 'results.json')}")


def run(argv):
    try:
        main(argv)
    except TrainingDiverged as error:  # not a usage mistake: its own status
        if FLAGS.debug:
            raise
        print(f"run.py: error: {error}", file=sys.stderr)
        sys.exit(3)
    except (UsageError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError,
            ImportError) as error:
        if FLAGS.debug:
            raise
        fail(str(error).splitlines()[0] if str(error) else type(error).__name__)


def fail(message):
    print(f"run.py: error: {message}", file=sys.stderr)
    sys.exit(2)


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
