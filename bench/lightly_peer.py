"""The peer library: a method trained with lightly's implementation, mirroring a keras_pcl flagfile.

    pip install -e ".[bench]"
    python bench/lightly_peer.py --method=byol --epochs=20 --out=runs/lightly/byol_seed0

Trains lightly's implementation of a method (its heads, losses, momentum utilities,
memory banks and LARS: lightly's code, not ours) on Fashion-MNIST with a PyTorch copy
of keras_pcl's small ResNet (the same widths, stride-2 stem, BatchNorm or split
BatchNorm as the flagfile says (lightly's `SplitBatchNorm`, which groups samples by
index modulo the splits where keras_pcl takes contiguous sub-batches), keras_pcl's
initialisers), the flagfile's batch, epochs,
learning-rate schedule (linear warm-up then cosine, per step), optimizer (Keras SGD's
update, reproduced: decoupled weight decay, the rate inside the velocity; lightly's
LARS where the flagfile says LARS, set up as lightly's benchmarks do and as keras_pcl's LARS
behaves: BatchNorm parameters and biases without weight decay or trust ratio) and method
hyperparameters. SwAV's prototype scores, Sinkhorn and loss run in float32 under bf16
autocast, as keras_pcl keeps its prototypes in float32. Then it saves the
frozen features of the train and test images and scores them with keras_pcl.evaluation
(kNN k=200 T=0.1, linear probe, low-shot SVM, AMI): only the training differs.

The losses are scaled to keras_pcl's gradient (`--loss_scale`, default per method:
lightly's BYOL averages its two -cos terms where keras_pcl sums the paper's two 2 - 2cos,
a quarter of the gradient at the flagfile's one learning rate, so BYOL's loss is multiplied
by 4; the other methods' losses already match). Where the two sides still differ
(torchvision cannot match every Keras layer): per-view
forward passes as lightly's examples do (keras_pcl's SimCLR and SwAV pass views of one
size together, so BatchNorm sees 2B images, and 6B for SwAV's six small crops); lightly's
heads keep PyTorch's default initialisation (keras_pcl's: Glorot uniform unless the flagfile sets
`--head_init=torch`, as BYOL's and SimSiam's do), and
its SwAV prototypes have a bias (keras_pcl's and the paper's do not; Sinkhorn's equal partition cancels it in the codes, not in the predictions); the stride-2 convolutions pad one pixel on every side (TF's "same" pads only the bottom and right); the frozen features are extracted in float32 (keras_pcl's runner extracts them under the bf16 policy); torchvision's ColorJitter multiplies
brightness where keras_pcl's presets add (the SimCLR and BYOL papers' form; SwAV's flagfile
multiplies too, `--brightness_mode=multiply`) and applies its
four operations in a random order where keras_pcl's flagfiles keep one (`--jitter_order=random`
shuffles them too); the crops are torchvision's on both sides (whole-pixel boxes, redrawn when
they do not fit, resized with half-pixel centres) except that keras_pcl does not antialias a
box resized down, which no crop of these 28-pixel recipes is (keras_pcl shrank a box that did
not fit before `0944841`, which made its crops larger, and kept fractional boxes sampled corner
to corner until it took torchvision's whole pixels); augmentation per image in one DataLoader worker (the
usual torchvision way) against keras_pcl's batched tf.data pipeline.

A stopped run resumes: every epoch ends with `<out>/checkpoint.pt` (weights, momentum
networks, queues, optimizer, random states), and the same command continues from it, repeating
the uninterrupted run exactly (the same losses and features, checked for MoCo v2 and for SwAV
with its queue filled before the stop).
"""

import argparse
import copy
import json
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_runs import read_flagfile, write_atomically  # noqa: E402
CONFIGS = {"moco_v2": "moco_v2_fashion_mnist.cfg", "simclr": "simclr_fashion_mnist.cfg",
           "byol": "byol_fashion_mnist.cfg", "simsiam": "simsiam_fashion_mnist.cfg",
           "swav": "swav_fashion_mnist.cfg"}
# lightly's loss times this has keras_pcl's gradient at one learning rate (BYOL: see above).
EQUAL_GRADIENT_SCALE = {"byol": 4.0}


def method_config(method, extra=()):
    """`method`'s flagfile as read_flagfile gives it, its "method" key naming the model to build."""
    cfg = read_flagfile(CONFIGS[method], extra)
    cfg["method"] = "swav" if method == "swav" else cfg.get("method")
    return cfg


# The backbone: keras_pcl.backbones.small_resnet in PyTorch --------------------------------

def torch_modules():
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    from lightly.models.batchnorm import SplitBatchNorm

    def norm(channels, kind, splits):
        # keras_pcl's split BatchNorm (statistics per group of sub-batches) is lightly's SplitBatchNorm.
        return SplitBatchNorm(channels, splits) if kind == "split" else nn.BatchNorm2d(channels)

    def conv(cin, cout, kernel, stride):
        layer = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False)
        # Keras' he_normal: a truncated normal of std sqrt(2 / fan_in).
        std = math.sqrt(2.0 / (cin * kernel * kernel)) / 0.87962566103423978
        nn.init.trunc_normal_(layer.weight, std=std, a=-2 * std, b=2 * std)
        return layer

    class Block(nn.Module):
        def __init__(self, cin, cout, stride, kind, splits):
            super().__init__()
            self.conv1, self.bn1 = conv(cin, cout, 3, stride), norm(cout, kind, splits)
            self.conv2, self.bn2 = conv(cout, cout, 3, 1), norm(cout, kind, splits)
            self.down = None
            if stride != 1 or cin != cout:
                self.down = nn.Sequential(conv(cin, cout, 1, stride), norm(cout, kind, splits))

        def forward(self, x):
            y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
            return F.relu(y + (x if self.down is None else self.down(x)))

    class SmallResNet(nn.Module):
        """3x3 stride-2 stem, stages (w, 2w, 4w) of 2 basic blocks, global pooling: [B, 4w]."""

        def __init__(self, channels=1, width=32, kind="batch", splits=8, stem_stride=2, widths=(1, 2, 4), blocks=2):
            super().__init__()
            self.stem = nn.Sequential(conv(channels, width, 3, stem_stride), norm(width, kind, splits), nn.ReLU())
            layers, cin = [], width
            for stage, factor in enumerate(widths):
                for i in range(blocks):
                    layers.append(Block(cin, width * factor, 2 if stage > 0 and i == 0 else 1, kind, splits))
                    cin = width * factor
            self.blocks, self.features = nn.Sequential(*layers), cin

        def forward(self, x):
            return torch.flatten(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1)

    return torch, nn, F, SmallResNet


def torch_backbone(encoder, channels, width, norm="batch", splits=8):
    """The PyTorch copy of keras_pcl's `encoder`: the small ResNet, or ResNet-18 with a CIFAR stem."""
    SmallResNet = torch_modules()[3]
    if encoder == "resnet18":
        return SmallResNet(channels, width, norm, splits, stem_stride=1, widths=(1, 2, 4, 8))
    return SmallResNet(channels, width, norm, splits)


# The methods, with lightly's modules ----------------------------------------------------------

def build_method(name, cfg, channels, steps_per_epoch, total_steps, image_size=28):
    """`(model, training_step(views, step) -> loss)` with lightly's heads and losses."""
    torch, nn, F, _ = torch_modules()
    from lightly.loss import NegativeCosineSimilarity, NTXentLoss, SwaVLoss
    from lightly.models.modules import heads
    from lightly.models.modules.memory_bank import MemoryBankModule
    from lightly.models.utils import batch_shuffle, batch_unshuffle, deactivate_requires_grad, update_momentum
    from lightly.utils.scheduler import cosine_schedule

    backbone = torch_backbone(cfg.get("encoder", "small_resnet"), channels, int(cfg.get("width", 32)),
                              cfg.get("norm", "batch"), int(cfg.get("num_splits", 8)))
    d, hidden, out = backbone.features, int(cfg["hidden_dim"]), int(cfg["embedding_dim"])
    model = nn.Module()
    model.backbone = backbone

    if name == "moco_v2":
        model.head = heads.MoCoProjectionHead(d, hidden, out)
        model.key_backbone, model.key_head = copy.deepcopy(backbone), copy.deepcopy(model.head)
        deactivate_requires_grad(model.key_backbone)
        deactivate_requires_grad(model.key_head)
        criterion = NTXentLoss(float(cfg["temperature"]), memory_bank_size=(int(cfg["queue_size"]), out))
        m = float(cfg["momentum"])

        def step(views, i):
            update_momentum(model.backbone, model.key_backbone, m)
            update_momentum(model.head, model.key_head, m)
            q = model.head(model.backbone(views[0]))
            with torch.no_grad():
                shuffled, order = batch_shuffle(views[1])
                k = batch_unshuffle(model.key_head(model.key_backbone(shuffled)), order)
            return criterion(q, k)

    elif name == "simclr":
        model.head = heads.SimCLRProjectionHead(d, hidden, out)
        criterion = NTXentLoss(float(cfg["temperature"]))

        def step(views, i):
            return criterion(model.head(model.backbone(views[0])), model.head(model.backbone(views[1])))

    elif name == "byol":
        model.head = heads.BYOLProjectionHead(d, hidden, out)
        model.predictor = heads.BYOLPredictionHead(out, int(cfg.get("predictor_hidden_dim", hidden)), out)
        model.key_backbone, model.key_head = copy.deepcopy(backbone), copy.deepcopy(model.head)
        deactivate_requires_grad(model.key_backbone)
        deactivate_requires_grad(model.key_head)
        criterion = NegativeCosineSimilarity()
        base = float(cfg["momentum"])

        def step(views, i):
            m = cosine_schedule(i, total_steps, base, 1.0)
            update_momentum(model.backbone, model.key_backbone, m)
            update_momentum(model.head, model.key_head, m)
            p0 = model.predictor(model.head(model.backbone(views[0])))
            p1 = model.predictor(model.head(model.backbone(views[1])))
            with torch.no_grad():
                z0, z1 = model.key_head(model.key_backbone(views[0])), model.key_head(model.key_backbone(views[1]))
            return 0.5 * (criterion(p0, z1) + criterion(p1, z0))

    elif name == "simsiam":
        model.head = heads.SimSiamProjectionHead(d, hidden, out)
        model.predictor = heads.SimSiamPredictionHead(out, int(cfg.get("predictor_hidden_dim", out // 4)), out)
        criterion = NegativeCosineSimilarity()

        def step(views, i):
            z0, z1 = model.head(model.backbone(views[0])), model.head(model.backbone(views[1]))
            p0, p1 = model.predictor(z0), model.predictor(z1)
            return 0.5 * (criterion(p0, z1.detach()) + criterion(p1, z0.detach()))

    elif name == "swav":
        model.head = heads.SwaVProjectionHead(d, hidden, out)
        model.prototypes = heads.SwaVPrototypes(out, int(cfg["num_prototypes"]),
                                                n_steps_frozen_prototypes=steps_per_epoch)
        criterion = SwaVLoss(float(cfg["temperature"]), int(cfg["sinkhorn_iterations"]), float(cfg["epsilon"]))
        queue_size, queue_start = int(cfg.get("queue_size", 0)), int(cfg.get("queue_start_epoch", 0))
        model.queues = nn.ModuleList([MemoryBankModule((queue_size, out)) for _ in range(2)]) if queue_size else None

        def step(views, i):
            model.prototypes.normalize()
            embeddings = [F.normalize(model.head(model.backbone(v)), dim=1) for v in views]
            with torch.autocast("cpu", enabled=False):  # float32 from here on, as keras_pcl's prototypes
                return swapped_prediction([z.float() for z in embeddings], i)

        def swapped_prediction(embeddings, i):
            scores = [model.prototypes(z, i) for z in embeddings]
            queue_scores = None
            if model.queues is not None and i // steps_per_epoch >= queue_start:
                queued = []
                for queue, z in zip(model.queues, embeddings[:2]):
                    _, bank = queue(z.detach(), update=True)  # [out, size], the bank before this batch
                    queued.append(bank.T)
                if i - queue_start * steps_per_epoch >= math.ceil(queue_size / len(embeddings[0])):  # full
                    queue_scores = [model.prototypes(q, i) for q in queued]
            return criterion(scores[:2], scores[2:], queue_scores)

    else:
        raise SystemExit(f"unknown method {name!r}; choose one of {sorted(CONFIGS)}")
    model.criterion = criterion  # MoCo's queue lives in the loss: a submodule, so checkpoints hold it
    return model, step


def lightly_lars(model, lr, momentum, weight_decay):
    """lightly's LARS over `model`'s trainable parameters, set up as lightly's benchmarks do (and
    as keras_pcl's LARS behaves): BatchNorm parameters and biases in a group without weight
    decay, which lightly's LARS also leaves out of the trust ratio."""
    from lightly.models.utils import get_weight_decay_parameters
    from lightly.utils.lars import LARS

    decay, no_decay = get_weight_decay_parameters([model])
    return LARS([{"params": [p for p in decay if p.requires_grad]},
                 {"params": [p for p in no_decay if p.requires_grad], "weight_decay": 0.0}],
                lr=lr, momentum=momentum, weight_decay=weight_decay)


class KerasSGD:
    """Keras 3's SGD update in PyTorch: decoupled decay `w -= lr * wd * w`, then `m = mu m - lr g;
    w += m` (the rate inside the velocity). `fixed` parameters keep the peak rate (SimSiam's predictor)."""

    def __init__(self, parameters, momentum, weight_decay, fixed=()):
        import torch

        self.torch = torch
        self.parameters = [p for p in parameters if p.requires_grad]
        self.fixed = {id(p) for p in fixed}
        self.momentum, self.weight_decay = momentum, weight_decay
        self.velocity = [torch.zeros_like(p) for p in self.parameters]

    def step(self, lr, peak):
        with self.torch.no_grad():
            for p, v in zip(self.parameters, self.velocity):
                rate = peak if id(p) in self.fixed else lr
                if self.weight_decay:
                    p.mul_(1 - lr * self.weight_decay)
                if p.grad is not None:
                    v.mul_(self.momentum).sub_(rate * p.grad)
                    p.add_(v)

    def zero_grad(self):
        for p in self.parameters:
            p.grad = None

    def state_dict(self):
        return {"velocity": self.velocity}

    def load_state_dict(self, state):
        with self.torch.no_grad():
            for v, saved in zip(self.velocity, state["velocity"], strict=True):
                v.copy_(saved)


def learning_rate(step, total, warmup, peak):
    """keras.optimizers.schedules.CosineDecay with a linear warm-up, as experiments/run.py builds it."""
    if warmup and step < warmup:
        return peak * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


# Augmentation ------------------------------------------------------------------------------

def view_transforms(cfg, image_size, channels):
    """The flagfile's augmentation, per view, in torchvision (see the module docstring for the gaps)."""
    import torch
    from torchvision.transforms import v2

    crop = tuple(float(v) for v in cfg.get("crop_scale", "0.2,1.0").split(","))
    kernel = max(3, int(0.1 * image_size) // 2 * 2 + 1)

    def jitter(strength_b, strength_c, saturation, hue, p):
        if channels == 1:
            return v2.RandomApply([v2.ColorJitter(strength_b, strength_c)], p=p)
        return v2.RandomApply([v2.ColorJitter(strength_b, strength_c, saturation, hue)], p=p)

    def pipeline(size, scale, colour, blur_p, solarize_p=0.0, grayscale=0.2):
        steps = [v2.RandomResizedCrop(size, scale=scale, antialias=True), v2.RandomHorizontalFlip(), colour]
        if channels == 3 and grayscale:
            steps.append(v2.RandomGrayscale(grayscale))
        if blur_p:
            steps.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=blur_p))
        steps.append(v2.ToDtype(torch.float32, scale=True))
        if solarize_p:
            steps.append(v2.RandomSolarize(0.5, p=solarize_p))
        return v2.Compose(steps)

    kind = cfg.get("augmentation", "pcl_v2")
    if kind in ("pcl_v2", "moco_v2"):
        one = pipeline(image_size, crop, jitter(0.4, 0.4, 0.4, 0.1, 0.8), 0.5)
        return [one, one]
    if kind == "simclr":
        one = pipeline(image_size, crop, jitter(0.8, 0.8, 0.8, 0.2, 0.8), 0.5)
        views = [one, one]
        if cfg.get("method") == "swav" and int(cfg.get("num_small_crops", 0)):
            small_scale = tuple(float(v) for v in cfg.get("small_crop_scale", "0.05,0.14").split(","))
            small = pipeline(int(cfg.get("small_crop_size", 16)), small_scale, jitter(0.8, 0.8, 0.8, 0.2, 0.8), 0.5)
            views += [small] * int(cfg["num_small_crops"])
        return views
    if kind == "byol":
        return [pipeline(image_size, crop, jitter(0.4, 0.4, 0.2, 0.1, 0.8), 1.0),
                pipeline(image_size, crop, jitter(0.4, 0.4, 0.2, 0.1, 0.8), 0.1, solarize_p=0.2)]
    raise SystemExit(f"augmentation {kind!r} has no torchvision counterpart here")


# Training and evaluation ---------------------------------------------------------------------

def fashion_mnist(directory="/usr/share/datasets/fashion-mnist"):
    """The Debian package's idx files, read without TensorFlow (which must not share this
    process with PyTorch's DataLoader workers: the pair segfaulted)."""
    import gzip

    def read(name):
        with gzip.open(os.path.join(directory, f"{name}-ubyte.gz"), "rb") as f:
            raw = f.read()
        dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(raw[3])]
        return np.frombuffer(raw, np.uint8, offset=4 + 4 * raw[3]).reshape(dims)

    return (read("train-images-idx3")[..., None].copy(), read("train-labels-idx1"),
            read("t10k-images-idx3")[..., None].copy(), read("t10k-labels-idx1"))


def evaluate(out, seed):
    """Scores the saved frozen features with keras_pcl.evaluation (its own process: TensorFlow)."""
    from keras_pcl import evaluation

    _, train_labels, _, test_labels = fashion_mnist()
    features = np.load(os.path.join(out, "features.npz"))
    scores = evaluation.evaluate_features(features["train"], train_labels, features["test"], test_labels, seed=seed)
    with open(os.path.join(out, "training.json")) as f:
        results = json.load(f)
    results["evaluation"] = {"encoder": scores}
    write_atomically(os.path.join(out, "results.json"), json.dumps(results, indent=2))
    print(json.dumps(scores))


def evaluate_in_new_process(args):
    """TensorFlow and PyTorch's DataLoader workers segfault in one process."""
    import subprocess

    subprocess.run([sys.executable, os.path.abspath(__file__), "--method", args.method, "--out", args.out,
                    "--seed", str(args.seed), "--evaluate_only"], check=True)


CHECKPOINT = "checkpoint.pt"


def save_checkpoint(out, run_key, progress, model, optimizer, generator, torch):
    """Everything the next epoch depends on, written whole (a temporary name, then a rename)."""
    # lightly's queues are non-persistent buffers, left out of state_dict: saved by name here.
    state = {"run": run_key, "progress": progress, "model": model.state_dict(),
             "buffers": {name: b.clone() for name, b in model.named_buffers()},
             "optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
             "numpy_rng": np.random.get_state(), "loader_rng": generator.get_state()}
    write_atomically(os.path.join(out, CHECKPOINT), lambda path: torch.save(state, path))


def resume(out, run_key, model, optimizer, generator, torch):
    """The progress of a stopped run in `out` (restoring its weights, optimizer and random
    states), or a fresh start. A checkpoint of another run (method, epochs, seed, flags) is an error:
    continuing it would mix two runs in one result."""
    path = os.path.join(out, CHECKPOINT)
    if not os.path.exists(path):
        return {"epoch": 0, "epoch_seconds": [], "loss": [], "resumed_at_epochs": []}
    state = torch.load(path, weights_only=False)
    if state["run"] != run_key:
        changed = sorted(k for k in run_key if state["run"].get(k) != run_key[k])
        raise SystemExit(f"{path} is a checkpoint of another run ({', '.join(changed)} differ: "
                         f"{ {k: state['run'].get(k) for k in changed} }); pass another --out or delete it")
    model.load_state_dict(state["model"])
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(state["buffers"][name])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    np.random.set_state(state["numpy_rng"])
    generator.set_state(state["loader_rng"])
    progress = state["progress"]
    progress["resumed_at_epochs"].append(progress["epoch"])
    print(f"resuming {out} at epoch {progress['epoch']}", flush=True)
    return progress


def extract(model_backbone, images, torch, batch=512):
    model_backbone.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch):
            x = torch.from_numpy(images[start:start + batch]).permute(0, 3, 1, 2).float() / 255.0
            out.append(model_backbone(x).numpy())
    return np.concatenate(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", required=True, choices=sorted(CONFIGS))
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps_per_epoch", type=int, default=0, help="cap, for smoke runs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--extra_flags", default="", help="overrides of the flagfile, as for run.py")
    parser.add_argument("--loss_scale", type=float, default=None,
                        help="multiplies lightly's loss before the backward pass; default: keras_pcl's gradient "
                             "(4 for BYOL, whose summed 2 - 2cos is 4x lightly's mean -cos; else 1); "
                             "1 = lightly's own convention")
    parser.add_argument("--evaluate_only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.loss_scale is None:
        args.loss_scale = EQUAL_GRADIENT_SCALE.get(args.method, 1.0)
    if not args.loss_scale > 0:
        parser.error(f"--loss_scale must be positive, got {args.loss_scale}")
    if args.evaluate_only:
        return evaluate(args.out, args.seed)
    if os.path.exists(os.path.join(args.out, "training.json")):  # trained, stopped before its scores
        return evaluate_in_new_process(args)

    torch, nn, F, _ = torch_modules()
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    torch.set_num_threads(args.threads)
    cfg = method_config(args.method, args.extra_flags.split())
    if cfg["dataset"] != "fashion_mnist":
        raise SystemExit("the lightly peer reads Fashion-MNIST only (apt-get install -y dataset-fashion-mnist)")
    train_images, _, test_images, _ = fashion_mnist()
    images, channels = train_images, train_images.shape[-1]
    image_size = int(cfg.get("image_size") or images.shape[1])
    batch = int(cfg["batch_size"])
    steps = len(images) // batch if not args.steps_per_epoch else min(len(images) // batch, args.steps_per_epoch)
    total = steps * args.epochs
    model, step = build_method(args.method, cfg, channels, steps, total, image_size)
    peak = float(cfg["learning_rate"])
    warmup = int(cfg.get("lr_warmup_epochs", 0)) * steps
    parameters = [p for p in model.parameters() if p.requires_grad]
    if cfg.get("optimizer", "sgd") == "lars":
        optimizer = lightly_lars(model, peak, float(cfg.get("sgd_momentum", 0.9)), float(cfg["weight_decay"]))
    else:
        fixed = list(model.predictor.parameters()) if args.method == "simsiam" and cfg.get(
            "fixed_predictor_lr", "true") == "true" else []
        optimizer = KerasSGD(parameters, float(cfg.get("sgd_momentum", 0.9)), float(cfg["weight_decay"]), fixed)
    transforms = view_transforms(cfg, image_size, channels)

    class Views(torch.utils.data.Dataset):
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            x = torch.from_numpy(images[i]).permute(2, 0, 1)
            return [t(x) for t in transforms]

    loader = torch.utils.data.DataLoader(Views(), batch_size=batch, shuffle=True, drop_last=True, num_workers=1,
                                         # A new worker each epoch, seeded from `generator`: the
                                         # generator's state at an epoch's end then fixes the next
                                         # epoch's order and augmentations, so a resumed run repeats
                                         # an uninterrupted one.
                                         persistent_workers=False,
                                         generator=torch.Generator().manual_seed(args.seed))
    bf16 = cfg.get("mixed_precision") == "mixed_bfloat16"
    os.makedirs(args.out, exist_ok=True)
    run_key = {"method": args.method, "epochs": args.epochs, "seed": args.seed, "steps": steps,
               "extra_flags": args.extra_flags, "loss_scale": args.loss_scale}
    progress = resume(args.out, run_key, model, optimizer, loader.generator, torch)
    i = progress["epoch"] * steps
    for epoch in range(progress["epoch"], args.epochs):
        model.train()
        started, losses = time.perf_counter(), []
        for s, views in enumerate(loader):
            if s >= steps:
                break
            lr = learning_rate(i, total, warmup, peak)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = step(views, i).float()
            optimizer.zero_grad()
            (loss * args.loss_scale).backward()
            if isinstance(optimizer, KerasSGD):
                optimizer.step(lr, peak)
            else:
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.step()
            losses.append(float(loss.detach()))
            i += 1
        progress["epoch_seconds"].append(time.perf_counter() - started)
        progress["loss"].append(float(np.mean(losses)))
        progress["epoch"] = epoch + 1
        save_checkpoint(args.out, run_key, progress, model, optimizer, loader.generator, torch)
        print(f"epoch {epoch + 1}/{args.epochs}: loss {progress['loss'][-1]:.4f}, "
              f"{progress['epoch_seconds'][-1]:.1f} s", flush=True)
    epoch_seconds = progress["epoch_seconds"]
    train_f, test_f = extract(model.backbone, train_images, torch), extract(model.backbone, test_images, torch)
    write_atomically(os.path.join(args.out, "features.npz"), lambda path: np.savez(path, train=train_f, test=test_f))
    # results.json appears only with the scores: lightly_table.py skips a run that has it.
    write_atomically(os.path.join(args.out, "training.json"), json.dumps({
        "library": "lightly", "method": args.method, "epochs": args.epochs, "seed": args.seed,
        "epoch_seconds": epoch_seconds, "loss": progress["loss"], "train_seconds": round(sum(epoch_seconds), 1),
        "loss_scale": args.loss_scale, "resumed_at_epochs": progress["resumed_at_epochs"],
        "config": cfg, "versions": {"torch": torch.__version__, "lightly": __import__("lightly").__version__}},
        indent=2))
    os.remove(os.path.join(args.out, CHECKPOINT))  # training.json now marks the run trained
    del loader  # its worker ends before TensorFlow starts in the evaluation process
    evaluate_in_new_process(args)


if __name__ == "__main__":
    main()
