"""Fusion of a cell's devices, the numpy twin of the training-time fusion in export/model.py.

max and mean take only the devices that answered; concat keeps every device's slot in
sensor order and fills an absent device with zeros (the model is trained with random
device dropout, so a dead camera costs a little accuracy and never blocks an event).
"""
from __future__ import annotations

import numpy as np


def fuse(arrays: dict[str, np.ndarray], sensors: list[str], mode: str) -> np.ndarray:
    """Fuse per-device arrays (same shape) into one, by ``max``, ``mean`` or ``concat``."""
    present = [arrays[s] for s in sensors if s in arrays]
    if not present:
        raise ValueError("nothing to fuse: no device answered")
    if mode == "max":
        return np.max(present, axis=0)
    if mode == "mean":
        return np.mean(present, axis=0)
    if mode == "concat":
        zero = np.zeros_like(present[0])
        return np.concatenate([arrays.get(s, zero) for s in sensors], axis=0)
    raise ValueError(f"unknown fusion {mode!r}")
