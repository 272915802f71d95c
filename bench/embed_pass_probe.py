"""Where the E-step's embedding pass spends its time: the same 50 000 Fashion-MNIST images
through the PCL v2 config's momentum encoder (small ResNet, width 32, mixed_bfloat16),
fed four ways, then the compute alone on batches already in memory. The first log
(bench/results/embed_pass_probe.log) compared the pipelines before `embed_dataset`
turned tf.data autotuning off; this version compares the E-step as it is with the old loop.

    apt-get install -y dataset-fashion-mnist
    python bench/embed_pass_probe.py --rounds=2

Prints one line per variant and round: wall seconds of the whole pass.
"""

import time

import numpy as np
import tensorflow as tf
from absl import app, flags

from fashion_pcl_v2 import fashion_mnist_pcl_v2
from keras_pcl import callbacks, data

flags.DEFINE_integer("rounds", 2, "Rounds over all variants.")
flags.DEFINE_integer("images", 50000, "Training images embedded per pass.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    images, model = fashion_mnist_pcl_v2(FLAGS.images)
    step = callbacks.embedding_step(model.embed_keys)
    eval_ds = data.eval_dataset(images, 512, 28)  # what run.py hands the E-step
    plain = (tf.data.Dataset.from_tensor_slices((images, np.arange(len(images), dtype=np.int32)))
             .batch(512).map(lambda x, i: (data.to_float(x), i)))

    @tf.function
    def whole_pass(ds):
        rows = tf.TensorArray(tf.float32, size=0, dynamic_size=True, infer_shape=False)
        for batch in ds:
            rows = rows.write(rows.size(), tf.cast(model.embed_keys(batch[0]), tf.float32))
        return rows.concat()

    def compute_only():
        batches = list(eval_ds)
        started = time.perf_counter()
        for batch in batches:
            step(batch)[0].numpy()
        return time.perf_counter() - started

    def python_loop(ds):  # embed_dataset's loop as it was, without its dataset options
        return [step(batch)[0].numpy() for batch in ds]

    variants = {
        "embed_dataset (the E-step; tf.data autotune off)": lambda: callbacks.embed_dataset(
            model.embed_keys, eval_ds, len(images), step=step),
        "loop over eval_dataset, autotune on (before)": lambda: python_loop(eval_ds),
        "loop over a sequential map, no prefetch": lambda: python_loop(plain),
        "one tf.function over eval_dataset": lambda: whole_pass(eval_ds),
    }
    for round_index in range(FLAGS.rounds):
        for name, run in variants.items():
            started = time.perf_counter()
            run()
            print(f"round {round_index} {name}: {time.perf_counter() - started:.2f} s", flush=True)
        print(f"round {round_index} compute only (batches in memory): {compute_only():.2f} s", flush=True)


if __name__ == "__main__":
    app.run(main)
