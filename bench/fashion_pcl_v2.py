"""Shared by the E-step probes: Fashion-MNIST images and the PCL v2 config's model."""

import keras

import keras_pcl
from keras_pcl import backbones, data


def fashion_mnist_pcl_v2(count, policy="mixed_bfloat16"):
    """The first `count` Fashion-MNIST training images and an untrained PCL model of the
    PCL v2 config (small ResNet, width 32, split BatchNorm, mixed_bfloat16 unless `policy`)."""
    keras.mixed_precision.set_global_policy(policy)
    images = data.load_dataset("fashion_mnist").train_images[:count]
    keras.utils.set_random_seed(0)
    model = keras_pcl.PCL(backbones.small_resnet((28, 28, 1), width=32, norm="split", num_splits=8),
                          backbones.mlp_head(128, 512), num_samples=len(images), num_clusters=(50,),
                          queue_size=4096)
    return images, model
