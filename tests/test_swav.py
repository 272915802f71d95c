"""SwAV's own mechanics: prototype re-normalisation and freeze, multi-crop, the queue, 2 replicas
with the queue in use, the assign endpoint and the collapse monitors (the shared checks are in
test_methods.py, the loss and Sinkhorn against NumPy in test_losses.py)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_pcl
from keras_pcl import backbones, data, losses
from keras_pcl.models import Batch, heads


def swav(**kwargs):
    options = dict(num_prototypes=12)
    options.update(kwargs)
    return keras_pcl.SwAV(backbones.small_cnn((8, 8, 1), width=8, norm="none"),
                          heads.mlp(16, (32,), batch_norm=True), **options)


def views(images, small=2):
    x = data.to_float(images)
    return (x, x[:, :, ::-1]) + tuple([x[:, :4, :4], x[:, 4:, 4:]][:small])


def dataset(images, small=2, batch=16):
    return tf.data.Dataset.from_tensor_slices({"views": views(images, small)}).batch(batch, drop_remainder=True)


def unit_columns(kernel):
    return kernel / np.linalg.norm(kernel, axis=0, keepdims=True)


def test_prototypes_are_renormalised_before_every_step(digits):
    model = swav()
    model.compile(optimizer=keras.optimizers.SGD(0.0))
    kernel = model.prototypes.kernel
    kernel.assign(5.0 * kernel.numpy())
    model.train_step({"views": views(digits[0][:16])})
    np.testing.assert_allclose(np.linalg.norm(kernel.numpy(), axis=0), 1.0, rtol=1e-5)


def test_prototypes_stay_frozen_for_freeze_prototypes_steps(digits):
    keras.utils.set_random_seed(0)
    model = swav(freeze_prototypes_steps=2)
    model.compile(optimizer=keras.optimizers.SGD(0.5))
    batch = {"views": views(digits[0][:16])}
    seen, encoder = [], []
    for _ in range(4):
        seen.append(unit_columns(model.prototypes.kernel.numpy()))
        encoder.append(model.backbone.trainable_weights[0].numpy().copy())
        model.train_step(batch)
    seen.append(unit_columns(model.prototypes.kernel.numpy()))
    np.testing.assert_allclose(seen[1], seen[0], atol=1e-6)  # steps 0 and 1: frozen
    np.testing.assert_allclose(seen[2], seen[0], atol=1e-6)
    assert np.abs(seen[3] - seen[2]).max() > 1e-4  # step 2 trains them
    assert np.abs(encoder[1] - encoder[0]).max() > 1e-6  # the encoder trains from step 0


def test_the_default_freeze_is_one_epoch_of_fit(digits):
    keras.utils.set_random_seed(0)
    model = swav()
    model.compile(optimizer=keras.optimizers.SGD(0.5))
    start = unit_columns(model.prototypes.kernel.numpy())
    model.fit(dataset(digits[0][:64]), epochs=1, verbose=0)  # 4 steps: all frozen
    assert int(model.epoch_steps.numpy()) == 4
    np.testing.assert_allclose(unit_columns(model.prototypes.kernel.numpy()), start, atol=1e-6)
    model.fit(dataset(digits[0][:64]), epochs=2, initial_epoch=1, verbose=0)
    assert np.abs(unit_columns(model.prototypes.kernel.numpy()) - start).max() > 1e-4


def test_the_loss_is_swapped_prediction_over_every_crop(digits):
    keras.utils.set_random_seed(1)
    model = swav()
    two, four = views(digits[0][:16], 0), views(digits[0][:16], 2)
    terms, outputs = model.forward(Batch(four), training=False)
    scores = [model.prototypes(model.embed(v)) for v in four]
    want = losses.swav(scores, 2, model.temperature, model.epsilon, model.sinkhorn_iterations)
    np.testing.assert_allclose(terms["swav"].numpy(), want.numpy(), rtol=1e-5)
    without_small = model.forward(Batch(two), training=False)[0]["swav"]
    assert np.abs(without_small.numpy() - terms["swav"].numpy()).max() > 1e-4  # the small crops count
    assert scores[0].dtype == tf.float32 and outputs["code_entropy"].shape == (32, 12)
    with pytest.raises(keras_pcl.InvalidInputError, match="at least 2 views"):
        model.unpack_batch({"views": four[:1]})


def test_the_queue_fills_from_its_epoch_and_joins_sinkhorn_once_full(digits):
    keras.utils.set_random_seed(2)
    model = swav(queue_size=32, queue_start_epoch=1)
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    ds = dataset(digits[0][:64])
    model.fit(ds, epochs=1, verbose=0)
    assert [int(q.filled.numpy()) for q in model.queues] == [0, 0]  # epoch 0: not yet
    model.fit(ds, epochs=2, initial_epoch=1, verbose=0)  # epoch 1: 4 steps of 16 fill the 32 rows
    for queue in model.queues:
        assert int(queue.filled.numpy()) == 32 and np.abs(queue.keys.numpy()).sum(1).min() > 0
        np.testing.assert_allclose(np.linalg.norm(queue.keys.numpy(), axis=1), 1.0, rtol=1e-5)
    # A full queue changes the codes, hence the loss; an empty one leaves it out.
    batch = Batch(views(digits[0][:16]))
    with_queue = model.forward(batch, training=False)[0]["swav"].numpy()
    for queue in model.queues:
        queue.filled.assign(0)
    without = model.forward(batch, training=False)[0]["swav"].numpy()
    assert np.abs(with_queue - without).max() > 1e-4
    scores = [model.prototypes(model.embed(v)) for v in batch.views]
    np.testing.assert_allclose(without, losses.swav(scores, 2, model.temperature, model.epsilon).numpy(), rtol=1e-5)


def test_two_replicas_match_one_with_the_queue_in_use(digits, mirrored):
    """Five steps of 16 with a 32-row queue filled from step 0: steps 2-4 use it in Sinkhorn,
    whose sums are all-reduced; every step's loss and the final state match one device."""
    def build():
        keras.utils.set_random_seed(3)
        model = swav(queue_size=32, queue_start_epoch=0, freeze_prototypes_steps=1)
        model.compile(optimizer=keras.optimizers.SGD(0.1))
        return model

    single = build()
    with mirrored.scope():
        replicated = build()
    ds = dataset(digits[0][:80])

    class Losses(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.values = []

        def on_train_batch_end(self, batch, logs=None):
            self.values.append(float(logs["swav"]))

    one, two = Losses(), Losses()
    single.fit(ds, epochs=1, callbacks=[one], verbose=0)
    replicated.fit(ds, epochs=1, callbacks=[two], verbose=0)
    assert len(one.values) == 5
    np.testing.assert_allclose(two.values, one.values, rtol=1e-4)
    for variable, reference in zip(replicated.weights, single.weights):
        copies = [np.asarray(c) for c in variable.value.values]
        np.testing.assert_array_equal(copies[0], copies[1], err_msg=variable.path)
        np.testing.assert_allclose(copies[0], np.asarray(reference), atol=1e-4, rtol=1e-3, err_msg=variable.path)
    assert int(replicated.queue_0.filled.numpy()) == 32


def test_assign_serves_the_nearest_learnt_prototype_and_its_cosine(digits):
    keras.utils.set_random_seed(4)
    model = swav()
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    model.fit(dataset(digits[0][:64]), epochs=2, verbose=0)
    x = data.to_float(digits[0][100:120])
    served = model.serving_endpoints()["assign"](x)
    z = model.embed(x).numpy()
    cosine = z @ unit_columns(model.prototypes.kernel.numpy())
    np.testing.assert_array_equal(served["prototype"].numpy()[:, 0], cosine.argmax(1))
    np.testing.assert_allclose(served["similarity"].numpy()[:, 0], cosine.max(1), rtol=1e-5)
    assert served["prototype"].shape == (20, 1)


def test_monitors_tell_a_collapse_from_a_spread(digits):
    """Every embedding equal: one prototype nearest to all and no spread; after two epochs: spread."""
    keras.utils.set_random_seed(5)
    model = swav(num_prototypes=40, freeze_prototypes_steps=0)
    model.compile(optimizer=keras.optimizers.SGD(0.2, momentum=0.9))
    model.fit(dataset(digits[0][:256]), epochs=2, verbose=0)
    x = data.to_float(digits[0][:64])
    _, outputs = model.forward(Batch((x, x)), training=False)
    usage = keras_pcl.metrics.PrototypeUsage(40)
    usage.update_state(outputs["prototypes_used"])
    assert float(usage.result()) > 3 and float(outputs["output_std"]) > 0.01
    constant = tf.zeros_like(x) + 0.5
    _, collapsed = model.forward(Batch((constant, constant)), training=False)
    usage.reset_state()
    usage.update_state(collapsed["prototypes_used"])
    assert float(usage.result()) == 1 and float(collapsed["output_std"]) < 1e-6
    entropy = keras_pcl.metrics.MeanCodeEntropy(40)
    entropy.update_state(tf.fill([8, 40], 1 / 40))
    assert float(entropy.result()) == pytest.approx(np.log(40), rel=1e-6)
    entropy.reset_state()
    entropy.update_state(tf.one_hot([3, 3, 3, 3], 40))
    assert float(entropy.result()) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_prototypes=1), "num_prototypes"), (dict(epsilon=0.0), "epsilon"), (dict(temperature=-1), "temperature"),
    (dict(sinkhorn_iterations=0), "sinkhorn_iterations"), (dict(num_large_crops=0), "num_large_crops"),
    (dict(queue_size=-32), "queue_size"), (dict(queue_start_epoch=-1), "queue_start_epoch"),
    (dict(freeze_prototypes_steps=-5), "freeze_prototypes_steps"),
])
def test_swav_rejects_bad_arguments(kwargs, message):
    with pytest.raises(keras_pcl.InvalidInputError, match=message):
        swav(**kwargs)


def test_a_queue_not_a_multiple_of_the_batch_is_refused(digits):
    model = swav(queue_size=40)
    model.compile(optimizer="sgd")
    with pytest.raises(keras_pcl.InvalidInputError, match="not a multiple of the global batch size 16"):
        model.fit(dataset(digits[0][:32]), epochs=1, verbose=0)
