"""VGG-16 with CIFAR geometry (3x32x32 in, 10 classes): the reference network for pruning.

The layout is the one the pruning papers use on CIFAR-10 (Network Slimming, HRank, Shen et al.):
thirteen 3x3 conv + BatchNorm + ReLU layers in five stages, max pooling between stages, and one
linear classifier on the 512 channels left at 1x1. Its data is a single-view, 10-class variant of
the built-in shapes images (:func:`single_view_shapes`), since nothing may be downloaded.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from fogsplit.core.dataset import Dataset, make_dataset
from fogsplit.export.datasets import SHAPES, render_views, sample_views

VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
PREDICT_BATCH = 256

log = logging.getLogger(__name__)


class VGG(nn.Module):
    """VGG with BatchNorm; takes raw pixel values float32 ``[B, 3, 32, 32]`` (0..255)."""

    def __init__(self, cfg: tuple = VGG16_CFG, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.register_buffer("mean", torch.full((1, in_channels, 1, 1), 127.5))
        self.register_buffer("std", torch.full((1, in_channels, 1, 1), 64.0))
        layers: list[nn.Module] = []
        channels = in_channels
        for item in cfg:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(channels, item, 3, padding=1, bias=False), nn.BatchNorm2d(item), nn.ReLU()]
                channels = item
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features((x - self.mean) / self.std).flatten(1))


def scaled_cfg(width: float, cfg: tuple = VGG16_CFG) -> tuple:
    """``cfg`` with every conv's channels multiplied by ``width`` (at least 1): a thin VGG-16 for
    quick runs and tests; the benchmark's figures are for ``width=1``."""
    return tuple(item if item == "M" else max(1, round(item * width)) for item in cfg)


def vgg_layers(model: VGG) -> tuple[tuple[str, str], ...]:
    """``(conv name, BatchNorm name)`` of every conv layer: all of them may be pruned."""
    named = list(model.named_modules())
    return tuple((name, named[i + 1][0]) for i, (name, module) in enumerate(named)
                 if isinstance(module, nn.Conv2d))


def single_view_shapes(n_events: int = 5000, num_classes: int = 10, seed: int = 0,
                       test_fraction: float = 0.2) -> Dataset:
    """One camera (``cam0``) that always sees the object: uint8 ``[N, 3, 32, 32]``, the first
    ``num_classes`` of :data:`SHAPES`, with the multi-view set's pose, lighting, clutter and noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n_events)
    views = sample_views(labels, np.ones(n_events, bool), np.full(n_events, 0.45), rng)
    images, _ = render_views(views, rng)
    split = (rng.random(n_events) < test_fraction).astype(np.int8)
    return make_dataset({"cam0": images}, labels, split=split,
                        classes=list(SHAPES[:num_classes]), name="single_view_shapes",
                        source="single_view_shapes")


def _augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """Random horizontal flips and shifts of up to 4 pixels (the usual CIFAR augmentation)."""
    flip = torch.rand(x.shape[0], generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    padded = F.pad(x, (4, 4, 4, 4), mode="replicate")
    dx, dy = torch.randint(0, 9, (2,), generator=generator).tolist()
    return padded[:, :, dy:dy + x.shape[2], dx:dx + x.shape[3]]


def train_classifier(model: nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int, lr: float = 2e-3,
                     batch_size: int = 64, seed: int = 0, progress: bool = False) -> float:
    """Train a single-input classifier with AdamW and a one-cycle schedule; returns seconds.

    Sparsity pressure, if wanted, is applied by the caller with ``prune.bn_l1_penalty``.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    steps = -(-len(ys) // batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps)
    model.train()
    start = time.perf_counter()
    with tqdm(total=epochs * steps, disable=not progress, desc="train", unit="batch") as bar:
        for epoch in range(epochs):
            order = torch.randperm(len(ys), generator=generator)
            loss_sum = 0.0
            for i in range(0, len(ys), batch_size):
                index = order[i:i + batch_size]
                loss = F.cross_entropy(model(_augment(xs[index].float(), generator)), ys[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                loss_sum += loss.item() * len(index)
                bar.update()
            log.info("epoch %d/%d: loss %.4f after %.0fs", epoch + 1, epochs, loss_sum / len(ys),
                     time.perf_counter() - start)
    model.eval()
    return time.perf_counter() - start


@torch.no_grad()
def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy in eval mode."""
    model.eval()
    hits = 0
    for i in range(0, len(y), PREDICT_BATCH):
        logits = model(torch.from_numpy(x[i:i + PREDICT_BATCH]).float())
        hits += int((logits.argmax(1) == torch.from_numpy(y[i:i + PREDICT_BATCH])).sum())
    return hits / len(y)
