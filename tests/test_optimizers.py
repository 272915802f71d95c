"""LARS against a slow, obvious NumPy reference; under MirroredStrategy, mixed_bfloat16; round trips."""

import contextlib
import copy
import json
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_pcl
from keras_pcl.optimizers import LARS

STEPS = 5
INITIAL_LR, DECAY_STEPS, ALPHA = 0.5, 4, 0.1  # the last step runs past the decay: lr = ALPHA * INITIAL_LR


def cosine_schedule():
    return keras.optimizers.schedules.CosineDecay(INITIAL_LR, DECAY_STEPS, alpha=ALPHA)


def reference_cosine_lr(step):
    step = min(step, DECAY_STEPS)
    return INITIAL_LR * ((1 - ALPHA) * 0.5 * (1 + math.cos(math.pi * step / DECAY_STEPS)) + ALPHA)


def l2(a):
    total = 0.0
    for x in np.asarray(a, np.float64).ravel():
        total += float(x) * float(x)
    return math.sqrt(total)


def reference_lars(weights, gradients, learning_rates, momentum, weight_decay, trust, epsilon, decayed, adapted):
    """Every variable and velocity after every step, in float64, one element at a time.

    `gradients[t][i]`: gradient of variable i at step t; `decayed[i]`, `adapted[i]`: the exclusions."""
    w = [np.array(x, np.float64) for x in weights]
    v = [np.zeros_like(x) for x in w]
    history = []
    for lr, grads in zip(learning_rates, gradients):
        for i in range(len(w)):
            g = np.array(grads[i], np.float64)
            wd = weight_decay if decayed[i] else 0.0
            update = np.empty_like(g)
            flat_update, flat_g, flat_w = update.reshape(-1), g.reshape(-1), w[i].reshape(-1)
            for j in range(flat_g.size):
                flat_update[j] = flat_g[j] + wd * flat_w[j]
            if adapted[i]:
                w_norm, g_norm = l2(w[i]), l2(g)
                ratio = trust * w_norm / (g_norm + wd * w_norm + epsilon) if w_norm > 0 and g_norm > 0 else 1.0
                for j in range(flat_update.size):
                    flat_update[j] *= ratio
            flat_v, new_w = v[i].reshape(-1), w[i].copy()
            flat_new_w = new_w.reshape(-1)
            for j in range(flat_v.size):
                flat_v[j] = momentum * flat_v[j] + flat_update[j]
                flat_new_w[j] = flat_new_w[j] - lr * flat_v[j]
            w[i] = new_w
        history.append(([x.copy() for x in w], [x.copy() for x in v]))
    return history


def velocities(optimizer, variables):
    """The optimizer's velocity variables, in the order of `variables` (Keras creates them in that order)."""
    found = [x for x in optimizer.variables if "velocity" in x.name]
    assert len(found) == len(variables)
    for velocity, variable in zip(found, variables):
        assert tuple(velocity.shape) == tuple(variable.shape)
    return found


def assert_close(got, want, what):
    want = np.asarray(want, np.float64)
    # Absolute slack relative to the array's own scale, so that tiny updates are compared too.
    scale = float(np.abs(want).max()) if want.size else 0.0
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-6 * scale, err_msg=what)


def make_variables(rng, specs):
    """`specs`: (scope, name, shape, init) with init "normal" or "zeros"; scope None for no name scope."""
    variables = []
    for scope, name, shape, init in specs:
        value = np.zeros(shape, np.float32) if init == "zeros" else rng.normal(size=shape).astype(np.float32)
        with keras.name_scope(scope) if scope else contextlib.nullcontext():
            variables.append(keras.Variable(value, name=name))
    return variables


def run_against_reference(optimizer, variables, gradients, *, momentum, weight_decay, trust, epsilon, decayed,
                          adapted):
    weights = [x.numpy() for x in variables]
    lrs = [reference_cosine_lr(t) for t in range(len(gradients))]
    want = reference_lars(weights, gradients, lrs, momentum, weight_decay, trust, epsilon, decayed, adapted)
    for t, grads in enumerate(gradients):
        optimizer.apply_gradients(zip([tf.constant(g) for g in grads], variables))
        assert int(optimizer.iterations.numpy()) == t + 1
        got_v = velocities(optimizer, variables)
        want_w, want_v = want[t]
        for i, variable in enumerate(variables):
            assert np.isfinite(variable.numpy()).all(), f"step {t}: {variable.path} is not finite"
            assert_close(got_v[i].numpy(), want_v[i], f"step {t}: velocity of {variable.path}")
            assert_close(variable.numpy(), want_w[i], f"step {t}: {variable.path}")


SPECS = [("head", "kernel", (3, 4), "normal"),         # 2-D kernel
         ("encoder", "conv", (2, 2, 3, 2), "normal"),  # 4-D conv kernel: path "encoder/conv", name "conv"
         ("head", "bias", (4,), "normal"),             # 1-D bias
         (None, "scale", (), "normal")]                # rank 0


def random_gradients(rng, variables, scales=None, steps=STEPS):
    scales = scales or [1.0] * len(variables)
    return [[(rng.normal(size=tuple(x.shape)) * s).astype(np.float32) for x, s in zip(variables, scales)]
            for _ in range(steps)]


# (LARS kwargs, exclude_from_weight_decay kwargs, decayed, adapted) for SPECS' four variables.
CASES = {
    "defaults": (dict(), None, [True, True, False, False], [True, True, False, False]),
    "default_exclusions": (dict(momentum=0.8, weight_decay=0.01, trust_coefficient=0.05, epsilon=1e-6), None,
                           [True, True, False, False], [True, True, False, False]),
    "weight_decay_zero": (dict(weight_decay=0.0, trust_coefficient=0.05), None,
                          [True, True, False, False], [True, True, False, False]),
    "exclude_by_name": (dict(weight_decay=0.01, trust_coefficient=0.05), dict(var_names=["conv"]),
                        [True, False, False, False], [True, False, False, False]),
    "exclude_by_var_list": (dict(weight_decay=0.01, trust_coefficient=0.05), "kernel",
                            [False, True, False, False], [False, True, False, False]),
    # Patterns: adaptation follows them alone (against the path, not the name); decay is unchanged.
    "adaptation_pattern": (dict(weight_decay=0.01, trust_coefficient=0.05,
                                exclude_from_layer_adaptation=["^encoder/"]), None,
                           [True, True, False, False], [True, False, True, True]),
    "adaptation_patterns_and_decay_names": (dict(weight_decay=0.01, trust_coefficient=0.05,
                                                 exclude_from_layer_adaptation=["bias$", "sca"]),
                                            dict(var_names=["kernel"]),
                                            [False, True, False, False], [True, True, False, False]),
    "adaptation_pattern_empty": (dict(weight_decay=0.01, trust_coefficient=0.05, exclude_from_layer_adaptation=[]),
                                 None, [True, True, False, False], [True, True, True, True]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_lars_matches_reference(rng, case):
    kwargs, exclude, decayed, adapted = CASES[case]
    variables = make_variables(rng, SPECS)
    optimizer = LARS(cosine_schedule(), **kwargs)
    if exclude == "kernel":
        optimizer.exclude_from_weight_decay(var_list=[variables[0]])
    elif exclude is not None:
        optimizer.exclude_from_weight_decay(**exclude)
    gradients = random_gradients(rng, variables)
    run_against_reference(optimizer, variables, gradients, momentum=kwargs.get("momentum", 0.9),
                          weight_decay=kwargs.get("weight_decay", 1e-6),
                          trust=kwargs.get("trust_coefficient", 0.001), epsilon=kwargs.get("epsilon", 1e-8),
                          decayed=decayed, adapted=adapted)


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_zero_variable_and_zero_gradient(rng, weight_decay):
    specs = [("a", "zero_kernel", (3, 4), "zeros"),          # |w| = 0 at first: ratio 1
             ("a", "still_kernel", (2, 2, 1, 3), "normal"),  # |g| = 0 every step: ratio 1
             ("a", "zero_both", (4, 2), "zeros"),            # both zero for two steps, then a gradient
             ("a", "bias", (3,), "zeros")]
    variables = make_variables(rng, specs)
    gradients = random_gradients(rng, variables)
    for t in range(STEPS):
        gradients[t][1] = np.zeros_like(gradients[t][1])
        if t < 2:
            gradients[t][2] = np.zeros_like(gradients[t][2])
    optimizer = LARS(cosine_schedule(), weight_decay=weight_decay, trust_coefficient=0.05)
    run_against_reference(optimizer, variables, gradients, momentum=0.9, weight_decay=weight_decay,
                          trust=0.05, epsilon=1e-8, decayed=[True, True, True, False],
                          adapted=[True, True, True, False])
    assert np.abs(variables[0].numpy()).max() > 0 and np.abs(variables[2].numpy()).max() > 0


@pytest.mark.parametrize("scale", [1e-20, 1e-12, 1e-6, 1e6, 1e12, 1e20])
@pytest.mark.parametrize("weight_decay", [0.0, 1e-4])
def test_extreme_gradient_scales(rng, scale, weight_decay):
    """The trust ratio turns every adapted step into about eta * |w|, whatever the gradient's scale:
    finite and equal to the reference, also where the squares of the gradient leave float32's range."""
    specs = [("b", "kernel", (3, 4), "normal"), ("b", "conv", (2, 2, 3, 2), "normal"), ("b", "bias", (4,), "normal")]
    variables = make_variables(rng, specs)
    gradients = random_gradients(rng, variables, scales=[scale, scale, 1.0])
    optimizer = LARS(cosine_schedule(), weight_decay=weight_decay, trust_coefficient=0.05)
    run_against_reference(optimizer, variables, gradients, momentum=0.9, weight_decay=weight_decay,
                          trust=0.05, epsilon=1e-8, decayed=[True, True, False], adapted=[True, True, False])
    for velocity in velocities(optimizer, variables):
        assert np.isfinite(velocity.numpy()).all()


# ---------------------------------------------------------------------------------------------------------
# Keras models: MirroredStrategy, mixed_bfloat16, saving.


def tiny_model():
    return keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, activation="tanh", name="hidden"),
                             keras.layers.Dense(3, name="out")])


def tiny_data(rng, n=16):
    return rng.normal(size=(n, 5)).astype(np.float32), rng.normal(size=(n, 3)).astype(np.float32)


def lars_for_models():
    return LARS(cosine_schedule(), momentum=0.9, weight_decay=0.01, trust_coefficient=0.05)


def fit_tiny(scope_strategy, x, y, initial_weights=None):
    keras.utils.set_random_seed(3)
    with scope_strategy.scope() if scope_strategy is not None else contextlib.nullcontext():
        model = tiny_model()
        if initial_weights is not None:
            model.set_weights(initial_weights)
        optimizer = lars_for_models()
        model.compile(optimizer=optimizer, loss="mse")
    initial = [w.copy() for w in model.get_weights()]
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)  # 2 steps an epoch, 4 in all
    return model, optimizer, initial


def test_mirrored_strategy_matches_one_device(rng, mirrored):
    strategy = mirrored
    assert strategy.num_replicas_in_sync == 2
    x, y = tiny_data(rng)
    single, single_opt, initial = fit_tiny(None, x, y)
    mirrored, mirrored_opt, mirrored_initial = fit_tiny(strategy, x, y)
    for a, b in zip(initial, mirrored_initial):  # the same initialisation from the same seed
        np.testing.assert_array_equal(a, b)
    assert int(single_opt.iterations.numpy()) == int(mirrored_opt.iterations.numpy()) == 4
    assert any(np.abs(w - w0).max() > 1e-4 for w, w0 in zip(single.get_weights(), initial))
    for a, b in zip(single.get_weights(), mirrored.get_weights()):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    single_v = velocities(single_opt, single.trainable_variables)
    mirrored_v = velocities(mirrored_opt, mirrored.trainable_variables)
    for a, b in zip(single_v, mirrored_v):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-5, atol=1e-6)
    # Every replica holds the same copy of every weight and optimizer variable, to float32 rounding:
    # each replica applies the same reduced gradient with its own elementwise kernels, and a CI run
    # under load once saw one element differ by one ulp (2.98e-8 of 0.469). A replica-local
    # gradient or trust ratio would differ by orders of magnitude more.
    for variable in list(mirrored.weights) + list(mirrored_opt.variables):
        copies = strategy.experimental_local_results(variable.value)
        assert len(copies) == 2, variable.path
        np.testing.assert_allclose(copies[1].numpy(), copies[0].numpy(), rtol=5e-7, atol=1e-30, err_msg=variable.path)


def test_mixed_bfloat16_trains_with_float32_variables(rng):
    x, y = tiny_data(rng)
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        keras.utils.set_random_seed(4)
        model = tiny_model()
        optimizer = LARS(0.5, momentum=0.9, weight_decay=0.01, trust_coefficient=0.05)
        model.compile(optimizer=optimizer, loss="mse")
        assert model.layers[0].compute_dtype == "bfloat16"
        before = {w.path: w.numpy().copy() for w in model.trainable_variables}
        model.fit(x, y, batch_size=len(x), epochs=1, verbose=0)  # one step
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert int(optimizer.iterations.numpy()) == 1
    for variable in model.weights:
        assert variable.dtype == "float32", variable.path
        assert np.isfinite(variable.numpy()).all(), variable.path
    for velocity in velocities(optimizer, model.trainable_variables):
        assert velocity.dtype == "float32"
        assert np.isfinite(velocity.numpy()).all()
    for variable in model.trainable_variables:
        step = l2(variable.numpy().astype(np.float64) - before[variable.path])
        assert step > 0, variable.path
        if len(variable.shape) > 1:  # adapted: the first step is lr * ratio * |g + wd w| <= lr * eta * |w|
            assert step <= 0.5 * 0.05 * l2(before[variable.path]) * (1 + 1e-4), variable.path


def test_get_config_from_config_keeps_every_argument():
    optimizer = LARS(cosine_schedule(), momentum=0.8, weight_decay=0.003, trust_coefficient=0.02, epsilon=1e-7,
                     exclude_from_layer_adaptation=["bias", "^encoder/"], clipnorm=1.5, name="my_lars")
    config = optimizer.get_config()
    json.dumps(config)  # what a .keras file stores
    for restored in [LARS.from_config(copy.deepcopy(config)),  # Keras' from_config edits its argument
                     keras.optimizers.deserialize(json.loads(json.dumps(keras.optimizers.serialize(optimizer))))]:
        assert type(restored) is LARS
        assert restored.momentum == 0.8
        assert restored.weight_decay == pytest.approx(0.003)
        assert restored.trust_coefficient == pytest.approx(0.02)
        assert restored.epsilon == pytest.approx(1e-7)
        assert restored.exclude_from_layer_adaptation == ["bias", "^encoder/"]
        assert restored.clipnorm == 1.5 and restored.name == "my_lars"
        schedule = restored._learning_rate if hasattr(restored, "_learning_rate") else restored.learning_rate
        assert isinstance(schedule, keras.optimizers.schedules.CosineDecay)
        assert schedule.get_config() == cosine_schedule().get_config()
        assert restored.get_config() == config
    defaults = LARS.from_config(LARS().get_config())
    assert (defaults.momentum, defaults.weight_decay, defaults.trust_coefficient, defaults.epsilon,
            defaults.exclude_from_layer_adaptation) == (0.9, pytest.approx(1e-6), 0.001, 1e-8, None)


def compiled_tiny_model(seed, exclude_from_layer_adaptation=None):
    keras.utils.set_random_seed(seed)
    model = tiny_model()
    model.compile(optimizer=LARS(cosine_schedule(), weight_decay=0.01, trust_coefficient=0.05,
                                 exclude_from_layer_adaptation=exclude_from_layer_adaptation), loss="mse")
    return model


def assert_same_velocities(model, other):
    """`other`'s LARS velocities equal `model`'s, which are not all zero."""
    want = velocities(model.optimizer, model.trainable_variables)
    got = velocities(other.optimizer, other.trainable_variables)
    assert any(np.abs(v.numpy()).max() > 0 for v in want)
    for a, b in zip(want, got):
        np.testing.assert_array_equal(b.numpy(), a.numpy())


def test_keras_file_round_trip_keeps_optimizer_state(rng, tmp_path):
    x, y = tiny_data(rng)
    model = compiled_tiny_model(5, exclude_from_layer_adaptation=["out/"])
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    path = str(tmp_path / "lars.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded.optimizer) is LARS
    assert loaded.optimizer.get_config() == model.optimizer.get_config()
    assert int(loaded.optimizer.iterations.numpy()) == 2
    assert_same_velocities(model, loaded)
    # And it goes on exactly as the original would.
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    loaded.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)


def test_tf_train_checkpoint_restores_velocities(rng, tmp_path):
    x, y = tiny_data(rng)
    model = compiled_tiny_model(6)
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    path = tf.train.Checkpoint(model=model, optimizer=model.optimizer).save(str(tmp_path / "ckpt"))
    fresh = compiled_tiny_model(7)  # other initial weights
    fresh.optimizer.build(fresh.trainable_variables)
    tf.train.Checkpoint(model=fresh, optimizer=fresh.optimizer).restore(path).assert_existing_objects_matched()
    assert int(fresh.optimizer.iterations.numpy()) == 2
    assert_same_velocities(model, fresh)
    for a, b in zip(model.get_weights(), fresh.get_weights()):
        np.testing.assert_array_equal(b, a)
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    fresh.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(model.get_weights(), fresh.get_weights()):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kwargs,message", [
    (dict(momentum=1.0), "momentum"),
    (dict(momentum=-0.1), "momentum"),
    (dict(momentum=1.5), "momentum"),
    (dict(momentum=float("nan")), "momentum"),
    (dict(weight_decay=-1e-6), "weight_decay"),
    (dict(trust_coefficient=-0.001), "trust_coefficient"),
    (dict(epsilon=-1e-8), "epsilon"),
])
def test_bad_arguments_raise_one_line_error(kwargs, message):
    with pytest.raises(keras_pcl.InvalidInputError, match=message) as info:
        LARS(0.1, **kwargs)
    assert isinstance(info.value, ValueError)
    assert "\n" not in str(info.value)


def test_boundary_arguments_are_accepted():
    optimizer = LARS(0.1, momentum=0.0, weight_decay=0.0, trust_coefficient=0.0, epsilon=0.0)
    assert (optimizer.momentum, optimizer.weight_decay, optimizer.trust_coefficient, optimizer.epsilon) == (0, 0, 0, 0)
    assert isinstance(optimizer, keras.optimizers.Optimizer)
