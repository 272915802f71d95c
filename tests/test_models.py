"""MoCo and PCL: queue, EMA, warm-up switch, fit with the E-step, strategies, saving
(the round trips of every method are in test_methods.py)."""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_pcl
from keras_pcl import augment, backbones, data
from keras_pcl.models import Batch


def tiny_pcl(num_samples, **kwargs):
    options = dict(num_clusters=(5, 8), warmup_epochs=1, queue_size=64, momentum=0.9)
    options.update(kwargs)
    return keras_pcl.PCL(backbones.small_cnn((8, 8, 1), width=8, norm="none"),
                         backbones.mlp_head(16, 32), num_samples=num_samples, **options)


def tiny_moco(**kwargs):
    options = dict(queue_size=64, momentum=0.9)
    options.update(kwargs)
    return keras_pcl.MoCo(backbones.small_cnn((8, 8, 1), width=8, norm="none"),
                          backbones.mlp_head(16, 32), **options)


def estep_update(model, images):
    """A PrototypeUpdate on `images`, attached to `model`: `.run_estep()` runs one E-step outside fit."""
    update = keras_pcl.PrototypeUpdate(data.eval_dataset(images), verbose=0)
    update.set_model(model)
    return update


def fixed_views(images, batch_size=32):
    """Unaugmented, unshuffled ((x, x), index) batches: deterministic steps."""
    x = data.to_float(images)
    index = np.arange(len(images), dtype=np.int32)
    return tf.data.Dataset.from_tensor_slices(((x, x), index)).batch(batch_size, drop_remainder=True)


def test_enqueue_wraps_around():
    model = tiny_moco(queue_size=6)
    first, second = np.ones((4, 16), np.float32), 2 * np.ones((4, 16), np.float32)
    model.queue.enqueue(tf.constant(first[:2]))  # pointer 0 -> 2
    model.queue.enqueue(tf.constant(first[:2]))  # 2 -> 4
    model.queue.enqueue(tf.constant(second[:2]))  # fills rows 4, 5 and wraps to 0
    queue = model.queue.keys.numpy()
    assert int(model.queue.pointer.numpy()) == 0
    np.testing.assert_array_equal(queue[:4], 1.0)
    np.testing.assert_array_equal(queue[4:], 2.0)
    model.queue.enqueue(tf.constant(3 * first[:2]))
    np.testing.assert_array_equal(model.queue.keys.numpy()[:2], 3.0)
    assert int(model.queue.pointer.numpy()) == 2


def test_queue_must_be_a_multiple_of_the_batch(digits):
    model = tiny_moco(queue_size=48)
    model.compile(optimizer="sgd")
    with pytest.raises(ValueError, match="not a multiple of the global batch size 32"):
        model.fit(fixed_views(digits[0][:64]), epochs=1, verbose=0)


@pytest.mark.parametrize("kwargs,message", [
    (dict(momentum=1.0), "momentum"), (dict(momentum=-0.1), "momentum"),
    (dict(temperature=0.0), "temperature"), (dict(queue_size=0), "queue_size"),
])
def test_moco_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_moco(**kwargs)


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_clusters=(5, 1000)), "between 2 and the number of samples"),
    (dict(num_clusters=()), "at least one"), (dict(warmup_epochs=-1), "warmup_epochs"),
    (dict(num_negative_prototypes=0), "num_negative_prototypes"),
    (dict(prototype_temperature=0.0), "prototype_temperature"),
    (dict(prototype_weight=-1.0), "prototype_weight"),
])
def test_pcl_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_pcl(100, **kwargs)


def test_momentum_update_is_an_ema(digits):
    model = tiny_moco(momentum=0.75)
    model.compile(optimizer=keras.optimizers.SGD(0.5))
    query_weights = lambda: [w.numpy() for w in model.backbone.trainable_weights + model.head.trainable_weights]
    key_weights = lambda: [k.numpy() for _, k in keras_pcl.models.momentum.ema_pairs(model.backbone, model.key_backbone)
                           + keras_pcl.models.momentum.ema_pairs(model.head, model.key_head)]
    before = key_weights()
    for q, k in zip(query_weights(), before):
        np.testing.assert_array_equal(q, k)  # the key encoder starts as a copy
    model.fit(fixed_views(digits[0][:32]), epochs=1, verbose=0)
    after_query, after_key = query_weights(), key_weights()
    assert any(not np.allclose(q, k) for q, k in zip(after_query, before))
    for k0, q1, k1 in zip(before, after_query, after_key):
        np.testing.assert_allclose(k1, 0.75 * k0 + 0.25 * q1, rtol=1e-5, atol=1e-7)


def test_fit_on_a_dataset_does_not_warn_about_shuffle(digits):
    """Keras 3.15 warns that fit's default shuffle=True is ignored for a Dataset; the models default it off."""
    model = tiny_moco(queue_size=64)
    model.compile(optimizer=keras.optimizers.SGD(0.01))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(fixed_views(digits[0][:64]), epochs=1, verbose=0)
    assert not [str(w.message) for w in caught if "shuffle" in str(w.message)]


def test_keys_are_enqueued_after_each_step(digits):
    model = tiny_moco(queue_size=64, shuffle_keys=False)
    model.compile(optimizer=keras.optimizers.SGD(0.0))  # weights stay fixed: keys are predictable
    images = digits[0][:96]
    model.fit(fixed_views(images), epochs=1, verbose=0)  # 3 steps of 32: wraps once
    keys = model.embed_keys(data.to_float(images), training=True).numpy()
    assert int(model.queue.pointer.numpy()) == 32
    np.testing.assert_allclose(model.queue.keys.numpy()[:32], keys[64:], atol=1e-5)
    np.testing.assert_allclose(model.queue.keys.numpy()[32:], keys[32:64], atol=1e-5)


def test_feature_bank_holds_each_samples_latest_training_key(digits):
    model = tiny_pcl(80, shuffle_keys=False, use_feature_bank=True)
    model.compile(optimizer=keras.optimizers.SGD(0.0))  # weights stay fixed: keys are predictable
    images = digits[0][:80]
    model.fit(fixed_views(images), epochs=1, verbose=0)  # 2 steps of 32; the last 16 are dropped
    keys = model.embed_keys(data.to_float(images), training=True).numpy()
    bank = model.feature_bank.numpy()
    np.testing.assert_allclose(bank[:64], keys[:64], atol=1e-5)
    assert not bank[64:].any()  # never seen: still empty


def test_estep_embeds_once_then_clusters_the_feature_bank(digits):
    from sklearn.metrics import adjusted_rand_score

    images = digits[0][:64]
    model = tiny_pcl(len(images), num_clusters=(4,), use_feature_bank=True)
    model.compile(optimizer="sgd")
    update = estep_update(model, images)
    update.run_estep()  # the first E-step embeds the images and fills the bank
    np.testing.assert_allclose(model.feature_bank.numpy(), model.embed_keys(data.to_float(images)).numpy(),
                               atol=1e-5)
    # Later E-steps cluster the bank: four planted groups come back as the clusters.
    planted = np.arange(64) % 4
    centres = np.linalg.qr(np.random.default_rng(0).normal(size=(16, 4)))[0].T
    noise = np.random.default_rng(1).normal(scale=0.01, size=(64, 16))
    model.feature_bank.assign(keras_pcl.models.base.l2_normalize(centres[planted] + noise))
    update.run_estep()
    assert adjusted_rand_score(planted, model.assignments.numpy()[0]) == 1.0
    assert update.stats["estep_embed_seconds"] < update.stats["estep_cluster_seconds"]


def test_pcl_warmup_then_protonce(digits):
    images = digits[0][:256]
    model = tiny_pcl(len(images), warmup_epochs=1)
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9))
    update = keras_pcl.PrototypeUpdate(data.eval_dataset(images, 100), verbose=0)
    history = model.fit(fixed_views(images), epochs=3, callbacks=[update], verbose=0).history
    assert history["proto_nce"][0] == 0.0 and history["proto_acc"][0] == 0.0
    assert history["proto_nce"][1] > 0.0 and history["proto_nce"][2] > 0.0
    np.testing.assert_allclose(history["loss"], np.add(history["info_nce"], history["proto_nce"]), rtol=1e-5)
    assert int(model.prototypes_ready.numpy()) == 1
    for prototypes, phi, k in zip(model.prototypes, model.concentrations, model.num_clusters):
        np.testing.assert_allclose(np.linalg.norm(prototypes.numpy(), axis=1), 1.0, rtol=1e-5)
        assert phi.numpy().mean() == pytest.approx(model.temperature, rel=1e-4)
        assert model.assignments.numpy().max() < max(model.num_clusters)


def test_epochs_without_an_estep_log_zero_estep_time(digits):
    images = digits[0][:64]
    model = tiny_pcl(len(images), num_clusters=(4,), warmup_epochs=0)
    model.compile(optimizer="sgd")
    update = keras_pcl.PrototypeUpdate(data.eval_dataset(images), every_n_epochs=2, verbose=0)
    history = model.fit(fixed_views(images), epochs=3, callbacks=[update], verbose=0).history
    assert history["estep_cluster_seconds"][0] > 0 and history["estep_cluster_seconds"][2] > 0
    assert history["estep_embed_seconds"][1] == 0.0 and history["estep_cluster_seconds"][1] == 0.0
    assert history["k4_largest_cluster"][1] == history["k4_largest_cluster"][0]  # prototypes of epoch 0


@pytest.mark.parametrize("symmetric", [False, True])
def test_symmetric_averages_both_views_as_queries(digits, symmetric):
    """The model's InfoNCE and ProtoNCE equal losses.info_nce / losses.proto_nce on its own
    state for (q1, k2) and, with `symmetric`, also for (q2, k1), averaged; the queue still
    takes view 2's keys only."""
    images = digits[0][:64]
    model = tiny_pcl(len(images), warmup_epochs=0, shuffle_keys=False, symmetric=symmetric)
    model.compile(optimizer=keras.optimizers.SGD(0.0))
    estep_update(model, images).run_estep()
    view1, view2, index = data.to_float(images[:32]), data.to_float(images[32:]), tf.range(32)
    terms, _ = model.forward(Batch((view1, view2), index), training=False)
    q1, q2 = model.embed(view1), model.embed(view2)
    k1, k2 = model.embed_keys(view1), model.embed_keys(view2)
    directions = [(q1, k2), (q2, k1)] if symmetric else [(q1, k2)]
    want_info = np.mean([keras_pcl.losses.info_nce(q, k, model.queue.keys, model.temperature) for q, k in directions], 0)
    want_proto = np.mean([keras_pcl.losses.proto_nce(q, p, phi, tf.gather(model.assignments[m], index))
                          for m, (p, phi) in enumerate(zip(model.prototypes, model.concentrations))
                          for q, _ in directions], axis=0)
    np.testing.assert_allclose(terms["info_nce"].numpy(), want_info, rtol=1e-5)
    np.testing.assert_allclose(terms["proto_nce"].numpy(), want_proto, rtol=1e-5)
    if symmetric:  # the second direction changes the loss, so the check above could fail
        assert np.abs(want_info - keras_pcl.losses.info_nce(q1, k2, model.queue.keys, model.temperature)).max() > 1e-3
    model.train_step(((view1, view2), index))
    assert int(model.queue.pointer.numpy()) == 32
    np.testing.assert_allclose(model.queue.keys.numpy()[:32], model.embed_keys(view2, training=True).numpy(), atol=1e-5)


@pytest.mark.parametrize("weight", [0.0, 2.5])
def test_prototype_weight_scales_protonce_in_the_minimised_loss(digits, weight):
    """loss = InfoNCE + w * ProtoNCE; the logged terms stay unweighted, and with w = 0
    a step moves the weights exactly as the same step without the prototype term."""
    images = digits[0][:32]
    models = []
    for prototype_weight, ready in ((weight, 1), (1.0, 0)):
        keras.utils.set_random_seed(3)
        model = tiny_pcl(len(images), warmup_epochs=0, prototype_weight=prototype_weight)
        model.compile(optimizer=keras.optimizers.SGD(0.5))
        update = estep_update(model, images)
        update.run_estep()
        model.prototypes_ready.assign(ready)  # 0: the warm-up's step, InfoNCE alone
        models.append(model)
    weighted, instance_only = models
    x = data.to_float(images)
    batch = ((x, x), tf.range(32))
    terms, _ = weighted.forward(Batch(*batch), training=False)
    logs = {name: float(value) for name, value in weighted.train_step(batch).items()}
    assert logs["proto_nce"] == pytest.approx(float(tf.reduce_mean(terms["proto_nce"])), rel=1e-5)
    assert logs["proto_nce"] > 0.1
    assert logs["loss"] == pytest.approx(logs["info_nce"] + weight * logs["proto_nce"], rel=1e-5)
    instance_only.train_step(batch)
    moved = [np.abs(a.numpy() - b.numpy()).max() for a, b in zip(weighted.trainable_variables, instance_only.trainable_variables)]
    if weight == 0:
        assert max(moved) < 1e-6
    else:
        assert max(moved) > 1e-4


@pytest.mark.parametrize("prototype_temperature", [None, 0.05])
def test_prototype_temperature_sets_the_mean_of_phi_alone(digits, prototype_temperature):
    images = digits[0][:64]
    model = tiny_pcl(len(images), warmup_epochs=0, temperature=0.3, prototype_temperature=prototype_temperature)
    update = estep_update(model, images)
    update.run_estep()
    want = 0.3 if prototype_temperature is None else prototype_temperature  # None: the reference's tie
    for phi in model.concentrations:
        assert phi.numpy().mean() == pytest.approx(want, rel=1e-4)
    assert model.temperature == 0.3


def test_pcl_fit_without_the_estep_fails_clearly(digits):
    model = tiny_pcl(64, warmup_epochs=1)
    model.compile(optimizer="sgd")
    with pytest.raises(ValueError, match="PrototypeUpdate"):
        model.fit(fixed_views(digits[0][:64]), epochs=2, verbose=0)


def test_fit_lowers_the_loss_with_augmentation(digits):
    """A few epochs of real PCL on digits: both terms fall, embeddings stay spread.

    The queue starts random, so InfoNCE first rises while it fills with real
    keys (epoch 1); progress is measured from epoch 2, when ProtoNCE starts.
    """
    images = digits[0][:512]
    keras.utils.set_random_seed(0)
    model = keras_pcl.PCL(
        backbones.small_cnn((8, 8, 1), width=16, norm="split", num_splits=4), backbones.mlp_head(32, 64),
        num_samples=len(images), num_clusters=(10, 20), warmup_epochs=2, queue_size=128,
        momentum=0.99, num_negative_prototypes=6)
    model.compile(optimizer=keras.optimizers.SGD(0.03, momentum=0.9))
    train = data.contrastive_dataset(images, augment.pcl_v2(8, channels=1, crop_scale=(0.5, 1.0)), 64)
    update = keras_pcl.PrototypeUpdate(data.eval_dataset(images), verbose=0)
    history = model.fit(train, epochs=10, callbacks=[update], verbose=0).history
    assert history["proto_nce"][1] == 0.0 < history["proto_nce"][2]
    assert history["info_nce"][-1] < history["info_nce"][2]
    assert history["proto_nce"][-1] < history["proto_nce"][2]
    embeddings = model.embed(data.to_float(images)).numpy()
    assert embeddings.std(axis=0).mean() > 0.05  # not collapsed to one point


@pytest.mark.parametrize("step", [0, 1, 977, 2**31 + 5])
def test_key_shuffle_permutation_matches_numpy_hash_and_xla(step, numpy_hash):
    from keras_pcl.hashing import hashed_permutation

    want = np.argsort(numpy_hash(37, step), kind="stable")
    step = tf.constant(step, tf.int64)
    graph = tf.function(hashed_permutation)(37, step).numpy()
    xla = tf.function(hashed_permutation, jit_compile=True)(37, step).numpy()
    np.testing.assert_array_equal(graph, want)
    np.testing.assert_array_equal(xla, want)
    assert sorted(graph) == list(range(37)) and (graph != np.arange(37)).any()


def test_xla_train_step_matches_graph_mode(digits):
    """jit_compile=True (XLA, the GPU/TPU path) trains the same PCL step as graph mode:
    split BatchNorm, the key shuffle, the queue, the feature bank and ProtoNCE all compile."""
    images = digits[0][:64]

    def build(jit):
        keras.utils.set_random_seed(3)
        model = keras_pcl.PCL(backbones.small_cnn((8, 8, 1), width=8, norm="split", num_splits=2),
                              backbones.mlp_head(16, 32), num_samples=len(images), num_clusters=(4, 6),
                              warmup_epochs=1, queue_size=64, momentum=0.9, use_feature_bank=True)
        model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), jit_compile=jit)
        return model

    graph, xla = build(False), build(True)
    update = estep_update(graph, images)
    xla.set_prototypes(update.run_estep())  # ProtoNCE from the first step, same prototypes
    views = fixed_views(images, 16)
    history_graph = graph.fit(views, epochs=1, verbose=0).history
    history_xla = xla.fit(views, epochs=1, verbose=0).history
    assert history_xla["proto_nce"][0] > 0
    for name in ("info_nce", "proto_nce"):
        np.testing.assert_allclose(history_xla[name], history_graph[name], rtol=1e-3)
    np.testing.assert_allclose(xla.queue.keys.numpy(), graph.queue.keys.numpy(), atol=1e-3)
    np.testing.assert_allclose(xla.feature_bank.numpy(), graph.feature_bank.numpy(), atol=1e-3)
    np.testing.assert_allclose(xla.backbone.get_layer("norm1").moving_variance.numpy(),
                               graph.backbone.get_layer("norm1").moving_variance.numpy(), rtol=1e-3)


def test_two_replicas_match_one(digits, tmp_path, mirrored):
    images = digits[0][:64]
    strategy = mirrored

    def build():
        keras.utils.set_random_seed(1)
        model = tiny_pcl(len(images), shuffle_keys=False, use_feature_bank=True)
        model.compile(optimizer=keras.optimizers.SGD(0.1))
        return model

    single = build()
    with strategy.scope():
        mirrored = build()
    step = fixed_views(images).take(1)
    loss_single = single.fit(step, epochs=1, verbose=0).history["loss"][0]
    loss_mirrored = mirrored.fit(step, epochs=1, verbose=0).history["loss"][0]
    assert loss_mirrored == pytest.approx(loss_single, rel=1e-5)
    assert int(mirrored.queue.pointer.numpy()) == 32  # advanced by the global batch
    replicas = mirrored.queue.keys.value.values
    np.testing.assert_allclose(replicas[0].numpy(), single.queue.keys.numpy(), atol=1e-6)
    np.testing.assert_array_equal(replicas[0].numpy(), replicas[1].numpy())
    banks = mirrored.feature_bank.value.values  # both replicas' keys, on both replicas
    np.testing.assert_allclose(banks[0].numpy(), single.feature_bank.numpy(), atol=1e-6)
    np.testing.assert_array_equal(banks[0].numpy(), banks[1].numpy())
    assert (np.abs(banks[0].numpy()[:32]).sum(1) > 0).all() and not banks[0].numpy()[32:].any()
    for k_single, k_mirrored in zip(single.key_head.weights, mirrored.key_head.weights):
        copies = k_mirrored.value.values
        np.testing.assert_allclose(copies[0].numpy(), k_single.numpy(), atol=1e-6)
        np.testing.assert_array_equal(copies[0].numpy(), copies[1].numpy())
    # A full PCL epoch with the E-step under the strategy.
    with strategy.scope():
        update = keras_pcl.PrototypeUpdate(data.eval_dataset(images, 24), verbose=0)
        history = mirrored.fit(fixed_views(images), epochs=2, callbacks=[update], verbose=0).history
    assert history["proto_nce"][1] > 0
    for variable in mirrored.prototypes + [mirrored.assignments, mirrored.queue.keys, mirrored.feature_bank]:
        copies = variable.value.values
        np.testing.assert_array_equal(copies[0].numpy(), copies[1].numpy())
    # A checkpoint restores into a fresh mirrored model from outside the scope, as run.py does it
    # (the optimizer is built inside the model's strategy). One strategy object per process:
    # TF's collective instance keys clash across MirroredStrategy objects.
    checkpoint = keras_pcl.callbacks.TrainingCheckpoint(str(tmp_path / "checkpoints"))
    checkpoint.set_model(mirrored)
    checkpoint.save(2)
    with strategy.scope():
        restored = build()
    assert keras_pcl.callbacks.TrainingCheckpoint(str(tmp_path / "checkpoints")).restore(restored) == 2
    for saved, loaded in zip(mirrored.weights + mirrored.optimizer.variables,
                             restored.weights + restored.optimizer.variables):
        for copy in getattr(loaded.value, "values", [loaded.value]):
            np.testing.assert_array_equal(copy.numpy(), np.asarray(saved.value.values[0]), err_msg=loaded.path)


class DivergeAt(keras.callbacks.Callback):
    """Simulates divergence: NaN in the head's output bias just before a given batch."""

    def __init__(self, epoch, batch):
        super().__init__()
        self.at, self.epoch = (epoch, batch), None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
            bias = self.model.head.weights[-1]
            bias.assign(np.full(bias.shape, np.nan, np.float32))


def test_nan_guard_names_the_step_and_term_and_keeps_the_checkpoint(tmp_path, digits):
    model = tiny_moco()
    model.compile(optimizer=keras.optimizers.SGD(0.01))
    checkpoint = keras_pcl.callbacks.TrainingCheckpoint(str(tmp_path / "ckpt"))
    views = fixed_views(digits[0][:128])  # 4 steps per epoch
    model.fit(views, epochs=1, callbacks=[checkpoint], verbose=0)
    saved = checkpoint._manager.latest_checkpoint
    queue_before = model.queue.keys.numpy().copy()
    guard = keras_pcl.callbacks.NonFiniteLossGuard()
    with pytest.raises(keras_pcl.callbacks.NonFiniteLossError,
                       match=r"non-finite loss at step 8 \(epoch 2, batch 4\) in info_nce"):
        model.fit(views, epochs=2, initial_epoch=1, callbacks=[DivergeAt(1, 3), guard, checkpoint], verbose=0)
    assert checkpoint._manager.latest_checkpoint == saved  # no checkpoint of the broken state
    restored = tiny_moco()
    restored.compile(optimizer=keras.optimizers.SGD(0.01))
    assert keras_pcl.callbacks.TrainingCheckpoint(str(tmp_path / "ckpt")).restore(restored) == 1
    np.testing.assert_array_equal(restored.queue.keys.numpy(), queue_before)
    assert all(np.isfinite(w.numpy()).all() for w in restored.weights)


def test_checkpoint_holds_prototypes_and_concentrations(tmp_path, digits):
    images = digits[0][:64]
    model = tiny_pcl(len(images), warmup_epochs=0)
    model.compile(optimizer=keras.optimizers.SGD(0.01))
    update = estep_update(model, images)
    update.run_estep()
    checkpoint = keras_pcl.callbacks.TrainingCheckpoint(str(tmp_path))
    checkpoint.set_model(model)
    checkpoint.save(epoch=3)
    restored = tiny_pcl(len(images), warmup_epochs=0)
    restored.compile(optimizer=keras.optimizers.SGD(0.01))
    assert keras_pcl.callbacks.TrainingCheckpoint(str(tmp_path)).restore(restored) == 3
    for a, b in zip(restored.prototypes + restored.concentrations + [restored.assignments, restored.prototypes_ready],
                    model.prototypes + model.concentrations + [model.assignments, model.prototypes_ready]):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert restored.prototypes[0].numpy().any()  # really restored, not initial zeros


def test_mixed_bfloat16_keeps_losses_and_clustering_in_float32(digits):
    images = digits[0][:128]
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = keras_pcl.PCL(backbones.small_cnn((8, 8, 1), width=8, norm="split", num_splits=2),
                              backbones.mlp_head(16, 32), num_samples=len(images), num_clusters=(4,),
                              warmup_epochs=1, queue_size=64, momentum=0.9)
        model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9))
        update = keras_pcl.PrototypeUpdate(data.eval_dataset(images), verbose=0)
        history = model.fit(fixed_views(images), epochs=2, callbacks=[update], verbose=0).history
        x = data.to_float(images[:32])
        assert model.backbone(x).dtype == tf.bfloat16  # the encoder really computes in bf16
        terms, outputs = model.forward(Batch((x, x), tf.range(32)), training=False)
        assert all(t.dtype == tf.float32 for t in terms.values())
        assert outputs["queries"][0].dtype == tf.float32 and model.embed_keys(x).dtype == tf.float32
        for variable in [model.queue.keys] + model.prototypes + model.concentrations:
            assert variable.dtype == "float32"
        assert np.isfinite(history["loss"]).all() and history["proto_nce"][1] > 0
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_evaluate_reports_losses_without_changing_state(digits):
    model = tiny_moco()
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    views = fixed_views(digits[0][:64])
    model.fit(views, epochs=1, verbose=0)
    queue, weights = model.queue.keys.numpy().copy(), [w.numpy().copy() for w in model.weights]
    results = model.evaluate(views, verbose=0, return_dict=True)
    assert set(results) == {"loss", "info_nce", "instance_acc"}
    assert results["loss"] == pytest.approx(results["info_nce"]) and results["loss"] > 0
    np.testing.assert_array_equal(model.queue.keys.numpy(), queue)
    for before, after in zip(weights, model.weights):
        np.testing.assert_array_equal(after.numpy(), before)
