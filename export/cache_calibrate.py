"""Choosing the semantic cache's distance threshold on held-out data (numpy only).

Leave-one-out: every held-out event is looked up in a cache holding all the other held-out
events, keyed by their feature and labelled with the model's own answer (what the cache holds
at run time: cloud answers and confident edge exits). The threshold is the largest distance at
which answering from the cache where it hits, and from the model elsewhere, loses at most
``max_accuracy_loss`` of accuracy over all held-out events, at that threshold and every
smaller one.

The walk votes over the single nearest neighbour (``k=1``), whatever ``k`` the cache runs
with: a cache serving a stream is sparse (a handful of scenes, all of one label near any key),
so the homogeneity check seldom has two labels to compare there, and the threshold should hold
without its help. (On the benchmark bundle the gateway threshold came out the same, 0.9285,
with ``k=4``: the choice is a bound on the worst case, not a measured gain.)
"""
from __future__ import annotations

import numpy as np

from fogsplit.core.cache import cell_vote
from fogsplit.core.manifest import CachePoint


def unit_rows(features: np.ndarray) -> np.ndarray:
    """``[N, ...]`` -> ``[N, D]`` float32 rows of unit L2 norm (the cache's keys)."""
    flat = np.asarray(features, dtype=np.float32).reshape(len(features), -1)
    norms = np.linalg.norm(flat, axis=1, keepdims=True)
    return flat / np.where(norms > 0, norms, 1.0)


def leave_one_out_neighbours(keys: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """For each row, the indices ``[N, k]`` and distances of its ``k`` nearest other rows."""
    squared = np.maximum(2.0 - 2.0 * keys @ keys.T, 0.0)
    np.fill_diagonal(squared, np.inf)
    k = min(k, len(keys) - 1)
    nearest = np.argsort(squared, axis=1)[:, :k]
    return nearest, np.sqrt(np.take_along_axis(squared, nearest, axis=1))


def cache_votes(neighbour_labels: np.ndarray, distances: np.ndarray, threshold: float, classes: int,
                min_agreement: float) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised :func:`fogsplit.core.cache.vote` over queries: (hit mask [N], voted label [N])."""
    near = distances <= threshold
    counts = np.zeros((len(near), classes))
    for c in range(classes):
        counts[:, c] = ((neighbour_labels == c) & near).sum(axis=1)
    within = near.sum(axis=1)
    top = counts.argmax(axis=1)
    share = counts.max(axis=1) / np.maximum(within, 1)
    return (within > 0) & (share >= min_agreement), top


def calibrate_cache_threshold(features: np.ndarray, answers: np.ndarray, y: np.ndarray, *, classes: int,
                              k: int, min_agreement: float, max_accuracy_loss: float,
                              steps: int = 64) -> CachePoint:
    """The largest safe threshold for one cache keyed by ``features`` [N, ...] (the gateway's
    fused feature), whose cached labels are the model's ``answers`` [N] and whose truth is ``y``."""
    if len(features) < 2:
        raise ValueError("calibrating a cache threshold needs at least 2 held-out events")
    nearest, distances = leave_one_out_neighbours(unit_rows(features), k)

    def decide(threshold: float) -> tuple[np.ndarray, np.ndarray]:
        return cache_votes(answers[nearest], distances, threshold, classes, min_agreement)

    return _largest_safe(decide, distances[:, 0], answers, y, max_accuracy_loss, steps)


def calibrate_cell_threshold(device_features: list[np.ndarray], own_labels: list[np.ndarray], answers: np.ndarray,
                             y: np.ndarray, *, classes: int, k: int, min_agreement: float, quorum: float,
                             max_accuracy_loss: float, steps: int = 64) -> CachePoint:
    """The largest safe threshold for the devices' own caches (one per device, keyed by that
    device's feature, one threshold for all), judged on the cell's decision: :func:`cell_vote`.
    ``own_labels`` [N] per device is what the device's own exit predicts: a device votes only
    for a cached label its exit agrees with, as at run time."""
    if len(answers) < 2:
        raise ValueError("calibrating a cache threshold needs at least 2 held-out events")
    neighbours = [leave_one_out_neighbours(unit_rows(f), k) for f in device_features]
    names = [str(d) for d in range(len(device_features))]

    def decide(threshold: float) -> tuple[np.ndarray, np.ndarray]:
        votes = []
        for (nearest, distances), own in zip(neighbours, own_labels):
            hit, label = cache_votes(answers[nearest], distances, threshold, classes, min_agreement)
            votes.append((hit & (label == own), label))
        labels = [cell_vote({d: int(label[i]) if hit[i] else None for d, (hit, label) in zip(names, votes)},
                            quorum) for i in range(len(answers))]
        hit = np.array([label is not None for label in labels])
        return hit, np.array([-1 if label is None else label for label in labels])

    nearest_any = np.concatenate([distances[:, 0] for _, distances in neighbours])
    return _largest_safe(decide, nearest_any, answers, y, max_accuracy_loss, steps)


def _largest_safe(decide, nearest: np.ndarray, answers: np.ndarray, y: np.ndarray, max_accuracy_loss: float,
                  steps: int) -> CachePoint:
    """Walk thresholds up the quantiles of the nearest-neighbour distances; stop at the first at
    which answering from the cache where it hits (the model elsewhere) loses more than
    ``max_accuracy_loss`` of accuracy over all held-out events."""
    candidates = np.unique(np.quantile(nearest, np.linspace(0, 1, steps)))
    model_correct = answers == y
    best = CachePoint(threshold=0.0, hit_rate=0.0, hit_accuracy=0.0, model_accuracy=0.0, queries=len(y))
    for threshold in candidates:
        hit, label = decide(float(threshold))
        if not hit.any():
            continue
        mixed_correct = np.where(hit, label == y, model_correct)
        if model_correct.mean() - mixed_correct.mean() > max_accuracy_loss + 1e-12:
            break
        best = CachePoint(threshold=float(np.floor(threshold * 1e4) / 1e4), hit_rate=round(float(hit.mean()), 4),
                          hit_accuracy=round(float((label[hit] == y[hit]).mean()), 4),
                          model_accuracy=round(float(model_correct[hit].mean()), 4), queries=len(y))
    return best
