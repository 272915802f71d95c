"""Levers on the E-step's embedding compute: batch size and XLA.

The PCL v2 Fashion-MNIST config's momentum encoder (small ResNet, width 32, split
BatchNorm, mixed_bfloat16) embeds 20 480 Fashion-MNIST images already in memory
(no tf.data), in graph mode and with `jit_compile=True`, at batch 256, 512 (what
run.py hands the E-step) and 1024; variants alternate within each round.

    apt-get install -y dataset-fashion-mnist
    python bench/embed_compute_probe.py --rounds=2

Prints one line per variant and round: wall seconds for the images.
"""

import time

import tensorflow as tf
from absl import app, flags

from fashion_pcl_v2 import fashion_mnist_pcl_v2
from keras_pcl import data

flags.DEFINE_integer("rounds", 2, "Rounds over all variants.")
flags.DEFINE_integer("images", 20480, "Images embedded per pass.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    images, model = fashion_mnist_pcl_v2(FLAGS.images)

    def variant(batch_size, jit):
        batches = [data.to_float(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
        embed = tf.function(lambda x: tf.cast(model.embed_keys(x), tf.float32), jit_compile=jit)
        embed(batches[0]).numpy()  # trace / compile outside the timing
        return batches, embed

    variants = {f"batch {size}, jit_compile={jit}": variant(size, jit) for size in (256, 512, 1024)
                for jit in (False, True)}
    for round_index in range(FLAGS.rounds):
        for name, (batches, embed) in variants.items():
            started = time.perf_counter()
            for batch in batches:
                embed(batch).numpy()
            print(f"round {round_index} {name}: {time.perf_counter() - started:.2f} s", flush=True)


if __name__ == "__main__":
    app.run(main)
