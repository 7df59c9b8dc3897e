"""Choosing exit thresholds and codec parameters from held-out data (numpy only)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fogsplit.core.exits import normalized_entropy


@dataclass(frozen=True)
class CascadePoint:
    local: float
    edge: float
    accuracy: float
    exit_fraction: dict[str, float]
    cost: float


def simulate_cascade(logits: dict[str, np.ndarray], y: np.ndarray, local: float, edge: float) -> tuple[float, dict]:
    """Accuracy and exit fractions of the local -> edge -> cloud cascade at two thresholds."""
    h_local = normalized_entropy(logits["local"])
    h_edge = normalized_entropy(logits["edge"])
    at_local = h_local < local
    at_edge = ~at_local & (h_edge < edge)
    at_cloud = ~at_local & ~at_edge
    pred = np.where(at_local, logits["local"].argmax(1),
                    np.where(at_edge, logits["edge"].argmax(1), logits["cloud"].argmax(1)))
    n = len(y)
    return float((pred == y).mean()), {"local": at_local.sum() / n, "edge": at_edge.sum() / n,
                                       "cloud": at_cloud.sum() / n}


def calibrate_thresholds(logits: dict[str, np.ndarray], y: np.ndarray, *, max_accuracy_drop: float,
                         feature_cost: float, forward_cost: float, steps: int = 41) -> CascadePoint:
    """The cheapest thresholds (expected bytes per event) whose accuracy on ``y`` stays within
    ``max_accuracy_drop`` of the cloud exit's. ``feature_cost`` is what an event that does not
    exit locally costs (the request and every device's feature); ``forward_cost`` what going on
    to the cloud adds."""
    target = float((logits["cloud"].argmax(1) == y).mean()) - max_accuracy_drop
    best: CascadePoint | None = None
    grid = np.linspace(0.0, 1.0, steps)
    for local in grid:
        for edge in grid:
            accuracy, fractions = simulate_cascade(logits, y, float(local), float(edge))
            if accuracy < target:
                continue
            cost = (1 - fractions["local"]) * feature_cost + fractions["cloud"] * forward_cost
            point = CascadePoint(float(local), float(edge), accuracy, fractions, cost)
            if best is None or (cost, -accuracy) < (best.cost, -best.accuracy):
                best = point
    assert best is not None  # local = edge = 0 sends everything to the cloud and always qualifies
    return best
