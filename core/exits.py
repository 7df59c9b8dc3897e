"""Early exits: a tier answers when its prediction's normalized entropy is low enough."""
from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def normalized_entropy(logits: np.ndarray) -> np.ndarray:
    """H(softmax(logits)) / log(C): 0 for a certain prediction, 1 for a uniform one."""
    p = softmax(np.asarray(logits, dtype=np.float64))
    h = -(p * np.log(np.clip(p, 1e-12, 1.0))).sum(axis=-1)
    return h / np.log(p.shape[-1])


def entropy_exit(logits: np.ndarray, threshold: float) -> bool:
    """True when the tier may answer: normalized entropy strictly below ``threshold``."""
    return bool(normalized_entropy(logits) < threshold)
