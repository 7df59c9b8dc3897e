"""Joint training of all DDNN exits, and batched prediction.

The loss is the weighted sum of the exits' cross-entropies (Teerapittayanon et al., 2017):
device exits (averaged over the present devices), local, edge and cloud. Each training sample
loses each device with probability ``device_dropout`` (at least one device is always kept), so
that the fused exits learn to cope with a device that is absent at run time.

The recipe is made for small, imperfect sets as much as for the built-in ones
(docs/training.md says what each part bought, measured):

- a budget in optimizer steps that adapts to the data set's size (:func:`auto_steps`): 40
  training windows get hundreds of steps, not the 8 that a fixed epoch count would give them;
- the best checkpoint on the validation set (early stopping), when one is given;
- augmentation by sensor kind (:mod:`fogsplit.export.augment`);
- class weights when the classes are imbalanced.
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from fogsplit.core.dataset import Dataset
from fogsplit.export.augment import Augmenter
from fogsplit.export.model import DDNN, Exits

log = logging.getLogger(__name__)
EXITS = ("device", "local", "edge", "cloud")
DEFAULT_EXIT_WEIGHTS = {"device": 1.0, "local": 0.5, "edge": 1.0, "cloud": 1.0}
MAX_THREADS = 2
PREDICT_BATCH = 256
AUTO_EPOCHS = 8          # the budget for a large set: 8 passes ...
MIN_STEPS = 300          # ... but never fewer steps than this (small sets) ...
MAX_STEPS = 3000         # ... nor more than this (large sets)
EVALUATIONS = 30         # validation checks in a run ...
SETTLED = 0.5            # ... in its second half: the one-cycle schedule's warm-up is over, and an
                         # early checkpoint of a tiny validation set is an untrained model
PATIENCE = 0.4           # stop when the last 40% of the budget brought no better checkpoint
IMBALANCE = 1.5          # class weights when the largest class is this many times the smallest


@dataclass
class TrainReport:
    """Summary of a training run.

    ``final_loss`` is the mean weighted loss of the last steps; ``accuracy`` per exit is over the
    training batches as trained (train mode, with device dropout; ``device`` counts present
    devices only). With a validation set, ``val_accuracy`` holds every exit's accuracy on it at
    ``best_step``, the checkpoint the model was left at: ``device`` per sensor, then ``local``,
    ``edge``, ``cloud``.
    """

    epochs: float
    seconds: float
    final_loss: float
    accuracy: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    best_step: int = 0
    val_accuracy: dict = field(default_factory=dict)


def auto_steps(samples: int, batch_size: int) -> int:
    """The training budget for ``samples``: :data:`AUTO_EPOCHS` passes, within
    [:data:`MIN_STEPS`, :data:`MAX_STEPS`]."""
    batches = -(-samples // batch_size)
    return int(np.clip(AUTO_EPOCHS * batches, MIN_STEPS, MAX_STEPS))


def sample_present(rng: np.random.Generator, batch: int, devices: int,
                   dropout: float) -> np.ndarray:
    """Bool ``[batch, devices]``: each device absent with probability ``dropout``, never all."""
    present = rng.random((batch, devices)) >= dropout
    empty = np.flatnonzero(~present.any(axis=1))
    present[empty, rng.integers(0, devices, empty.size)] = True
    return present


def channel_stats(data: Dataset) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-sensor, per-channel mean and std ``[C]`` of the raw values (NaN left out)."""
    stats = {}
    for name, values in data.sensors.items():
        values = np.moveaxis(np.asarray(values, np.float64), 1, 0).reshape(values.shape[1], -1)
        seen = ~np.isnan(values)
        count = np.maximum(seen.sum(axis=1), 1)
        filled = np.where(seen, values, 0.0)
        mean = filled.sum(axis=1) / count
        var = (np.where(seen, values - mean[:, None], 0.0) ** 2).sum(axis=1) / count
        stats[name] = (mean.astype(np.float32), np.maximum(np.sqrt(var), 1e-6).astype(np.float32))
    return stats


def class_weights(y: np.ndarray, classes: int) -> np.ndarray | None:
    """Inverse-frequency weights (mean 1) when the classes are imbalanced, else None."""
    counts = np.bincount(y, minlength=classes).astype(np.float64)
    seen = counts[counts > 0]
    if seen.max() < IMBALANCE * seen.min():
        return None
    weights = np.where(counts > 0, len(y) / (classes * np.maximum(counts, 1)), 0.0)
    return (weights / weights[counts > 0].mean()).astype(np.float32)


def exit_losses(exits: Exits, y: Tensor, present: Tensor,
                weight: Tensor | None = None) -> dict[str, Tensor]:
    """Cross-entropy of each exit; the device term averages over present devices only."""
    b, k, c = exits.device.shape
    per_device = F.cross_entropy(exits.device.reshape(b * k, c), y.repeat_interleave(k),
                                 weight=weight, reduction="none").reshape(b, k)
    weights = present.to(per_device.dtype)
    return {
        "device": (per_device * weights).sum() / weights.sum(),
        "local": F.cross_entropy(exits.local, y, weight=weight),
        "edge": F.cross_entropy(exits.edge, y, weight=weight),
        "cloud": F.cross_entropy(exits.cloud, y, weight=weight),
    }


def _correct(exits: Exits, y: Tensor, present: Tensor) -> dict[str, tuple[int, int]]:
    device_hits = (exits.device.argmax(-1) == y[:, None]) & present
    counts = {"device": (int(device_hits.sum()), int(present.sum()))}
    for name in ("local", "edge", "cloud"):
        counts[name] = (int((getattr(exits, name).argmax(-1) == y).sum()), int(y.numel()))
    return counts


def logit_accuracy(logits: dict[str, np.ndarray], y: np.ndarray, sensors: tuple[str, ...]) -> dict:
    """Accuracy of every exit in ``logits`` (what :func:`predict` gives) on labels ``y``:
    ``device`` per sensor, ``local``, ``edge``, ``cloud``."""
    hits = logits["device"].argmax(2) == y[:, None]
    out: dict = {"device": {s: round(float(a), 4) for s, a in zip(sensors, hits.mean(0))}}
    out.update({tier: round(float((logits[tier].argmax(1) == y).mean()), 4) for tier in ("local", "edge", "cloud")})
    return out


def exit_accuracy(model: DDNN, data: Dataset) -> dict:
    """Accuracy of every exit on ``data`` with every device present."""
    return logit_accuracy(predict(model, data), data.y, model.spec.sensors)


def _val_score(accuracy: dict) -> float:
    """What the best checkpoint maximises: the mean accuracy of the fused exits."""
    return float(np.mean([accuracy[t] for t in ("local", "edge", "cloud")]))


def train(model: DDNN, data: Dataset, *, epochs: int | None = None, steps: int | None = None,
          batch_size: int = 64, lr: float = 0.01, seed: int = 0, device_dropout: float = 0.15,
          exit_weights: dict[str, float] | None = None, val: Dataset | None = None,
          augment: bool = True, flips: bool = False, progress: bool = True) -> TrainReport:
    """Train all exits jointly on ``data.train()``; deterministic for a given ``seed``.

    The budget is ``steps`` optimizer steps, or ``epochs`` passes, or by default
    :func:`auto_steps`. With ``val``, the model is evaluated every ``1/EVALUATIONS`` of the
    budget in its second half and left at its best checkpoint (the mean accuracy of the fused
    exits; the later one on a tie). Sets
    the devices' normalisation statistics from the training data first. AdamW with a one-cycle
    learning-rate schedule peaking at ``lr``. Limits torch to at most two threads (the target
    machines have two cores). Weights missing from ``exit_weights`` keep
    :data:`DEFAULT_EXIT_WEIGHTS`. ``flips`` lets image augmentation mirror views: only where a
    mirrored view keeps its label.
    """
    weights = _check_arguments(model, data, epochs, steps, device_dropout, exit_weights)
    torch.set_num_threads(min(MAX_THREADS, torch.get_num_threads()))
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    train_set = data.train()
    stats = channel_stats(train_set)
    for name, (mean, std) in stats.items():
        model.devices[name].set_normalization(mean, std)
    batch_size = min(batch_size, len(train_set))
    batches = _Batches([torch.from_numpy(a) for a in train_set.arrays()], torch.from_numpy(train_set.y),
                       batch_size, device_dropout, rng)
    total = steps if steps is not None else epochs * len(batches) if epochs is not None \
        else auto_steps(len(train_set), batch_size)
    augmenter = Augmenter(model.spec.kind, [stats[s] for s in model.spec.sensors], seed=seed, flips=flips) \
        if augment else None
    balance = class_weights(train_set.y, model.spec.num_classes)
    weight = torch.from_numpy(balance) if balance is not None else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total)
    evaluate_every = max(1, total // EVALUATIONS) if val is not None else 0
    best = _Best()
    model.train()
    start = time.perf_counter()
    loss_sum, samples, step = 0.0, 0, 0
    tally = {name: [0, 0] for name in EXITS}
    with tqdm(total=total, disable=not progress, desc="train", unit="step") as bar:
        while step < total and not best.stale(step, total):
            for xb, yb, present in batches:
                if augmenter is not None:
                    xb = augmenter(xb)
                exits = model(xb, present)
                losses = exit_losses(exits, yb, present, weight)
                loss = sum(weights[name] * losses[name] for name in EXITS)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                step += 1
                loss_sum += loss.item() * len(yb)
                samples += len(yb)
                for name, (hits, count) in _correct(exits, yb, present).items():
                    tally[name][0] += hits
                    tally[name][1] += count
                bar.update()
                bar.set_postfix(loss=f"{loss_sum / samples:.3f}")
                if evaluate_every and step >= SETTLED * total and (step % evaluate_every == 0 or step == total):
                    best.offer(model, step, exit_accuracy(model, val))
                    model.train()
                if step >= total or best.stale(step, total):
                    break
    if best.state is not None:
        model.load_state_dict(best.state)
        log.info("best checkpoint at step %d of %d: validation accuracy %s", best.step, step, best.accuracy)
    model.eval()
    accuracy = {name: hits / max(count, 1) for name, (hits, count) in tally.items()}
    return TrainReport(epochs=round(step / len(batches), 2), seconds=time.perf_counter() - start,
                       final_loss=loss_sum / max(samples, 1), accuracy=accuracy, steps=step,
                       best_step=best.step if best.state is not None else step,
                       val_accuracy=best.accuracy or {})


class _Best:
    """The best checkpoint on validation so far."""

    def __init__(self) -> None:
        self.state: dict | None = None
        self.score, self.step, self.accuracy = -1.0, 0, None

    def offer(self, model: DDNN, step: int, accuracy: dict) -> None:
        score = _val_score(accuracy)
        if score >= self.score:
            self.state = copy.deepcopy(model.state_dict())
            self.score, self.step, self.accuracy = score, step, accuracy

    def stale(self, step: int, total: int) -> bool:
        return self.state is not None and step - self.step > PATIENCE * total


def _check_arguments(model: DDNN, data: Dataset, epochs: int | None, steps: int | None, device_dropout: float,
                     exit_weights: dict[str, float] | None) -> dict[str, float]:
    if epochs is not None and epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if epochs is not None and steps is not None:
        raise ValueError("give epochs or steps, not both")
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
    """Shuffled mini-batches ``(xs, y, present)``: ``xs`` each sensor's float32 samples; a new
    order and dropout each pass."""

    def __init__(self, xs: list[Tensor], y: Tensor, batch_size: int, dropout: float,
                 rng: np.random.Generator) -> None:
        self.xs, self.y, self.batch_size, self.dropout, self.rng = xs, y, batch_size, dropout, rng

    def __len__(self) -> int:
        return -(-len(self.y) // self.batch_size)

    def __iter__(self):
        order = torch.from_numpy(self.rng.permutation(len(self.y)))
        for start in range(0, len(order), self.batch_size):
            index = order[start:start + self.batch_size]
            present = sample_present(self.rng, len(index), len(self.xs), self.dropout)
            yield [x[index].float() for x in self.xs], self.y[index], torch.from_numpy(present)


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
    xs = [torch.from_numpy(a) for a in data.arrays()]
    mask = torch.from_numpy(present)
    outputs: dict[str, list[np.ndarray]] = {name: [] for name in EXITS}
    for start in range(0, n, PREDICT_BATCH):
        part = slice(start, start + PREDICT_BATCH)
        exits = model([x[part].float() for x in xs], mask[part])
        for name in EXITS:
            outputs[name].append(getattr(exits, name).numpy())
    return {name: np.concatenate(chunks) for name, chunks in outputs.items()}
