"""lightly_peer's input pipeline alone: seconds per epoch of its per-image torchvision views.

    python bench/lightly_input.py --method=simsiam --batches=8

One process, one thread, no training: what the peer's single DataLoader worker spends per
epoch making a method's views (lightly_peer's own transforms), to set beside its step time.
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lightly_peer import CONFIGS, fashion_mnist, method_config, view_transforms  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", required=True, choices=sorted(CONFIGS))
    parser.add_argument("--batches", type=int, default=8)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    cfg = method_config(args.method)
    images = fashion_mnist()[0]
    batch = int(cfg["batch_size"])
    transforms = view_transforms(cfg, int(cfg.get("image_size") or images.shape[1]), images.shape[-1])
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    for _ in range(args.batches):
        for i in rng.integers(0, len(images), batch):
            x = torch.from_numpy(images[i]).permute(2, 0, 1)
            [t(x) for t in transforms]
    per_batch = (time.perf_counter() - started) / args.batches
    steps = len(images) // batch
    print(f"{args.method}: {per_batch:.3f} s per batch of {batch}, {per_batch * steps:.0f} s per epoch of {steps} steps")


if __name__ == "__main__":
    main()
