"""The runner's method registry: each method's flags and defaults, its checks, and how to build it.

`run.py` owns the flags every method shares (data, encoder, schedule,
outputs); each `Method` here declares the flags it reads and their
defaults, and the common flags whose default differs for it. Only the
chosen method's flags are resolved, validated, written to config.json and
compared on resume; a flag of another method that is set is reported as
ignored. Defaults suit the embedded data (scikit-learn's 8x8 digits), so a
bare `python experiments/run.py` trains in about a minute; the flagfiles in
configs/ give each method's recipe for larger data.

No algorithm lives here: a `Method` only maps flags to keras_pcl's classes.
"""

from absl import flags


class UsageError(Exception):
    """A user mistake: printed as one line, exit status 2."""


# Checks of single flag values: each returns an error message or None.
def positive(value):
    return None if value > 0 else "must be > 0"


def non_negative(value):
    return None if value >= 0 else "must be >= 0"


def at_least_one(value):
    return None if value >= 1 else "must be >= 1"


def unit_interval(value):
    return None if 0 <= value < 1 else "must be in [0, 1)"


def positive_ints(value):
    try:
        numbers = [int(v) for v in value]
    except ValueError:
        return "takes comma-separated integers"
    return None if numbers and min(numbers) >= 1 else "takes comma-separated integers >= 1"


CHECKS = {}


def define(kind, name, help_text, check=None, **options):
    """Defines a method flag whose default comes from the chosen method (absl default None)."""
    help_text += " (default: per method, see --method)"
    if kind == "enum":
        flags.DEFINE_enum(name, None, options.pop("enum_values"), help_text, **options)
    else:
        getattr(flags, f"DEFINE_{kind}")(name, None, help_text, **options)
    if check is not None:
        CHECKS[name] = check


define("float", "temperature", "Softmax temperature of InfoNCE (MoCo, PCL), NT-Xent (SimCLR) or SwAV's "
       "predictions; also the mean of phi in PCL unless --prototype_temperature is set.", positive)
define("float", "momentum", "Base EMA coefficient of the momentum encoder (MoCo, PCL) or target network (BYOL), "
       "in [0, 1).", unit_interval)
define("enum", "momentum_schedule", "EMA schedule: constant, or cosine from --momentum to 1 over training (BYOL's).",
       enum_values=["constant", "cosine"])
define("integer", "queue_size", "MoCo/PCL: negative keys in the queue; SwAV: past embeddings per large crop "
       "(0: none); a multiple of the batch size.", non_negative)
define("boolean", "symmetric", "MoCo/PCL: use both views as queries, for InfoNCE and (PCL) ProtoNCE; about twice "
       "the step cost.")
define("enum", "head", "MoCo/PCL: projection head, mlp (v2) or linear (v1).", enum_values=["mlp", "linear"])
define("enum", "projector_output_norm", "SimCLR: what ends the projector: batch (its last Dense without bias, then "
       "BatchNorm with scale and shift, as lightly's head), batch_no_affine (BatchNorm without them), or none (a "
       "Dense with bias).", enum_values=["batch", "batch_no_affine", "none"])
define("integer", "predictor_hidden_dim", "BYOL/SimSiam: hidden width of the predictor MLP.", at_least_one)
define("boolean", "fixed_predictor_lr", "SimSiam: hold the predictor's learning rate at --learning_rate "
       "(the paper's finding) instead of following the schedule.")
define("integer", "num_prototypes", "SwAV: learnable prototypes K.", at_least_one)
define("float", "epsilon", "SwAV: Sinkhorn's entropic regularisation (smaller: sharper codes).", positive)
define("integer", "sinkhorn_iterations", "SwAV: Sinkhorn-Knopp iterations.", at_least_one)
define("integer", "freeze_prototypes_steps", "SwAV: steps at the start with the prototypes frozen (-1: one epoch).",
       lambda value: None if value >= -1 else "must be >= 0, or -1 for one epoch")
define("integer", "queue_start_epoch", "SwAV: epoch from which the queue of past embeddings is filled.", non_negative)
define("integer", "num_small_crops", "SwAV: small crops per image besides the 2 large ones (0: none).", non_negative)
define("integer", "small_crop_size", "SwAV: side of the small crops in px (0: 0.56 of --image_size).", non_negative)
define("list", "small_crop_scale", "SwAV: RandomResizedCrop area range of the small crops.")
define("float", "alpha", "PaCo: weight of the same-label contrast positives.", non_negative)
define("float", "beta", "PaCo: weight of the class-centre positive.", non_negative)
define("float", "gamma", "PaCo: weight of the contrast columns in the loss's normaliser.", non_negative)
define("enum", "supervised_loss", "supervised: cross-entropy (ce) or balanced softmax (logits + log prior).",
       enum_values=["ce", "balanced_softmax"])
define("list", "num_clusters", "PCL: clusters per granularity.", positive_ints)
define("integer", "warmup_epochs", "PCL: epochs of InfoNCE only before the first E-step.", non_negative)
define("float", "prototype_temperature", "PCL: the mean of phi, ProtoNCE's temperature (0: the same as "
       "--temperature, as the reference).", non_negative)
define("float", "prototype_weight", "PCL: weight of ProtoNCE against InfoNCE (the reference: 1).", non_negative)
define("integer", "num_negative_prototypes", "PCL: sampled negatives per step (0: exact softmax).", non_negative)
define("boolean", "feature_bank", "PCL: after the first E-step, cluster a bank of each image's latest training "
       "key instead of re-embedding the dataset (E-step costs k-means only).")
define("integer", "estep_every", "PCL: run the E-step every this many epochs.", at_least_one)
define("integer", "kmeans_iters", "PCL: k-means iterations (upper bound; stops early).", at_least_one)
define("integer", "kmeans_restarts", "PCL: k-means restarts.", at_least_one)

METHOD_FLAGS = sorted(CHECKS.keys() | {"momentum_schedule", "symmetric", "head", "fixed_predictor_lr",
                                       "feature_bank", "small_crop_scale", "supervised_loss",
                                       "projector_output_norm"})


class Method:
    """What the runner knows of one method. Subclasses set the class attributes and `build`."""

    name = None
    #: The method's own flags (names in METHOD_FLAGS) and their defaults; a callable
    #: default is computed from the resolved config (e.g. a width from another width).
    flags = {}
    #: Defaults of flags every method shares (run.py's), where this method's differ.
    common_defaults = {}

    def check(self, config, split):
        """Cross-flag checks that need the data (a `keras_pcl.data.Split`); raise UsageError."""

    def build(self, keras_pcl, config, backbone, split):
        """The compiled-to-be keras_pcl model."""
        raise NotImplementedError

    def views(self, augment, config, image_size, channels, crop_scale):
        """The augmentation of each view of a training batch."""
        return augment.view_augmentations(config.augmentation, image_size, channels, crop_scale,
                                          brightness_mode=config.brightness_mode, jitter_order=config.jitter_order)

    def callbacks(self, keras_pcl, config, train_eval_ds, jit_compile):
        """Callbacks the method needs during fit (PCL's E-step)."""
        return []

    def results(self, keras_pcl, fit_callbacks):
        """Method-specific entries for results.json."""
        return {}


def check_queue(config):
    if config.queue_size % config.batch_size:
        raise UsageError(f"--queue_size {config.queue_size} is not a multiple of --batch_size "
                         f"{config.batch_size}; use e.g. {-(-config.queue_size // config.batch_size) * config.batch_size}.")


def mlp(keras_pcl, config, output_dim, hidden_dims, **options):
    return keras_pcl.models.heads.mlp(output_dim, hidden_dims, init=config.head_init, **options)


class MoCoMethod(Method):
    name = "moco"
    flags = dict(temperature=0.2, momentum=0.99, momentum_schedule="constant", queue_size=1024, symmetric=False,
                 head="mlp")
    common_defaults = dict(norm="split", augmentation="moco_v2", learning_rate=0.06, weight_decay=5e-4)

    def check(self, config, split):
        if config.queue_size < 1:
            raise UsageError(f"--queue_size must be >= 1 for --method={self.name}, got {config.queue_size}.")
        check_queue(config)

    def head(self, keras_pcl, config):
        hidden = (config.hidden_dim,) if config.head == "mlp" else ()
        return mlp(keras_pcl, config, config.embedding_dim, hidden, name=f"{config.head}_head")

    def moco_arguments(self, config):
        return dict(queue_size=config.queue_size, momentum=config.momentum, temperature=config.temperature,
                    symmetric=config.symmetric, momentum_schedule=config.momentum_schedule)

    def build(self, keras_pcl, config, backbone, split):
        return keras_pcl.MoCo(backbone, self.head(keras_pcl, config), **self.moco_arguments(config))


class PCLMethod(MoCoMethod):
    name = "pcl"
    flags = dict(MoCoMethod.flags, num_clusters=["20", "40", "80"], warmup_epochs=5, prototype_temperature=0.0,
                 prototype_weight=1.0, num_negative_prototypes=0, feature_bank=False, estep_every=1,
                 kmeans_iters=20, kmeans_restarts=1)
    common_defaults = dict(MoCoMethod.common_defaults, augmentation="pcl_v2")

    def check(self, config, split):
        super().check(config, split)
        largest, num_train = max(int(k) for k in config.num_clusters), len(split.train_images)
        if largest > num_train:
            raise UsageError(f"--num_clusters {largest} exceeds the {num_train} training images; use fewer clusters.")
        if min(int(k) for k in config.num_clusters) < 2:
            raise UsageError("--num_clusters takes counts >= 2.")

    def build(self, keras_pcl, config, backbone, split):
        return keras_pcl.PCL(backbone, self.head(keras_pcl, config), num_samples=len(split.train_images),
                             num_clusters=tuple(int(k) for k in config.num_clusters),
                             warmup_epochs=config.warmup_epochs,
                             num_negative_prototypes=config.num_negative_prototypes or None,
                             use_feature_bank=config.feature_bank,
                             prototype_temperature=config.prototype_temperature or None,
                             prototype_weight=config.prototype_weight, **self.moco_arguments(config))

    def callbacks(self, keras_pcl, config, train_eval_ds, jit_compile):
        return [keras_pcl.PrototypeUpdate(train_eval_ds, every_n_epochs=config.estep_every,
                                          num_iters=config.kmeans_iters, num_restarts=config.kmeans_restarts,
                                          jit_compile=jit_compile, seed=config.seed, verbose=1)]

    def results(self, keras_pcl, fit_callbacks):
        stats = [c.stats for c in fit_callbacks if isinstance(c, keras_pcl.PrototypeUpdate) and c.stats]
        return {"last_estep": stats[0]} if stats else {}


class SimCLRMethod(Method):
    name = "simclr"
    # The projector ends in BatchNorm, as lightly's head (the official code's too, with scale only): on
    # Fashion-MNIST it scored higher than a biased Dense (bench/RESULTS.md, keras_pcl vs lightly).
    flags = dict(temperature=0.2, projector_output_norm="batch")
    # LARS at the paper's 0.3 x batch / 256, 10 % of training as linear warm-up.
    common_defaults = dict(norm="batch", augmentation="simclr", optimizer="lars", weight_decay=1e-6,
                           learning_rate=lambda config: 0.3 * config.batch_size / 256,
                           lr_warmup_epochs=lambda config: max(1, config.epochs // 10))

    def build(self, keras_pcl, config, backbone, split):
        output_norm = None if config.projector_output_norm == "none" else config.projector_output_norm
        projector = mlp(keras_pcl, config, config.embedding_dim, (config.hidden_dim,), batch_norm=True,
                        output_norm=output_norm, name="projector")
        return keras_pcl.SimCLR(backbone, projector, temperature=config.temperature)


class BYOLMethod(Method):
    name = "byol"
    flags = dict(momentum=0.99, momentum_schedule="cosine",
                 predictor_hidden_dim=lambda config: config.hidden_dim)
    common_defaults = dict(norm="batch", augmentation="byol", learning_rate=0.06, weight_decay=5e-4)

    def build(self, keras_pcl, config, backbone, split):
        projector = mlp(keras_pcl, config, config.embedding_dim, (config.hidden_dim,), batch_norm=True, name="projector")
        predictor = mlp(keras_pcl, config, config.embedding_dim, (config.predictor_hidden_dim,), batch_norm=True,
                        name="predictor")
        return keras_pcl.BYOL(backbone, projector, predictor, momentum=config.momentum,
                              momentum_schedule=config.momentum_schedule)


class SimSiamMethod(Method):
    name = "simsiam"
    # The paper's bottleneck predictor: a quarter of the projection's width (2048 -> 512).
    flags = dict(predictor_hidden_dim=lambda config: max(1, config.embedding_dim // 4), fixed_predictor_lr=True)
    common_defaults = dict(norm="batch", augmentation="simclr", learning_rate=0.06, weight_decay=5e-4,
                           embedding_dim=lambda config: config.hidden_dim)

    def build(self, keras_pcl, config, backbone, split):
        projector = mlp(keras_pcl, config, config.embedding_dim, (config.hidden_dim, config.hidden_dim), batch_norm=True,
                        output_norm="batch_no_affine", name="projector")
        predictor = mlp(keras_pcl, config, config.embedding_dim, (config.predictor_hidden_dim,), batch_norm=True,
                        name="predictor")
        return keras_pcl.SimSiam(backbone, projector, predictor,
                                 predictor_learning_rate=config.learning_rate if config.fixed_predictor_lr else None)


class SwAVMethod(Method):
    name = "swav"
    # The paper's temperature and iterations. On the 8x8 digits the paper's epsilon 0.05 left the loss at
    # ln K with the embeddings collapsed to one direction, and crops of 4-6 px only hurt (held-out probes:
    # kNN 73-79 %); epsilon 0.03, the SwAV authors' first remedy, without small crops trains (85.7 %).
    flags = dict(temperature=0.1, num_prototypes=30, epsilon=0.03, sinkhorn_iterations=3,
                 freeze_prototypes_steps=-1, queue_size=0, queue_start_epoch=15, num_small_crops=0,
                 small_crop_size=0, small_crop_scale=["0.2", "0.5"])
    # LARS at the official batch-256 recipe's 0.6, weight decay 1e-6.
    common_defaults = dict(norm="batch", augmentation="simclr", optimizer="lars", learning_rate=0.6,
                           weight_decay=1e-6)

    def check(self, config, split):
        check_queue(config)
        try:
            scale = [float(v) for v in config.small_crop_scale]
        except ValueError:
            scale = []
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            raise UsageError(f"--small_crop_scale takes two numbers 0 < MIN <= MAX <= 1, got "
                             f"{','.join(config.small_crop_scale)}.")

    def views(self, augment, config, image_size, channels, crop_scale):
        return augment.multi_crop(image_size, channels, num_large=2, num_small=config.num_small_crops,
                                  small_size=config.small_crop_size or None, large_scale=crop_scale,
                                  small_scale=tuple(float(v) for v in config.small_crop_scale),
                                  preset=config.augmentation, brightness_mode=config.brightness_mode,
                                  jitter_order=config.jitter_order)

    def build(self, keras_pcl, config, backbone, split):
        projector = mlp(keras_pcl, config, config.embedding_dim, (config.hidden_dim,), batch_norm=True, name="projector")
        return keras_pcl.SwAV(
            backbone, projector, num_prototypes=config.num_prototypes, temperature=config.temperature,
            epsilon=config.epsilon, sinkhorn_iterations=config.sinkhorn_iterations,
            freeze_prototypes_steps=None if config.freeze_prototypes_steps == -1 else config.freeze_prototypes_steps,
            queue_size=config.queue_size, queue_start_epoch=config.queue_start_epoch)


def class_counts(keras_pcl, split):
    """Training images per class, over the classes of both splits."""
    num_classes = int(max(split.train_labels.max(), split.test_labels.max())) + 1
    return [int(c) for c in keras_pcl.data.class_counts(split.train_labels, num_classes)]


class SupConMethod(SimCLRMethod):
    name = "supcon"
    flags = dict(temperature=0.1)  # the paper's
    common_defaults = dict(norm="batch", augmentation="simclr", learning_rate=0.06, weight_decay=5e-4)

    def build(self, keras_pcl, config, backbone, split):
        projector = mlp(keras_pcl, config, config.embedding_dim, (config.hidden_dim,), batch_norm=True, name="projector")
        return keras_pcl.SupCon(backbone, projector, temperature=config.temperature)


class PaCoMethod(MoCoMethod):
    name = "paco"
    # The official ImageNet-LT alpha, beta, gamma and temperature; MoCo's digits-sized queue and momentum.
    flags = dict(temperature=0.2, momentum=0.99, momentum_schedule="constant", queue_size=1024, alpha=0.05,
                 beta=1.0, gamma=1.0)
    common_defaults = dict(norm="split", augmentation="paco", learning_rate=0.06, weight_decay=5e-4)

    def build(self, keras_pcl, config, backbone, split):
        counts = class_counts(keras_pcl, split)
        projector = mlp(keras_pcl, config, config.embedding_dim, (config.hidden_dim,), batch_norm=True, name="projector")
        return keras_pcl.PaCo(backbone, projector, num_classes=len(counts), class_counts=counts,
                              queue_size=config.queue_size, momentum=config.momentum, temperature=config.temperature,
                              alpha=config.alpha, beta=config.beta, gamma=config.gamma,
                              momentum_schedule=config.momentum_schedule)


class SupervisedMethod(Method):
    name = "supervised"
    flags = dict(supervised_loss="ce")
    common_defaults = dict(norm="batch", augmentation="crop_flip", learning_rate=0.06, weight_decay=5e-4)

    def views(self, augment, config, image_size, channels, crop_scale):
        return augment.view_augmentations(config.augmentation, image_size, channels, crop_scale, num_views=1,
                                          brightness_mode=config.brightness_mode, jitter_order=config.jitter_order)

    def build(self, keras_pcl, config, backbone, split):
        counts = class_counts(keras_pcl, split)
        return keras_pcl.Supervised(backbone, len(counts), classification_loss=config.supervised_loss,
                                    class_counts=counts)


REGISTRY = {method.name: method for method in
            (MoCoMethod(), PCLMethod(), SimCLRMethod(), BYOLMethod(), SimSiamMethod(), SwAVMethod(), SupConMethod(),
             PaCoMethod(), SupervisedMethod())}
