"""The method harness: every method in keras_pcl.models.METHODS passes the same checks.

For each method: config and .keras round trips keep weights and state; one step gives
finite losses and the declared logs; evaluate changes no state; 2 replicas compute the
first step's loss and state of 1; XLA matches graph mode; a run resumed from a
checkpoint ends where the run straight through does. A new method is not done until it
has an entry in HARNESS.
"""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_pcl
from keras_pcl import backbones, data
from keras_pcl.models import heads

NUM_IMAGES, BATCH = 64, 16
DIGIT_COUNTS = [9, 7, 6, 5, 7, 8, 6, 5, 5, 6]  # a made-up prior, not uniform


def encoder():
    # No BatchNorm in the encoder: with per-replica statistics 2 replicas could not equal 1
    # (the heads' BatchNorm is synchronised, so it stays).
    return backbones.small_cnn((8, 8, 1), width=8, norm="none")


def bn_mlp(width, hidden, **options):
    return heads.mlp(width, hidden, batch_norm=True, **options)


HARNESS = {
    "moco": lambda: keras_pcl.MoCo(encoder(), backbones.mlp_head(16, 32), queue_size=64, momentum=0.9),
    # PCL with every option off its default, so each check covers them (sampled negatives, bank, ...).
    "pcl": lambda: keras_pcl.PCL(encoder(), backbones.mlp_head(16, 32), num_samples=NUM_IMAGES,
                                 num_clusters=(4, 6), warmup_epochs=1, queue_size=64, momentum=0.9,
                                 num_negative_prototypes=3, use_feature_bank=True, prototype_temperature=0.1,
                                 prototype_weight=0.5, symmetric=True),
    "simclr": lambda: keras_pcl.SimCLR(encoder(), bn_mlp(16, (32,)), temperature=0.2),
    "byol": lambda: keras_pcl.BYOL(encoder(), bn_mlp(16, (32,)), bn_mlp(16, (32,)), momentum=0.9),
    "simsiam": lambda: keras_pcl.SimSiam(encoder(), bn_mlp(16, (16, 16), output_norm="batch_no_affine"),
                                         bn_mlp(16, (4,)), predictor_learning_rate=0.05),
    # Small crops and a queue that fills in the first epoch and is used once full (from step 3).
    "swav": lambda: keras_pcl.SwAV(encoder(), bn_mlp(16, (32,)), num_prototypes=12, queue_size=32,
                                   queue_start_epoch=0),
    "supcon": lambda: keras_pcl.SupCon(encoder(), bn_mlp(16, (32,)), temperature=0.2),
    "paco": lambda: keras_pcl.PaCo(encoder(), bn_mlp(16, (32,)), num_classes=10, class_counts=DIGIT_COUNTS,
                                   queue_size=64, momentum=0.9),
    "supervised": lambda: keras_pcl.Supervised(encoder(), 10, classification_loss="balanced_softmax",
                                               class_counts=DIGIT_COUNTS),
}
# Views beyond the two full-size ones, for methods that take more (SwAV's small crops).
SMALL_CROPS = {"swav": 2}
ONE_VIEW = {"supervised"}
METHODS = sorted(HARNESS)


def test_every_registered_method_is_in_the_harness():
    assert sorted(keras_pcl.models.METHODS) == METHODS
    for name, cls in keras_pcl.models.METHODS.items():
        assert cls.method_name == name and isinstance(HARNESS[name](), cls)
        assert set(cls.collapse_monitors) <= set(cls.metric_names), name  # the runner reads them from history


def build(name, seed=3, jit_compile=False, learning_rate=0.05):
    keras.utils.set_random_seed(seed)
    model = HARNESS[name]()
    schedule = keras.optimizers.schedules.CosineDecay(learning_rate, 8)
    model.compile(optimizer=keras.optimizers.SGD(schedule, momentum=0.9), jit_compile=jit_compile)
    return model


def fit_callbacks(model, images):
    """What the method needs during fit: PCL's E-step."""
    if isinstance(model, keras_pcl.PCL):
        return [keras_pcl.PrototypeUpdate(data.eval_dataset(images, 32), verbose=0)]
    return []


DIGIT_LABELS = []


@pytest.fixture(scope="module")
def images(digits):
    DIGIT_LABELS[:] = list(digits[1][:NUM_IMAGES])
    return digits[0][:NUM_IMAGES]


def batches(images, count=None, name=None):
    """Deterministic batches: two fixed, different views (the image and its mirror), and for
    SMALL_CROPS methods 4x4 crops of the four corners."""
    x = data.to_float(images)
    small = [x[:, :4, :4], x[:, 4:, 4:], x[:, :4, 4:], x[:, 4:, :4]][:SMALL_CROPS.get(name, 0)]
    views = (x,) if name in ONE_VIEW else (x, x[:, :, ::-1], *small)
    # Labels for every method (those that do not use them ignore them): digits' own, 0..9.
    labels = np.asarray(DIGIT_LABELS[:len(images)], np.int32)
    ds = tf.data.Dataset.from_tensor_slices(
        {"views": views, "index": np.arange(len(images), dtype=np.int32), "labels": labels})
    ds = ds.batch(BATCH, drop_remainder=True)
    return ds if count is None else ds.take(count)


def state(model):
    """Every variable of the model and its optimizer, as numpy, by position."""
    return [np.asarray(v) for v in model.weights] + [np.asarray(v) for v in model.optimizer.variables]


def assert_same_state(a, b, atol=0.0, rtol=0.0):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        np.testing.assert_allclose(x, y, atol=atol, rtol=rtol, err_msg=f"variable {i}")


@pytest.mark.parametrize("name", METHODS)
def test_one_step_gives_finite_declared_logs(name, images):
    model = build(name)
    model.fit(batches(images, 1, name=name), epochs=1, callbacks=fit_callbacks(model, images), verbose=0)
    logs = {k: float(v) for k, v in model.get_metrics_result().items()}
    assert set(logs) == {"loss", *model.loss_names, *model.metric_names}
    assert all(np.isfinite(v) for v in logs.values()), logs
    terms = sum(logs[t] * model.term_weights.get(t, 1.0) for t in model.loss_names)
    assert logs["loss"] == pytest.approx(terms, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("name", METHODS)
def test_config_and_keras_file_round_trip_keep_weights_and_state(name, images, tmp_path):
    model = build(name)
    model.fit(batches(images, name=name), epochs=2, callbacks=fit_callbacks(model, images), verbose=0)
    config = model.get_config()
    clone = type(model).from_config(config)
    assert clone.get_config() == config
    path = str(tmp_path / "model.keras")
    model.save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. "Skipping variable loading for optimizer"
        loaded = keras.models.load_model(path)
    assert type(loaded) is type(model)
    assert_same_state(state(loaded), state(model))
    x = data.to_float(images[:8])
    for endpoint, fn in model.serving_endpoints().items():
        served, again = fn(x), loaded.serving_endpoints()[endpoint](x)
        for key in served:
            np.testing.assert_allclose(again[key].numpy(), served[key].numpy(), atol=1e-6)


@pytest.mark.parametrize("name", METHODS)
def test_evaluate_changes_no_state(name, images):
    model = build(name)
    model.fit(batches(images, name=name), epochs=2, callbacks=fit_callbacks(model, images), verbose=0)
    before = state(model)
    results = model.evaluate(batches(images, name=name), verbose=0, return_dict=True)
    assert set(results) == {"loss", *model.loss_names, *model.metric_names}
    assert np.isfinite(results["loss"])
    assert_same_state(state(model), before)


@pytest.mark.parametrize("name", METHODS)
def test_two_replicas_match_one_on_the_first_step(name, images, mirrored):
    single = build(name)
    with mirrored.scope():
        replicated = build(name)
    step = batches(images, 1, name=name)
    loss = single.fit(step, epochs=1, callbacks=fit_callbacks(single, images), verbose=0).history["loss"][0]
    with mirrored.scope():
        callbacks = fit_callbacks(replicated, images)
    loss_2 = replicated.fit(step, epochs=1, callbacks=callbacks, verbose=0).history["loss"][0]
    assert loss_2 == pytest.approx(loss, rel=1e-4)
    for variable, reference in zip(replicated.weights + replicated.optimizer.variables,
                                   single.weights + single.optimizer.variables):
        copies = [np.asarray(c) for c in getattr(variable.value, "values", [variable.value])]
        assert len(copies) == 2 or variable.dtype.startswith("int"), variable.path
        for copy in copies[1:]:
            np.testing.assert_array_equal(copy, copies[0], err_msg=variable.path)
        # Float32 sums in another order (two partial batches; BatchNorm's variance as E[x^2] - E[x]^2).
        np.testing.assert_allclose(copies[0], np.asarray(reference), atol=1e-4, rtol=1e-3, err_msg=variable.path)


@pytest.mark.parametrize("name", METHODS)
def test_xla_step_matches_graph_mode(name, images):
    graph, xla = build(name, jit_compile=False), build(name, jit_compile=True)
    history = graph.fit(batches(images, 2, name=name), epochs=1, callbacks=fit_callbacks(graph, images), verbose=0).history
    history_xla = xla.fit(batches(images, 2, name=name), epochs=1, callbacks=fit_callbacks(xla, images), verbose=0).history
    for term in graph.loss_names:
        np.testing.assert_allclose(history_xla[term], history[term], rtol=1e-3, atol=1e-5)
    assert_same_state(state(xla), state(graph), atol=1e-4, rtol=1e-3)


class StopAfterEpoch(keras.callbacks.Callback):
    """A kill at an epoch boundary: training stops once epoch `epoch` (0-based) has ended."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            self.model.stop_training = True


@pytest.mark.parametrize("name", METHODS)
def test_resumed_run_ends_equal_to_the_run_straight_through(name, images, tmp_path):
    epochs = 3
    straight = build(name)
    straight.fit(batches(images, name=name), epochs=epochs, callbacks=fit_callbacks(straight, images), verbose=0)

    interrupted = build(name)
    checkpoint = keras_pcl.callbacks.TrainingCheckpoint(str(tmp_path / "ckpt"))
    interrupted.fit(batches(images, name=name), epochs=epochs,
                    callbacks=fit_callbacks(interrupted, images) + [checkpoint, StopAfterEpoch(0)], verbose=0)
    resumed = build(name, seed=11)  # other initial weights: everything must come from the checkpoint
    initial_epoch = keras_pcl.callbacks.TrainingCheckpoint(str(tmp_path / "ckpt")).restore(resumed)
    assert initial_epoch == 1
    resumed.fit(batches(images, name=name), epochs=epochs, initial_epoch=initial_epoch,
                callbacks=fit_callbacks(resumed, images), verbose=0)
    assert_same_state(state(resumed), state(straight), atol=1e-6)
