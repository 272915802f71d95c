"""Is the input pipeline or the train step the bottleneck? Times the augmentation pipeline alone.

    python bench/pipeline_probe.py --dataset=fashion_mnist --steps=80 --rounds=2

Iterates `keras_pcl.data.multiview_dataset` (two augmented views per image, the
training pipeline of `experiments/run.py`; `--augmentation` is any preset, one per view
like BYOL's and PaCo's included) for `--steps` batches after one untimed
batch, and prints ms per batch. Compare with the `epoch_seconds` of a run with the
same `--steps_per_epoch`: if the pipeline is much faster, training is step-bound.
"""

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags  # noqa: E402

flags.DEFINE_string("dataset", "fashion_mnist", "Dataset spec, as run.py's --dataset.")
flags.DEFINE_string("augmentation", "pcl_v2", "Augmentation preset.")
flags.DEFINE_integer("image_size", 28, "Image side.")
flags.DEFINE_integer("batch_size", 256, "Batch size.")
flags.DEFINE_integer("steps", 80, "Timed batches per round.")
flags.DEFINE_integer("rounds", 2, "Rounds (each a different seed).")
FLAGS = flags.FLAGS


def main(_):
    from keras_pcl import augment, data

    split = data.load_dataset(FLAGS.dataset)
    channels = split.image_shape[-1]
    views = augment.view_augmentations(FLAGS.augmentation, FLAGS.image_size, channels, (0.2, 1.0))
    for seed in range(FLAGS.rounds):
        dataset = data.multiview_dataset(split.train_images, views, FLAGS.batch_size, seed=seed, epochs=1,
                                         steps_per_epoch=FLAGS.steps + 1)
        batches = iter(dataset)
        next(batches)
        start = time.perf_counter()
        count = sum(1 for _ in batches)
        seconds = time.perf_counter() - start
        print(f"round {seed}: {count} batches of two views x {FLAGS.batch_size} in {seconds:.2f} s "
              f"= {seconds / count * 1000:.1f} ms/batch", flush=True)


if __name__ == "__main__":
    app.run(main)
