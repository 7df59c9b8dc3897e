"""Fusion of a cell's devices, the numpy twin of the training-time fusion in export/model.py.

max and mean take only the devices that answered; weighted (the local exit of an export that
learnt how much to trust each device) sums the answering devices' log-probabilities, each
times its weight: a product of experts in which a device that misleads on validation counts
less; concat keeps every device's slot in
sensor order and fills an absent device with zeros (the model is trained with random
device dropout, so a dead camera costs a little accuracy and never blocks an event).
"""
from __future__ import annotations

import numpy as np


def log_softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    shifted = logits - logits.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


def fuse(arrays: dict[str, np.ndarray], sensors: list[str], mode: str,
         weights: dict[str, float] | None = None) -> np.ndarray:
    """Fuse per-device arrays (same shape) into one, by ``max``, ``mean``, ``concat`` or
    ``weighted`` (logits only; ``weights`` per sensor)."""
    present = [arrays[s] for s in sensors if s in arrays]
    if not present:
        raise ValueError("nothing to fuse: no device answered")
    if mode == "weighted":
        if weights is None:
            raise ValueError("weighted fusion needs a weight per sensor")
        return sum(weights[s] * log_softmax(np.asarray(arrays[s], np.float32)) for s in sensors if s in arrays)
    if mode == "max":
        return np.max(present, axis=0)
    if mode == "mean":
        return np.mean(present, axis=0)
    if mode == "concat":
        zero = np.zeros_like(present[0])
        return np.concatenate([arrays.get(s, zero) for s in sensors], axis=0)
    raise ValueError(f"unknown fusion {mode!r}")


def with_local(edge_logits: np.ndarray, local_logits: np.ndarray) -> np.ndarray:
    """An edge answer that also weighs what the local aggregator concluded (DDNN's hierarchy:
    the edge sees the local exit's evidence): the product of the two distributions, as
    log-probabilities. The fog nodes' ensemble answers this way (docs/eddl.md): when a node is
    lost, the devices' own scores make up much of what its slice carried."""
    return log_softmax(np.asarray(edge_logits, np.float32)) + log_softmax(np.asarray(local_logits, np.float32))
