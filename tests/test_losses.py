"""Losses against slow, obvious NumPy references on random inputs."""

import numpy as np
import pytest
import tensorflow as tf

from keras_pcl import losses


def normalized(rng, *shape):
    x = rng.normal(size=shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def log_softmax_at(logits, target):
    m = logits.max()
    return logits[target] - m - np.log(np.exp(logits - m).sum())


def reference_info_nce(q, k, queue, t):
    out = []
    for i in range(len(q)):
        logits = np.array([q[i] @ k[i]] + [q[i] @ n for n in queue]) / t
        out.append(-log_softmax_at(logits, 0))
    return np.array(out)


def reference_proto_nce(q, prototypes, phi, assignments):
    out = []
    for i in range(len(q)):
        logits = np.array([q[i] @ prototypes[j] / phi[j] for j in range(len(prototypes))])
        out.append(-log_softmax_at(logits, assignments[i]))
    return np.array(out)


@pytest.mark.parametrize("batch,dim,queue_len", [(4, 8, 16), (7, 3, 5), (1, 16, 64)])
@pytest.mark.parametrize("temperature", [0.07, 0.2, 1.0])
def test_info_nce_matches_reference(rng, batch, dim, queue_len, temperature):
    q, k, queue = normalized(rng, batch, dim), normalized(rng, batch, dim), normalized(rng, queue_len, dim)
    got = losses.info_nce(q, k, queue, temperature).numpy()
    assert got.shape == (batch,)
    np.testing.assert_allclose(got, reference_info_nce(q, k, queue, temperature), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch,dim,num_prototypes", [(5, 8, 6), (16, 4, 30), (1, 3, 2)])
@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_proto_nce_matches_reference(rng, batch, dim, num_prototypes, temperature):
    q, prototypes = normalized(rng, batch, dim), normalized(rng, num_prototypes, dim)
    phi = rng.uniform(0.5, 1.5, num_prototypes).astype(np.float32) * temperature
    assignments = rng.integers(0, num_prototypes, batch)
    got = losses.proto_nce(q, prototypes, phi, assignments).numpy()
    np.testing.assert_allclose(got, reference_proto_nce(q, prototypes, phi, assignments), rtol=1e-5, atol=1e-5)


def test_losses_run_in_float32_for_bfloat16_inputs(rng):
    q, k, queue = normalized(rng, 4, 8), normalized(rng, 4, 8), normalized(rng, 8, 8)
    got = losses.info_nce(tf.cast(q, tf.bfloat16), tf.cast(k, tf.bfloat16), queue, 0.2)
    assert got.dtype == tf.float32


def test_negative_prototypes_exclude_batch_positives(rng):
    assignments = np.array([3, 3, 7, 0, 12])
    ids, valid = losses.sample_negative_prototypes(assignments, 20, 10, seed=[1, 2])
    ids, valid = ids.numpy(), valid.numpy()
    assert valid.all() and len(set(ids)) == 10
    assert not set(ids) & set(assignments)
    # More negatives asked than exist: the surplus is flagged invalid.
    small = np.array([3, 3, 7, 0])
    ids, valid = losses.sample_negative_prototypes(small, 8, 8, seed=[1, 2])
    assert valid.numpy().sum() == 8 - len(set(small))
    assert not set(ids.numpy()[valid.numpy()]) & set(small)


def reference_sampled_proto_nce(q, prototypes, phi, assignments, negatives):
    """Softmax over the batch's distinct positives plus the given negatives."""
    columns = list(dict.fromkeys(assignments.tolist())) + list(negatives)
    out = []
    for i in range(len(q)):
        logits = np.array([q[i] @ prototypes[j] / phi[j] for j in columns])
        out.append(-log_softmax_at(logits, columns.index(assignments[i])))
    return np.array(out)


@pytest.mark.parametrize("num_negatives", [1, 4, 50])
def test_sampled_proto_nce_matches_reference(rng, num_negatives):
    q, prototypes = normalized(rng, 12, 6), normalized(rng, 20, 6)
    phi = rng.uniform(0.05, 0.3, 20).astype(np.float32)
    assignments = rng.integers(0, 6, 12)  # many duplicate positives
    seed = tf.constant([5, 1])
    ids, valid = losses.sample_negative_prototypes(assignments, 20, num_negatives, seed)
    negatives = ids.numpy()[valid.numpy()]
    got = losses.sampled_proto_nce(q, prototypes, phi, assignments, num_negatives, seed).numpy()
    want = reference_sampled_proto_nce(q, prototypes, phi, assignments, negatives)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_sampled_proto_nce_with_all_negatives_is_exact(rng):
    q, prototypes = normalized(rng, 9, 5), normalized(rng, 15, 5)
    phi = rng.uniform(0.1, 0.3, 15).astype(np.float32)
    assignments = rng.integers(0, 15, 9)
    exact = losses.proto_nce(q, prototypes, phi, assignments).numpy()
    sampled = losses.sampled_proto_nce(q, prototypes, phi, assignments, 15, seed=[0, 0]).numpy()
    np.testing.assert_allclose(sampled, exact, rtol=1e-5, atol=1e-5)
