"""The family's shared pieces and the new methods' own math: momentum schedules and EMA, the
key queue, heads, batches of N views, SimCLR's loss and gradients, BYOL's target, SimSiam's
fixed predictor rate and the collapse monitor."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_pcl
from keras_pcl import augment, backbones, data, losses
from keras_pcl.models import Batch, KeyQueue, heads, momentum
from keras_pcl.models.base import dimension_std


def encoder():
    return backbones.small_cnn((8, 8, 1), width=8, norm="none")


def views(images):
    x = data.to_float(images)
    return x, x[:, :, ::-1]


# Momentum encoders -------------------------------------------------------------------

@pytest.mark.parametrize("base", [0.9, 0.99, 0.996])
def test_cosine_momentum_schedule_matches_the_formula(base):
    total = 37
    for step in (0, 1, 10, 18, 36, 37, 50):
        progress = min(step / total, 1.0)
        want = 1 - (1 - base) * (math.cos(math.pi * progress) + 1) / 2
        assert float(momentum.momentum_at(base, "cosine", step, total)) == pytest.approx(want, abs=1e-6)
    assert float(momentum.momentum_at(base, "cosine", 0, total)) == pytest.approx(base)
    assert float(momentum.momentum_at(base, "cosine", total, total)) == pytest.approx(1.0)
    assert float(momentum.momentum_at(base, "constant", 20, total)) == pytest.approx(base)
    assert float(momentum.momentum_at(base, "cosine", 5, 0)) == pytest.approx(base)  # length unknown


@pytest.mark.parametrize("kwargs,message", [(dict(momentum=1.0), "momentum"), (dict(momentum=-0.01), "momentum"),
                                            (dict(momentum_schedule="linear"), "momentum_schedule")])
def test_momentum_arguments_are_checked(kwargs, message):
    for build in (lambda: keras_pcl.BYOL(encoder(), heads.mlp(8, (8,)), heads.mlp(8, (8,)), **kwargs),
                  lambda: keras_pcl.MoCo(encoder(), heads.mlp(8, (8,)), queue_size=32, **kwargs)):
        with pytest.raises(keras_pcl.InvalidInputError, match=message):
            build()


def test_byol_target_is_the_ema_with_the_cosine_schedule_over_fit(digits):
    """After each step the target equals m_k * target + (1 - m_k) * online, with m_k the cosine
    schedule at step k of the whole fit (epochs x steps), tracked here in NumPy."""
    images = digits[0][:64]
    keras.utils.set_random_seed(0)
    model = keras_pcl.BYOL(encoder(), heads.mlp(8, (16,), batch_norm=True), heads.mlp(8, (16,), batch_norm=True),
                           momentum=0.8)
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    pairs = [pair for online, target in model.momentum_pairs() for pair in momentum.ema_pairs(online, target)]
    target = [np.asarray(t, np.float64) for _, t in pairs]
    steps_per_epoch, epochs = 2, 2

    class Track(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            step = int(self.model.optimizer.iterations.numpy()) - 1
            m = 1 - 0.2 * (math.cos(math.pi * step / (steps_per_epoch * epochs)) + 1) / 2
            for i, (online, _) in enumerate(pairs):
                target[i] = m * target[i] + (1 - m) * np.asarray(online, np.float64)

    x1, x2 = views(images[:32])
    ds = tf.data.Dataset.from_tensor_slices({"views": (x1, x2)}).batch(16, drop_remainder=True)
    history = model.fit(ds, epochs=epochs, callbacks=[Track()], verbose=0).history
    assert int(model.total_steps.numpy()) == steps_per_epoch * epochs
    for (_, t), want in zip(pairs, target):
        np.testing.assert_allclose(np.asarray(t), want, rtol=1e-5, atol=1e-6)
    assert history["target_momentum"][0] < history["target_momentum"][1] < 1.0


def test_a_cosine_schedule_needs_the_length_of_training(digits):
    model = keras_pcl.BYOL(encoder(), heads.mlp(8, (8,)), heads.mlp(8, (8,)))
    model.compile(optimizer="sgd")
    x1, x2 = views(digits[0][:32])
    unknown = tf.data.Dataset.from_tensor_slices({"views": (x1, x2)}).batch(16).filter(lambda b: True)
    with pytest.raises(keras_pcl.InvalidInputError, match="pass steps_per_epoch"):
        model.fit(unknown, epochs=1, verbose=0)


@pytest.mark.parametrize("method", ["moco", "paco"])
def test_shuffled_keys_come_back_in_batch_order(method, digits):
    """The shared key path (`momentum.key_encoder_call`): with batch-wide BatchNorm the shuffle
    cannot change any key, so shuffled keys equal the unshuffled ones row for row (the order is
    restored); with split BatchNorm the shuffle regroups the sub-batches, so some keys change."""
    x = data.to_float(digits[0][:32])

    def build(norm):
        keras.utils.set_random_seed(1)
        backbone = backbones.small_cnn((8, 8, 1), width=8, norm=norm, num_splits=4)
        if method == "moco":
            return keras_pcl.MoCo(backbone, heads.mlp(8, (16,)), queue_size=64)
        return keras_pcl.PaCo(backbone, heads.mlp(8, (16,)), num_classes=10, class_counts=[3] * 10, queue_size=64)

    def keys(model, shuffle):
        model.shuffle_keys = shuffle
        return model.embed_keys(x, training=True).numpy()

    whole = build("batch")
    shuffled = keys(whole, True)
    np.testing.assert_allclose(shuffled, keys(whole, False), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(shuffled, axis=1), 1.0, atol=1e-5)
    split = build("split")
    at_step_0, unshuffled = keys(split, True), keys(split, False)
    assert (np.abs(at_step_0 - unshuffled).max(axis=1) > 1e-4).any()
    # The permutation follows the optimizer step (so a resumed run shuffles as a straight one).
    split.compile(optimizer=keras.optimizers.SGD(0.1))
    split.optimizer.iterations.assign(5)
    assert (np.abs(keys(split, True) - at_step_0).max(axis=1) > 1e-4).any()


# The queue -----------------------------------------------------------------------------

def test_queue_with_labels_wraps_and_keeps_each_rows_label():
    queue = KeyQueue(6, 3, with_labels=True)
    assert (queue.labels.numpy() == -1).all() and int(queue.filled.numpy()) == 0
    for value in (1.0, 2.0, 3.0, 4.0):
        queue.enqueue(tf.fill([2, 3], value), labels=tf.fill([2], int(value)))
    np.testing.assert_array_equal(queue.keys.numpy()[:, 0], [4, 4, 2, 2, 3, 3])
    np.testing.assert_array_equal(queue.labels.numpy(), [4, 4, 2, 2, 3, 3])
    assert int(queue.pointer.numpy()) == 2 and int(queue.filled.numpy()) == 6
    with pytest.raises(keras_pcl.InvalidInputError, match="labels"):
        queue.enqueue(tf.ones([2, 3]))
    with pytest.raises(keras_pcl.InvalidInputError, match="not a multiple of the global batch size 4"):
        queue.check_batch_size(4)


# Heads -------------------------------------------------------------------------------------

def test_mlp_head_layers():
    simsiam = heads.mlp(6, (5, 4), batch_norm=True, output_norm="batch_no_affine")
    kinds = [type(layer).__name__ for layer in simsiam.layers]
    assert kinds == ["Dense", "BatchNormalization", "ReLU"] * 2 + ["Dense", "BatchNormalization"]
    assert not any(layer.use_bias for layer in simsiam.layers if isinstance(layer, keras.layers.Dense))
    last = simsiam.layers[-1]
    assert not last.center and not last.scale and last.synchronized
    out = simsiam(np.random.default_rng(0).normal(size=(32, 3)).astype(np.float32), training=True).numpy()
    np.testing.assert_allclose(out.mean(0), 0, atol=1e-4)  # BatchNorm without affine: zero mean, unit variance
    np.testing.assert_allclose(out.std(0), 1, atol=1e-2)
    linear = heads.mlp(7, ())
    assert [type(layer).__name__ for layer in linear.layers] == ["Dense"] and linear.layers[0].use_bias
    assert linear(np.zeros((2, 3), np.float32)).shape == (2, 7)


def test_mlp_torch_init_draws_as_torch_linear():
    """init="torch": every Dense kernel and bias uniform in +-1/sqrt(fan_in) (torch.nn.Linear's
    reset_parameters); init="keras": Glorot uniform kernels, zero biases. Checked on the bounds,
    the variance of a uniform law (bound^2 / 3) and a Kolmogorov-Smirnov distance."""
    keras.utils.set_random_seed(0)
    fan_ins = {"fc1": 96, "fc2": 400}
    torch_head = heads.mlp(200, (400,), init="torch")
    torch_head.build((None, 96))
    keras_head = heads.mlp(200, (400,))
    keras_head.build((None, 96))
    dense = [layer for layer in torch_head.layers if isinstance(layer, keras.layers.Dense)]
    assert [type(layer) for layer in dense] == [heads.FanInUniformDense] * 2
    for layer in dense:
        bound = 1 / math.sqrt(fan_ins[layer.name])
        for values in (layer.kernel.numpy().ravel(), layer.bias.numpy()):
            assert np.abs(values).max() <= bound and np.abs(values).max() > 0.95 * bound
            n = values.size
            np.testing.assert_allclose(values.var(), bound ** 2 / 3, rtol=6 / math.sqrt(n))
            uniform_cdf = (np.sort(values) + bound) / (2 * bound)
            assert np.abs(uniform_cdf - np.arange(1, n + 1) / n).max() < 2 / math.sqrt(n)
    glorot = [layer for layer in keras_head.layers if isinstance(layer, keras.layers.Dense)]
    assert [type(layer) for layer in glorot] == [keras.layers.Dense] * 2
    for layer in glorot:
        fan_out = layer.units
        limit = math.sqrt(6 / (fan_ins[layer.name] + fan_out))
        assert np.abs(layer.kernel.numpy()).max() <= limit and not layer.bias.numpy().any()
    # Where the head narrows, torch's kernel is much smaller than Glorot's: fc2 400 -> 200.
    assert dense[1].kernel.numpy().std() < 0.6 * glorot[1].kernel.numpy().std()


def test_mlp_torch_init_survives_serialization_and_momentum_copy():
    head = heads.mlp(8, (16,), batch_norm=True, init="torch")
    head.build((None, 12))
    x = np.random.default_rng(0).normal(size=(4, 12)).astype(np.float32)
    expected = head(x).numpy()
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(head))
    restored.set_weights(head.get_weights())
    assert [type(layer).__name__ for layer in restored.layers] == [
        "FanInUniformDense", "BatchNormalization", "ReLU", "FanInUniformDense"]
    np.testing.assert_allclose(restored(x).numpy(), expected, rtol=1e-6)
    copy = momentum.momentum_copy(head)
    np.testing.assert_allclose(copy(x).numpy(), expected, rtol=1e-6)


@pytest.mark.parametrize("kwargs", [dict(output_dim=0), dict(output_dim=4, hidden_dims=(8, 0)),
                                    dict(output_dim=2.5), dict(output_dim=4, output_norm="layer"),
                                    dict(output_dim=4, init="glorot")])
def test_mlp_rejects_bad_widths(kwargs):
    with pytest.raises(keras_pcl.InvalidInputError):
        heads.mlp(**kwargs)


# Batches ---------------------------------------------------------------------------------

def test_multiview_dataset_builds_views_of_each_group_index_and_labels(digits):
    images, labels = digits[0][:40], digits[1][:40]
    small = augment.RandomResizedCrop(4, 4, scale=(0.3, 1.0))
    large = augment.pcl_v2(8, 1, crop_scale=(0.5, 1.0))
    ds = data.multiview_dataset(images, [large, large, small, small, small], 16, labels=labels, seed=1, epochs=2)
    batches = list(ds.as_numpy_iterator())
    assert len(batches) == 4  # 2 per epoch, the remainder dropped
    first = batches[0]
    assert [v.shape for v in first["views"]] == [(16, 8, 8, 1)] * 2 + [(16, 4, 4, 1)] * 3
    np.testing.assert_array_equal(first["labels"], labels[first["index"]])
    assert not np.array_equal(first["views"][0], first["views"][1])
    assert not np.array_equal(first["views"][2], first["views"][3])
    again = list(data.multiview_dataset(images, [large, large, small, small, small], 16, labels=labels, seed=1,
                                        epochs=2, initial_epoch=1).as_numpy_iterator())
    for a, b in zip(batches[2:], again):
        for view_a, view_b in zip(a["views"], b["views"]):
            np.testing.assert_array_equal(view_a, view_b)


@pytest.mark.parametrize("labels,message", [(np.arange(39), "one label per image"),
                                            (np.full(40, -1), ">= 0"),
                                            (np.full(40, 0.5), "integer class ids")])
def test_multiview_dataset_rejects_bad_labels(digits, labels, message):
    with pytest.raises(keras_pcl.InvalidInputError, match=message):
        data.multiview_dataset(digits[0][:40], [augment.pcl_v1(8, 1)] * 2, 8, labels=labels)


@pytest.mark.parametrize("batch,message", [
    ({"views": ()}, "2 views per image, the batch has 0"),
    ({"views": (tf.zeros([4, 8, 8, 1]),) * 3}, "2 views per image, the batch has 3"),
    ({"views": (tf.zeros([4, 8, 8, 1]),) * 2, "weights": tf.ones([4])}, "got keys"),
    (tf.zeros([4, 8, 8, 1]), "trains on batches"),
])
def test_a_wrong_batch_is_a_one_line_error(batch, message):
    model = keras_pcl.SimCLR(encoder(), heads.mlp(8, (8,)))
    model.compile(optimizer="sgd")
    with pytest.raises(keras_pcl.InvalidInputError, match=message):
        model.train_step(batch)
    pcl = keras_pcl.PCL(encoder(), heads.mlp(8, (8,)), num_samples=16, num_clusters=(2,), queue_size=16)
    with pytest.raises(keras_pcl.InvalidInputError, match="index"):
        pcl.unpack_batch({"views": (tf.zeros([4, 8, 8, 1]),) * 2})


# SimCLR ------------------------------------------------------------------------------------

def test_simclr_loss_and_gradients_are_nt_xent_of_its_embeddings(digits):
    """One replica: the model's loss is mean(nt_xent) of its two views' embeddings (one pass over
    both, so BatchNorm sees 2B images), and its gradients are that mean's."""
    keras.utils.set_random_seed(2)
    model = keras_pcl.SimCLR(encoder(), heads.mlp(8, (16,), batch_norm=True, output_norm="batch"), temperature=0.3)
    x1, x2 = views(digits[0][:16])
    with tf.GradientTape(persistent=True) as tape:
        terms, outputs = model.forward(Batch((x1, x2)), training=True)
        loss = tf.reduce_mean(terms["nt_xent"])
        z = model.embed(tf.concat([x1, x2], 0), training=True)
        want = tf.reduce_mean(losses.nt_xent(z[:16], z[16:], 0.3))
    assert float(loss) == pytest.approx(float(want), rel=1e-6)
    for got, expected in zip(tape.gradient(loss, model.trainable_variables),
                             tape.gradient(want, model.trainable_variables)):
        np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-4, atol=1e-6)
    assert terms["nt_xent"].shape == (32,)
    with pytest.raises(keras_pcl.InvalidInputError, match="at least 2"):
        model.check_batch_size(1)


def test_simclr_gradients_on_two_replicas_equal_one(digits, mirrored):
    """The gather passes gradients back: both replicas' summed gradients equal one device's."""
    x1, x2 = views(digits[0][:16])

    def build():
        keras.utils.set_random_seed(4)
        # The runner's head: ending in (synchronised) BatchNorm.
        return keras_pcl.SimCLR(encoder(), heads.mlp(8, (16,), batch_norm=True, output_norm="batch"),
                                temperature=0.3)

    single = build()
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(single.forward(Batch((x1, x2)), training=True)[0]["nt_xent"])
    want = tape.gradient(loss, single.trainable_variables)
    with mirrored.scope():
        replicated = build()
    dataset = mirrored.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices((x1, x2)).batch(16))

    def step(v1, v2):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(replicated.forward(Batch((v1, v2)), training=True)[0]["nt_xent"]) / 2
        return tape.gradient(loss, replicated.trainable_variables)

    per_replica = mirrored.run(tf.function(step), args=next(iter(dataset)))
    got = [mirrored.reduce("SUM", g, axis=None) for g in per_replica]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=1e-3, atol=1e-6)


# SimSiam and BYOL ------------------------------------------------------------------------

def test_simsiam_loss_is_the_symmetric_negative_cosine(digits):
    keras.utils.set_random_seed(1)
    model = keras_pcl.SimSiam(encoder(), heads.mlp(8, (8, 8), batch_norm=True, output_norm="batch_no_affine"),
                              heads.mlp(8, (2,), batch_norm=True))
    x1, x2 = views(digits[0][:16])
    terms, outputs = model.forward(Batch((x1, x2)), training=False)
    z1, z2 = model(x1), model(x2)
    p1, p2 = model.predictor(z1), model.predictor(z2)
    want = 0.5 * losses.negative_cosine(p1, z2) + 0.5 * losses.negative_cosine(p2, z1)
    np.testing.assert_allclose(terms["negative_cosine"].numpy(), want.numpy(), rtol=1e-5)


def test_simsiam_holds_the_predictor_rate_while_the_rest_follows_the_schedule(digits):
    """Plain SGD, first step at lr 0.2 (the schedule), predictor rate fixed at 0.05: the
    predictor moves by -0.05 g, every other variable by -0.2 g."""
    keras.utils.set_random_seed(1)
    model = keras_pcl.SimSiam(encoder(), heads.mlp(8, (8, 8), batch_norm=True, output_norm="batch_no_affine"),
                              heads.mlp(8, (2,), batch_norm=True), predictor_learning_rate=0.05)
    model.compile(optimizer=keras.optimizers.SGD(keras.optimizers.schedules.CosineDecay(0.2, 100)))
    x1, x2 = views(digits[0][:16])
    before = [v.numpy().copy() for v in model.trainable_variables]
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(model.forward(Batch((x1, x2)), training=True)[0]["negative_cosine"])
    gradients = tape.gradient(loss, model.trainable_variables)
    model.train_step({"views": (x1, x2)})
    predictor = {id(v) for v in model.predictor.trainable_variables}
    assert predictor
    for variable, start, gradient in zip(model.trainable_variables, before, gradients):
        rate = 0.05 if id(variable) in predictor else 0.2
        np.testing.assert_allclose(variable.numpy(), start - rate * gradient.numpy(), rtol=1e-4, atol=1e-6)


def test_output_std_is_the_collapse_monitor():
    rng = np.random.default_rng(0)
    healthy = rng.normal(size=(4096, 64)).astype(np.float32)
    assert float(dimension_std(healthy)) == pytest.approx(1 / np.sqrt(64), rel=0.02)
    collapsed = np.tile(rng.normal(size=(1, 64)).astype(np.float32), (256, 1))
    assert float(dimension_std(collapsed)) < 1e-6


def test_byol_loss_is_the_sum_of_both_directions(digits):
    keras.utils.set_random_seed(5)
    model = keras_pcl.BYOL(encoder(), heads.mlp(8, (16,), batch_norm=True), heads.mlp(8, (16,), batch_norm=True))
    x1, x2 = views(digits[0][:16])
    terms, _ = model.forward(Batch((x1, x2)), training=False)
    p1, p2 = model.predictor(model(x1)), model.predictor(model(x2))
    t1, t2 = model.target_projector(model.target_backbone(x1)), model.target_projector(model.target_backbone(x2))
    cos = lambda a, b: np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    want = (2 - 2 * cos(p1.numpy(), t2.numpy())) + (2 - 2 * cos(p2.numpy(), t1.numpy()))
    np.testing.assert_allclose(terms["normalized_mse"].numpy(), want, rtol=1e-5)
    # The target starts as a copy of the online network and is not trained.
    assert all(not v.trainable for v in model.target_backbone.weights + model.target_projector.weights)
    assert {id(v) for v in model.trainable_variables}.isdisjoint(
        id(v) for v in model.target_backbone.weights + model.target_projector.weights)
