"""Levers on the E-step's embedding compute: batch size and XLA.

The PCL v2 Fashion-MNIST config's momentum encoder (small ResNet, width 32, split
BatchNorm, mixed_bfloat16) embeds 20 480 Fashion-MNIST images already in memory
(no tf.data), in graph mode and with `jit_compile=True`, at batch 256, 512 (what
run.py hands the E-step) and 1024; variants alternate within each round.

    apt-get install -y dataset-fashion-mnist
    python bench/embed_compute_probe.py --rounds=2
    python bench/embed_compute_probe.py --profile [--policy=float32]   # where the pass spends its time

Prints one line per variant and round: wall seconds for the images. With
`--profile`, instead profiles one graph-mode pass at batch 512 and prints op time by op
type (TensorFlow's profiler, summed over threads).
"""

import time

import tensorflow as tf
from absl import app, flags

from fashion_pcl_v2 import fashion_mnist_pcl_v2
from keras_pcl import data

flags.DEFINE_integer("rounds", 2, "Rounds over all variants.")
flags.DEFINE_integer("images", 20480, "Images embedded per pass.")
flags.DEFINE_boolean("profile", False, "Profile one graph-mode pass at batch 512 instead of timing variants.")
flags.DEFINE_enum("policy", "mixed_bfloat16", ["mixed_bfloat16", "float32"], "Keras dtype policy of the encoder.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    images, model = fashion_mnist_pcl_v2(FLAGS.images, FLAGS.policy)

    def variant(batch_size, jit):
        batches = [data.to_float(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
        embed = tf.function(lambda x: tf.cast(model.embed_keys(x), tf.float32), jit_compile=jit)
        embed(batches[0]).numpy()  # trace / compile outside the timing
        return batches, embed

    if FLAGS.profile:
        profile(*variant(512, False))
        return
    variants = {f"batch {size}, jit_compile={jit}": variant(size, jit) for size in (256, 512, 1024)
                for jit in (False, True)}
    for round_index in range(FLAGS.rounds):
        for name, (batches, embed) in variants.items():
            started = time.perf_counter()
            for batch in batches:
                embed(batch).numpy()
            print(f"round {round_index} {name}: {time.perf_counter() - started:.2f} s", flush=True)


def profile(batches, embed):
    from profile_train_step import profiled

    def one_pass():
        started = time.perf_counter()
        for batch in batches:
            embed(batch).numpy()
        return time.perf_counter() - started

    seconds, totals = profiled(one_pass)
    total = sum(totals.values())
    print(f"# {FLAGS.policy}, one graph-mode pass at batch 512: {seconds:.2f} s wall; op time summed over threads {total / 1000:.2f} s")
    for op_type, ms in totals.most_common(10):
        print(f"{op_type:<32}{ms:9.1f} ms {100 * ms / total:6.1f} %")


if __name__ == "__main__":
    app.run(main)
