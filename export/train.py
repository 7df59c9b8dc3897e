"""Joint training of all DDNN exits, and batched prediction.

The loss is the weighted sum of the exits' cross-entropies (Teerapittayanon et al., 2017):
device exits (averaged over the present devices), local, edge and cloud. Each training sample
loses each device with probability ``device_dropout`` (at least one device is always kept), so
that the fused exits learn to cope with a device that is absent at run time.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from fogsplit.core.dataset import Dataset
from fogsplit.export.model import DDNN, Exits

EXITS = ("device", "local", "edge", "cloud")
DEFAULT_EXIT_WEIGHTS = {"device": 1.0, "local": 0.5, "edge": 1.0, "cloud": 1.0}
MAX_THREADS = 2
PREDICT_BATCH = 256


@dataclass
class TrainReport:
    """Summary of a training run.

    ``final_loss`` is the mean weighted loss of the last epoch; ``accuracy`` per exit is over the
    last epoch's batches as trained (train mode, with device dropout; ``device`` counts present
    devices only), so it is cheap to get and a little pessimistic.
    """

    epochs: int
    seconds: float
    final_loss: float
    accuracy: dict[str, float] = field(default_factory=dict)


def sample_present(rng: np.random.Generator, batch: int, devices: int,
                   dropout: float) -> np.ndarray:
    """Bool ``[batch, devices]``: each device absent with probability ``dropout``, never all."""
    present = rng.random((batch, devices)) >= dropout
    empty = np.flatnonzero(~present.any(axis=1))
    present[empty, rng.integers(0, devices, empty.size)] = True
    return present


def channel_stats(data: Dataset) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-sensor, per-channel mean and std ``[C]`` of the raw values."""
    stats = {}
    for name, values in data.sensors.items():
        axes = (0, *range(2, values.ndim))
        mean = values.mean(axis=axes, dtype=np.float64)
        std = values.std(axis=axes, dtype=np.float64)
        stats[name] = (mean.astype(np.float32), np.maximum(std, 1e-6).astype(np.float32))
    return stats


def exit_losses(exits: Exits, y: Tensor, present: Tensor) -> dict[str, Tensor]:
    """Cross-entropy of each exit; the device term averages over present devices only."""
    b, k, c = exits.device.shape
    per_device = F.cross_entropy(exits.device.reshape(b * k, c), y.repeat_interleave(k),
                                 reduction="none").reshape(b, k)
    weights = present.to(per_device.dtype)
    return {
        "device": (per_device * weights).sum() / weights.sum(),
        "local": F.cross_entropy(exits.local, y),
        "edge": F.cross_entropy(exits.edge, y),
        "cloud": F.cross_entropy(exits.cloud, y),
    }


def _correct(exits: Exits, y: Tensor, present: Tensor) -> dict[str, tuple[int, int]]:
    device_hits = (exits.device.argmax(-1) == y[:, None]) & present
    counts = {"device": (int(device_hits.sum()), int(present.sum()))}
    for name in ("local", "edge", "cloud"):
        counts[name] = (int((getattr(exits, name).argmax(-1) == y).sum()), int(y.numel()))
    return counts


def train(model: DDNN, data: Dataset, *, epochs: int, batch_size: int = 64, lr: float = 0.01,
          seed: int = 0, device_dropout: float = 0.15,
          exit_weights: dict[str, float] | None = None, progress: bool = True) -> TrainReport:
    """Train all exits jointly on ``data.train()``; deterministic for a given ``seed``.

    Sets the devices' normalisation statistics from the training data first. AdamW with a
    one-cycle learning-rate schedule peaking at ``lr`` converges in the few epochs that a demo
    can afford. Limits torch to at most two threads (the target machines have two cores).
    Weights missing from ``exit_weights`` keep :data:`DEFAULT_EXIT_WEIGHTS`.
    """
    weights = _check_arguments(model, data, epochs, device_dropout, exit_weights)
    torch.set_num_threads(min(MAX_THREADS, torch.get_num_threads()))
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    train_set = data.train()
    for name, (mean, std) in channel_stats(train_set).items():
        model.devices[name].set_normalization(mean, std)
    batches = _Batches(torch.from_numpy(train_set.stacked()), torch.from_numpy(train_set.y),
                       batch_size, device_dropout, rng)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr,
                                                   total_steps=epochs * len(batches))
    model.train()
    start = time.perf_counter()
    with tqdm(total=epochs * len(batches), disable=not progress, desc="train", unit="batch") as bar:
        for epoch in range(epochs):
            loss_sum, samples = 0.0, 0
            tally = {name: [0, 0] for name in EXITS}
            for xb, yb, present in batches:
                exits = model(xb, present)
                losses = exit_losses(exits, yb, present)
                loss = sum(weights[name] * losses[name] for name in EXITS)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                loss_sum += loss.item() * len(yb)
                samples += len(yb)
                for name, (hits, total) in _correct(exits, yb, present).items():
                    tally[name][0] += hits
                    tally[name][1] += total
                bar.update()
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss_sum / samples:.3f}")
    model.eval()
    accuracy = {name: hits / max(total, 1) for name, (hits, total) in tally.items()}
    return TrainReport(epochs=epochs, seconds=time.perf_counter() - start,
                       final_loss=loss_sum / samples, accuracy=accuracy)


def _check_arguments(model: DDNN, data: Dataset, epochs: int, device_dropout: float,
                     exit_weights: dict[str, float] | None) -> dict[str, float]:
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if not 0 <= device_dropout < 1:
        raise ValueError(f"device_dropout must be in [0, 1), got {device_dropout}")
    unknown = set(exit_weights or {}) - set(EXITS)
    if unknown:
        raise ValueError(f"unknown exits in exit_weights: {sorted(unknown)}; known: {EXITS}")
    if tuple(data.sensor_names) != model.spec.sensors:
        raise ValueError(f"data sensors {data.sensor_names} differ from the model's "
                         f"{list(model.spec.sensors)}")
    return {**DEFAULT_EXIT_WEIGHTS, **(exit_weights or {})}


class _Batches:
    """Shuffled mini-batches ``(x float32, y, present)``, a new order and dropout each pass."""

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, dropout: float,
                 rng: np.random.Generator) -> None:
        self.x, self.y, self.batch_size, self.dropout, self.rng = x, y, batch_size, dropout, rng

    def __len__(self) -> int:
        return -(-len(self.y) // self.batch_size)

    def __iter__(self):
        order = torch.from_numpy(self.rng.permutation(len(self.y)))
        for start in range(0, len(order), self.batch_size):
            index = order[start:start + self.batch_size]
            present = sample_present(self.rng, len(index), self.x.shape[1], self.dropout)
            yield self.x[index].float(), self.y[index], torch.from_numpy(present)


@torch.no_grad()
def predict(model: DDNN, data: Dataset, present: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Logits of every exit in eval mode: ``device`` ``[N, K, C]``; ``local``, ``edge``, ``cloud``
    ``[N, C]``.

    ``present`` (bool ``[N, K]``, default all True) marks which devices take part.
    """
    if tuple(data.sensor_names) != model.spec.sensors:
        raise ValueError(f"data sensors {data.sensor_names} differ from the model's "
                         f"{list(model.spec.sensors)}")
    n, k = len(data), len(model.spec.sensors)
    if present is None:
        present = np.ones((n, k), bool)
    present = np.asarray(present, bool)
    if present.shape != (n, k):
        raise ValueError(f"present must have shape {(n, k)}, got {present.shape}")
    if not present.any(axis=1).all():
        raise ValueError("every sample needs at least one present device")
    model.eval()
    x_all = torch.from_numpy(data.stacked())
    mask = torch.from_numpy(present)
    outputs: dict[str, list[np.ndarray]] = {name: [] for name in EXITS}
    for start in range(0, n, PREDICT_BATCH):
        part = slice(start, start + PREDICT_BATCH)
        exits = model(x_all[part].float(), mask[part])
        for name in EXITS:
            outputs[name].append(getattr(exits, name).numpy())
    return {name: np.concatenate(chunks) for name, chunks in outputs.items()}
