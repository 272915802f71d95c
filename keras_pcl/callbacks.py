"""Callbacks: `PrototypeUpdate` (PCL's E-step), `TrainingCheckpoint` (state, history, signals),
`NonFiniteLossGuard`."""

import json
import os
import shutil
import signal
import sys
import threading
import time

import numpy as np
import keras
import tensorflow as tf

from keras_pcl import clustering
from keras_pcl.errors import InvalidInputError, OutputWriteError, writing  # noqa: F401 (public here too)


def embedding_step(embed_fn):
    """A compiled `batch -> (features float32, index int32)` step for `embed_dataset`.

    Build it once and pass it to every call: a new one re-traces the encoder.
    """

    @tf.function
    def step(batch):
        images, index = batch[0], batch[1]
        return tf.cast(embed_fn(images), tf.float32), tf.cast(index, tf.int32)

    return step


def embed_dataset(embed_fn, dataset, num_samples, strategy=None, verbose=0, step=None):
    """Embeds every image of an `(image, index, ...)` dataset, rows in index order.

    Under a multi-replica strategy the batches are spread over replicas and
    gathered back; rows are placed by index, so order and uneven last batches
    never matter.

    Args:
        step: an `embedding_step(embed_fn)` to reuse across calls (one is made if None).

    Returns:
        `[num_samples, d]` float32 tensor.
    """
    strategy = strategy or tf.distribute.get_strategy()
    distributed = strategy.num_replicas_in_sync > 1
    multi_worker = distributed and len(strategy.extended.worker_devices) < strategy.num_replicas_in_sync
    step = step or embedding_step(embed_fn)

    # A progress bar where a person watches; a non-interactive log gets the summary line only.
    interactive = verbose and hasattr(sys.stdout, "isatty") and sys.stdout.isatty()
    progress = keras.utils.Progbar(num_samples, unit_name="image") if interactive else None
    rows, indices = [], []
    # With tf.data's autotuning on, 9 of 18 idle passes here stalled by ~4 s (5.9 s of compute
    # took 10.2 s); with it off, none of 6 did (bench/results/embed_pass_probe*.log).
    options = tf.data.Options()
    options.autotune.enabled = False
    dataset = dataset.with_options(options)
    if distributed:
        dataset = strategy.experimental_distribute_dataset(dataset)
    for batch in dataset:
        if distributed:
            features, index = strategy.run(step, args=(batch,))
            if multi_worker:
                features, index = strategy.gather(features, axis=0), strategy.gather(index, axis=0)
            else:  # every replica is local: no collective needed
                features, index = (tf.concat(strategy.experimental_local_results(t), axis=0)
                                   for t in (features, index))
        else:
            features, index = step(batch)
        rows.append(features)
        indices.append(index)
        if progress is not None:
            progress.add(int(index.shape[0]))
    features, index = tf.concat(rows, axis=0), tf.concat(indices, axis=0)
    seen = np.zeros(num_samples, bool)
    index_np = index.numpy()
    if index_np.min() < 0 or index_np.max() >= num_samples:
        raise InvalidInputError(f"dataset indices must lie in [0, {num_samples}); got {index_np.min()}..{index_np.max()}.")
    seen[index_np] = True
    if not seen.all():
        raise InvalidInputError(
            f"the E-step dataset covered {seen.sum()} of {num_samples} samples; pass the whole "
            "training set, unshuffled and without dropping the last batch (keras_pcl.data.eval_dataset)."
        )
    return tf.scatter_nd(index[:, None], features, [num_samples, features.shape[1]])


class PrototypeUpdate(keras.callbacks.Callback):
    """PCL's E-step: clusters the momentum-encoder embeddings at the start of each epoch.

    From epoch `model.warmup_epochs` on (every `every_n_epochs` epochs), it
    embeds every training image with the momentum encoder and the evaluation
    transform, runs k-means for each K in `model.num_clusters` and computes
    the concentration phi, all as one compiled TensorFlow function, then
    writes prototypes, phi and assignments into the model. A model built
    with `use_feature_bank=True` is embedded once, at the first E-step; later
    E-steps cluster its bank of training keys.

    Args:
        dataset: the training images as `(image, index)` batches with the
            evaluation transform (`keras_pcl.data.eval_dataset(images)`).
        every_n_epochs: E-step frequency after the warm-up (1 in the reference).
        num_iters, num_restarts, tol, init: k-means options (`keras_pcl.clustering.kmeans`).
        alpha: phi smoothing (10 in the reference).
        jit_compile: "auto" (XLA on GPU/TPU; on CPU, XLA for the granularities
            with few clusters, see `keras_pcl.clustering.kmeans`), True or False.
        seed: k-means seed; granularity m uses `seed + m` (as the reference).
        verbose: 1 prints progress and a one-line summary per E-step.

    After each E-step `self.stats` holds its timings (`estep_embed_seconds`,
    `estep_cluster_seconds`) and, per granularity, cluster-size and phi
    statistics; they are also added to the epoch logs (TensorBoard). On later
    epochs without an E-step the timings read 0 and the statistics are those of
    the prototypes still in use.

    Example:
    >>> update = PrototypeUpdate(keras_pcl.data.eval_dataset(images))
    >>> model.fit(train_ds, epochs=20, callbacks=[update])  # doctest: +SKIP
    """

    def __init__(self, dataset, every_n_epochs=1, num_iters=20, num_restarts=1, tol=1e-3,
                 init="random", alpha=10.0, jit_compile="auto", seed=0, verbose=1):
        super().__init__()
        if every_n_epochs < 1:
            raise InvalidInputError(f"every_n_epochs must be >= 1, got {every_n_epochs}.")
        self.dataset, self.every_n_epochs = dataset, int(every_n_epochs)
        self.kmeans_options = dict(num_iters=int(num_iters), num_restarts=int(num_restarts),
                                   tol=float(tol), init=init)
        self.alpha, self.jit_compile, self.seed, self.verbose = alpha, jit_compile, seed, verbose
        self.stats = {}
        self._estep_fn = self._embed_step = None

    def _compiled_estep(self, model):
        # One XLA function when every granularity wants XLA (GPU/TPU); otherwise a graph
        # in which the granularities that want XLA (few clusters on CPU) nest one each.
        jit = all(clustering.resolve_jit_compile(self.jit_compile, k, model.num_samples)
                  for k in model.num_clusters)

        def estep(features):
            return clustering.prototype_estep(
                features, model.num_clusters, temperature=model.phi_mean, alpha=self.alpha,
                seed=self.seed, jit_compile=self.jit_compile, **self.kmeans_options,
            )

        return tf.function(estep, jit_compile=jit)

    def should_run(self, epoch):
        start = self.model.warmup_epochs
        return epoch >= start and (epoch - start) % self.every_n_epochs == 0

    def on_epoch_begin(self, epoch, logs=None):
        if self.should_run(epoch):
            self.run_estep()
        elif self.stats:
            # No E-step this epoch: it took no time (an epoch's logs must not repeat the
            # last E-step's timers); the cluster statistics still describe the prototypes in use.
            self.stats.update(estep_embed_seconds=0.0, estep_cluster_seconds=0.0)

    def run_estep(self):
        """Embeds, clusters and updates the model now; returns the per-granularity results."""
        model = self.model
        from keras_pcl.models.pcl import PCL

        if not isinstance(model, PCL):
            raise InvalidInputError(f"PrototypeUpdate is PCL's E-step; a {type(model).__name__} has no k-means "
                                    "prototypes to update. Drop the callback or train keras_pcl.PCL.")
        if self._estep_fn is None:  # traced once, reused by every E-step
            self._estep_fn = self._compiled_estep(model)
            self._embed_step = embedding_step(model.embed_keys)
        has_bank = model.use_feature_bank
        from_bank = has_bank and int(model.prototypes_ready.numpy())
        if self.verbose:
            print("E-step: clustering the bank of training keys" if from_bank else
                  f"E-step: embedding {model.num_samples} images with the momentum encoder")
        started = time.perf_counter()
        if from_bank:
            features = tf.convert_to_tensor(model.feature_bank.value)
        else:
            features = embed_dataset(
                model.embed_keys, self.dataset, model.num_samples,
                strategy=model.distribute_strategy, verbose=self.verbose, step=self._embed_step,
            )
            if has_bank:
                model.feature_bank.assign(features)
        embedded = time.perf_counter()
        results = self._estep_fn(features)
        model.set_prototypes(results)
        finished = time.perf_counter()
        self.stats = {"estep_embed_seconds": embedded - started, "estep_cluster_seconds": finished - embedded}
        for k, (_, phi, assignments) in zip(model.num_clusters, results):
            sizes = np.bincount(assignments.numpy(), minlength=k)
            self.stats.update({
                f"k{k}_empty_clusters": float((sizes == 0).sum()),
                f"k{k}_largest_cluster": float(sizes.max()),
                f"k{k}_phi_min": float(np.min(phi)),
                f"k{k}_phi_max": float(np.max(phi)),
            })
        if self.verbose:
            print(f"E-step: {finished - started:.1f} s (embedding {embedded - started:.1f} s, clustering "
                  f"{finished - embedded:.1f} s); " + ", ".join(
                f"K={k}: {int(self.stats[f'k{k}_empty_clusters'])} empty, largest "
                f"{int(self.stats[f'k{k}_largest_cluster'])}, phi "
                f"{self.stats[f'k{k}_phi_min']:.3f}-{self.stats[f'k{k}_phi_max']:.3f}"
                for k in model.num_clusters))
        return results

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and self.stats:
            logs.update(self.stats)


class TrainingInterrupted(Exception):
    """Training stopped on SIGINT or SIGTERM; a checkpoint of that step was saved.

    `signum` is the signal, `epoch` (from 1) and `step` (steps done in that
    epoch) where it stopped. Running `fit` again from `TrainingCheckpoint.restore`
    resumes there (at the start of that epoch, with the weights of the moment and
    the step counter of the epoch's start).
    """

    def __init__(self, signum, epoch, step):
        super().__init__(f"interrupted at epoch {epoch}, step {step}; run the same command to resume")
        self.signum, self.epoch, self.step = signum, epoch, step


class TrainingCheckpoint(keras.callbacks.Callback):
    """Saves the whole training state, its history, and resumes from it; stops cleanly on signals.

    The state is the model's variables (encoders, heads, queues, prototypes,
    ...), the optimizer's variables, the number of finished epochs and the
    history of their logs (`history`: one row per finished epoch, each key a
    list), written with `tf.train.CheckpointManager`: a checkpoint and the
    epoch rows it records become current together, once complete, so a kill at
    any moment loses no row and duplicates none. Place it after the callbacks
    that add to the epoch logs (kNN monitors, timers): it saves what they wrote.

    On SIGINT or SIGTERM during `fit` it saves a checkpoint at the next step
    boundary and raises `TrainingInterrupted`; a second SIGINT aborts at once
    (`KeyboardInterrupt`). Outside `fit` the signals keep their usual effect.
    A failure to write a checkpoint (disk full, read-only) raises
    `OutputWriteError`; the newest complete checkpoint stays the one restored.

    Args:
        directory: checkpoint folder.
        save_every_steps: also save every this many steps (0: only at epoch ends).
        max_to_keep: checkpoints kept.
        signals: signals that stop training with a checkpoint (empty: none;
            only where `fit` runs in the main thread).

    Example:
    >>> checkpoint = TrainingCheckpoint("run/checkpoints")
    >>> initial_epoch = checkpoint.restore(model)  # doctest: +SKIP
    >>> model.fit(ds, epochs=100, initial_epoch=initial_epoch, callbacks=[checkpoint])  # doctest: +SKIP
    >>> checkpoint.history["loss"]  # every epoch's, over all the runs that resumed  # doctest: +SKIP

    A checkpoint taken mid-epoch resumes at the start of that epoch with the
    weights of the moment it was saved: the steps of that epoch done before the
    stop run again (`replayed_steps` after `restore`). The optimizer's step
    counter goes back to the epoch's start, so the learning-rate schedule (and
    anything else keyed to the step: momentum schedules, frozen prototypes) stays
    on its epochs instead of running ahead by the replayed steps and ending early.
    There is no separate random state: with
    `keras_pcl.data.contrastive_dataset(..., epochs=E, initial_epoch=e)` the data
    and augmentations are functions of (seed, epoch, step), and the models'
    random draws of the optimizer step, so an epoch-boundary resume is exact.
    """

    def __init__(self, directory, save_every_steps=0, max_to_keep=3, signals=(signal.SIGINT, signal.SIGTERM)):
        super().__init__()
        self.directory, self.save_every_steps, self.max_to_keep = directory, int(save_every_steps), max_to_keep
        self.signals = tuple(signals)
        self._epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
        self._history = tf.Variable("{}", dtype=tf.string, trainable=False)
        self._step = tf.Variable(0, dtype=tf.int64, trainable=False)  # steps done in the unfinished epoch
        self.history, self.replayed_steps = {}, 0
        self._manager = None
        self._current_epoch = 0
        self._is_chief, self._write_directory = True, directory
        self._previous_handlers, self._requested, self._training = {}, None, False

    def _get_manager(self, model):
        if self._manager is None:
            # Under MultiWorkerMirroredStrategy every worker must save (reading
            # synchronised variables is collective), but only the chief keeps its
            # files; the others write to a scratch folder removed after each save.
            # The strategy decides who is chief, from whichever cluster resolver
            # it was built with (TF_CONFIG, Slurm, ...).
            strategy = getattr(model, "distribute_strategy", None) or tf.distribute.get_strategy()
            self._is_chief = bool(strategy.extended.should_checkpoint)
            if not self._is_chief:
                resolver = strategy.cluster_resolver
                self._write_directory = os.path.join(
                    self.directory, f".scratch_{resolver.task_type}_{resolver.task_id}")
            if model.optimizer is not None and not model.optimizer.built:
                # Inside the model's strategy: restore() may run before fit, outside any scope.
                with getattr(model, "distribute_strategy", tf.distribute.get_strategy()).scope():
                    model.optimizer.build(model.trainable_variables)
            checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer, epoch=self._epoch,
                                             history=self._history, step=self._step)
            self._manager = tf.train.CheckpointManager(checkpoint, self._write_directory,
                                                       max_to_keep=self.max_to_keep)
        return self._manager

    def restore(self, model):
        """Restores the newest checkpoint into `model`; returns the epoch to resume at (0 if none).

        `history` then holds the rows of the epochs that checkpoint had finished, and
        `replayed_steps` the steps of the next epoch it had done (run again; the
        optimizer's step counter is set back by as many).
        Every worker of a multi-worker job restores the chief's newest checkpoint.
        """
        manager = self._get_manager(model)
        latest = tf.train.latest_checkpoint(self.directory)
        self.history, self.replayed_steps = {}, 0
        if latest is None:
            return 0
        # expect_partial: a checkpoint written before the history (or the step) was saved has none.
        self._step.assign(0)
        manager.checkpoint.restore(latest).expect_partial().assert_existing_objects_matched()
        self.history = json.loads(self._history.numpy().decode() or "{}")
        self.replayed_steps = int(self._step.numpy())
        if self.replayed_steps and model.optimizer is not None:
            model.optimizer.iterations.assign_sub(self.replayed_steps)
        return int(self._epoch.numpy())

    def save(self, epoch, step=0):
        """Saves the state with `epoch` epochs finished and `step` steps of the next; returns the checkpoint's path."""
        self._epoch.assign(epoch)
        self._step.assign(step)
        self._history.assign(json.dumps(self.history))
        with writing(self._write_directory):
            # Numbered by the checkpoint's own save counter, not the step: an epoch resumed from a
            # mid-epoch checkpoint runs steps again whose numbers are taken, the newest among them.
            path = self._get_manager(self.model).save()
        if not self._is_chief:
            shutil.rmtree(self._write_directory, ignore_errors=True)
        return path

    # Signals ----------------------------------------------------------------------
    def _on_signal(self, signum, frame):
        if not self._training:  # fit ended without on_train_end (an exception): the usual effect
            self._release_signals()
            previous = signal.getsignal(signum)
            if callable(previous):
                previous(signum, frame)
            elif signum == signal.SIGINT:
                raise KeyboardInterrupt
            else:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            return
        if self._requested == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: abort now
        self._requested = signum

    def _catch_signals(self):
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in self.signals:
            self._previous_handlers[signum] = signal.signal(signum, self._on_signal)

    def _release_signals(self):
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}

    # Callback hooks -----------------------------------------------------------------
    def on_train_begin(self, logs=None):
        self._requested, self._training = None, True
        self._catch_signals()

    def on_train_end(self, logs=None):
        self._training = False
        self._release_signals()

    def on_epoch_begin(self, epoch, logs=None):
        self._current_epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self._requested is not None:
            signum, self._requested = self._requested, None
            self.save(self._current_epoch, batch + 1)
            self._training = False
            self._release_signals()
            raise TrainingInterrupted(signum, self._current_epoch + 1, batch + 1)
        if self.save_every_steps and (batch + 1) % self.save_every_steps == 0:
            self.save(self._current_epoch, batch + 1)

    def on_epoch_end(self, epoch, logs=None):
        row = {key: _json_number(value) for key, value in (logs or {}).items()}
        self.history.setdefault("epoch", [])
        done = len(self.history["epoch"])
        for key in set(row) - set(self.history):
            self.history[key] = [None] * done
        for key in self.history:
            self.history[key].append(epoch + 1 if key == "epoch" else row.get(key))
        self.save(epoch + 1)


def _json_number(value):
    value = float(np.asarray(value).reshape(-1)[0])
    return value if np.isfinite(value) else None


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/Inf loss; the message names the step and the loss terms."""


class NonFiniteLossGuard(keras.callbacks.Callback):
    """Stops training at the first step whose loss (or any loss term) is NaN or Inf.

    It raises `NonFiniteLossError` from the batch callback, so `fit` ends
    before later callbacks of that step or the epoch end run: place it before
    `TrainingCheckpoint` and no checkpoint of the broken state is written;
    the last good checkpoint stays the newest.

    Args:
        terms: log keys checked besides "loss" (default: the loss terms the
            model declares, `model.loss_names`).
    """

    def __init__(self, terms=None):
        super().__init__()
        self.terms = terms
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        logs = logs or {}
        terms = ("loss",) + tuple(self.terms or self.model.loss_names)
        bad = [k for k in terms if k in logs and not np.isfinite(float(logs[k]))]
        if bad:
            step = int(self.model.optimizer.iterations.numpy())
            self.model.stop_training = True
            raise NonFiniteLossError(
                f"non-finite loss at step {step} (epoch {self._epoch + 1}, batch {batch + 1}) in "
                f"{', '.join(k for k in bad if k != 'loss') or 'loss'}; training stopped, the last "
                "checkpoint is kept. Lower the learning rate or check the inputs."
            )
