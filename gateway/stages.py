"""The gateway's stages as plain functions over arrays."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fogsplit.core.exits import entropy_exit
from fogsplit.core.fusion import fuse
from fogsplit.core.runner import ShardRunner


@dataclass(frozen=True)
class Decision:
    logits: np.ndarray
    exits: bool


def local_stage(scores: dict[str, np.ndarray], sensors: list[str], fusion: str, threshold: float,
                weights: dict[str, float] | None = None) -> Decision:
    """DDNN's local aggregator: fuse the devices' exit scores, exit if confident."""
    logits = fuse(scores, sensors, fusion, weights)
    return Decision(logits, entropy_exit(logits, threshold))


def edge_stage(runner: ShardRunner, fused: np.ndarray, threshold: float) -> tuple[Decision, np.ndarray]:
    """Run the gateway shard on the fused features, exit if confident.

    Returns the decision and the feature the cloud needs if the gateway does not answer.
    """
    out = runner.run(fused=fused[None])
    logits = out["logits"][0]
    return Decision(logits, entropy_exit(logits, threshold)), out["edge_feature"][0]
