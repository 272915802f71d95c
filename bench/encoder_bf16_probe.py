"""Where the bf16 train-step gap is: ResNet-18 alone, Keras vs PyTorch, forward and forward+backward.

    python bench/encoder_bf16_probe.py

Batch 256, 32x32x3, bf16 compute (Keras mixed_bfloat16, torch.autocast), plain
BatchNorm in both, training mode. No queue, no EMA, no loss: only the
frameworks' convolution stacks. Prints images/s, two rounds.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conv_bf16_probe import timed  # noqa: E402
from torch_pcl_peer import ResNet18  # noqa: E402

from keras_pcl import backbones  # noqa: E402

BATCH = 256


def images_per_second(fn, repeats=3):
    return BATCH / (timed(fn, repeats) / 1000)


def main():
    torch.set_num_threads(os.cpu_count())
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    keras_model = backbones.resnet18((32, 32, 3), norm="batch")
    keras.mixed_precision.set_global_policy("float32")
    x = tf.random.uniform([BATCH, 32, 32, 3])

    @tf.function
    def keras_forward():
        return keras_model(x, training=True)

    @tf.function
    def keras_forward_backward():
        with tf.GradientTape() as tape:
            y = tf.reduce_sum(tf.cast(keras_model(x, training=True), tf.float32))
        return tape.gradient(y, keras_model.trainable_variables)

    torch_model = ResNet18()
    xt = torch.rand(BATCH, 3, 32, 32)

    def torch_forward():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            torch_model(xt)

    def torch_forward_backward():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = torch_model(xt).float().sum()
        y.backward()

    for round_ in range(2):
        rates = {
            "keras fwd": images_per_second(lambda: keras_forward().numpy()),
            "torch fwd": images_per_second(torch_forward),
            "keras fwd+bwd": images_per_second(lambda: [g.numpy() for g in keras_forward_backward()]),
            "torch fwd+bwd": images_per_second(torch_forward_backward),
        }
        print(f"round {round_ + 1}: " + ", ".join(f"{k} {v:.0f}" for k, v in rates.items()) + " images/s")


if __name__ == "__main__":
    main()
