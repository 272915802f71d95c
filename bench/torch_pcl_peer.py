"""The benchmark peer: one PCL training step in PyTorch (CPU), after the reference's builder.

Written here for the throughput comparison only (PyTorch is never a runtime
dependency of keras_pcl). Same step as keras_pcl's: ResNet-18 with the CIFAR
stem, MLP head, momentum encoder, a queue of keys, InfoNCE plus ProtoNCE over
M granularities (exact softmax over all prototypes), SGD with momentum.
The reference's cross-GPU batch shuffle has no single-device meaning; the key
batch is shuffled and un-shuffled as keras_pcl does.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.down is None else self.down(x)))


class ResNet18(nn.Module):
    """ResNet-18, CIFAR stem (3x3 conv stride 1, no max-pool), pooled 512-d features."""

    def __init__(self, width=64):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        layers, cin = [], width
        for stage, cout in enumerate([width, 2 * width, 4 * width, 8 * width]):
            for i in range(2):
                layers.append(BasicBlock(cin, cout, 2 if stage > 0 and i == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*layers)

    def forward(self, x):
        return torch.flatten(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1)


def encoder(dim=128, hidden=2048, width=64):
    return nn.Sequential(ResNet18(width), nn.Linear(8 * width, hidden), nn.ReLU(), nn.Linear(hidden, dim))


class PCLStep(nn.Module):
    """Query/key encoders, queue, prototypes: `step(view1, view2, index)` does one SGD step."""

    def __init__(self, num_samples, num_clusters=(250, 500, 1000), dim=128, queue_size=16384, momentum=0.999,
                 temperature=0.2, lr=0.03):
        super().__init__()
        self.encoder_q, self.encoder_k = encoder(dim), encoder(dim)
        for q, k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            k.data.copy_(q.data)
            k.requires_grad = False
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self.m, self.t = momentum, temperature
        g = torch.Generator().manual_seed(0)
        self.prototypes = [F.normalize(torch.randn(k, dim, generator=g), dim=1) for k in num_clusters]
        self.phi = [torch.full((k,), temperature) for k in num_clusters]
        self.assignments = [torch.randint(0, k, (num_samples,), generator=g) for k in num_clusters]
        self.optimizer = torch.optim.SGD(self.encoder_q.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)

    @torch.no_grad()
    def _momentum_update(self):
        for q, k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            k.data.mul_(self.m).add_(q.data, alpha=1 - self.m)

    @torch.no_grad()
    def _enqueue(self, keys):
        batch, ptr = keys.shape[0], int(self.queue_ptr)
        self.queue[ptr:ptr + batch] = keys
        self.queue_ptr[0] = (ptr + batch) % self.queue.shape[0]

    def step(self, view1, view2, index, autocast=False):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            q = F.normalize(self.encoder_q(view1).float(), dim=1)
            with torch.no_grad():
                self._momentum_update()
                perm = torch.randperm(view2.shape[0])
                k = self.encoder_k(view2[perm])[torch.argsort(perm)]
                k = F.normalize(k.float(), dim=1)
        positive = (q * k).sum(1, keepdim=True)
        negative = q @ self.queue.T
        logits = torch.cat([positive, negative], 1) / self.t
        loss = F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long))
        proto = 0.0
        for prototypes, phi, assignments in zip(self.prototypes, self.phi, self.assignments):
            proto = proto + F.cross_entropy(q @ prototypes.T / phi, assignments[index])
        loss = loss + proto / len(self.prototypes)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self._enqueue(k)
        return float(loss.detach())
