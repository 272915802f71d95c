"""One worker of the MultiWorkerMirroredStrategy test (run by tests/test_multiworker.py).

Usage: TF_CONFIG=... python multiworker_worker.py OUT.npz [CHECKPOINTS EPOCHS]
Trains PCL with a feature bank on digits for 3 epochs (warm-up 1: the first
E-step embeds the images, the second clusters the bank of training keys) and
saves the queue, prototypes, bank and key-encoder weights this worker holds.
With CHECKPOINTS, checkpoints every epoch there, resumes from it, and trains
up to EPOCHS.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_pcl  # noqa: E402
from keras_pcl import backbones, data  # noqa: E402

strategy = tf.distribute.MultiWorkerMirroredStrategy(
    communication_options=tf.distribute.experimental.CommunicationOptions(
        implementation=tf.distribute.experimental.CommunicationImplementation.RING))
images = data.load_digits()[0][:256]
options = tf.data.Options()
options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
x = data.to_float(images)
index = np.arange(len(images), dtype=np.int32)
# Global batch 64: each of the 2 workers gets 32 per step.
train = tf.data.Dataset.from_tensor_slices(((x, x), index)).batch(64, drop_remainder=True).with_options(options)
estep = data.eval_dataset(images, 64).with_options(options)
keras.utils.set_random_seed(3)
with strategy.scope():
    model = keras_pcl.PCL(backbones.small_cnn((8, 8, 1), width=8, norm="none"), backbones.mlp_head(16, 32),
                          num_samples=len(images), num_clusters=(5, 8), warmup_epochs=1, queue_size=128,
                          momentum=0.9, shuffle_keys=False, use_feature_bank=True)
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9))
    update = keras_pcl.PrototypeUpdate(estep, verbose=0)
fit_callbacks, epochs, initial_epoch = [update], 3, 0
if len(sys.argv) > 2:
    checkpoint = keras_pcl.callbacks.TrainingCheckpoint(sys.argv[2])
    initial_epoch, epochs = checkpoint.restore(model), int(sys.argv[3])
    fit_callbacks.append(checkpoint)
    print(f"starting at epoch {initial_epoch}", flush=True)
history = model.fit(train, epochs=epochs, initial_epoch=initial_epoch, callbacks=fit_callbacks, verbose=0).history
np.savez(sys.argv[1], queue=model.queue.keys.numpy(), pointer=model.queue.pointer.numpy(),
         bank=model.feature_bank.numpy(),
         assignments=model.assignments.numpy(), proto_nce=np.array(history["proto_nce"], np.float64),
         **{f"prototypes_{m}": p.numpy() for m, p in enumerate(model.prototypes)},
         **{f"key_{i}": w.numpy() for i, w in enumerate(model.key_backbone.weights + model.key_head.weights)})
if len(sys.argv) > 2:
    writes_to = os.path.relpath(checkpoint._write_directory, sys.argv[2])
    print(f"checkpoint writer: chief={checkpoint._is_chief} writes to {writes_to}", flush=True)
print("worker done", flush=True)
