"""The result an application reads on ``cell/{cell}/result``: JSON, one per event."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

import numpy as np

from fogsplit.exits import softmax

EXIT_TIERS = ("local", "edge", "cloud", "cache")  # cache: answered from a semantic cache (docs/cache.md)


@dataclass(frozen=True)
class Result:
    event: int
    label: int
    cls: str
    confidence: float
    exit: str
    devices: list[str]
    captured: float
    latency_ms: float
    model: str
    degraded: bool = False

    def to_json(self) -> bytes:
        body = asdict(self)
        body["class"] = body.pop("cls")
        return json.dumps(body).encode()

    @classmethod
    def from_json(cls, payload: bytes) -> "Result":
        body = json.loads(payload)
        body["cls"] = body.pop("class")
        return cls(**body)


def make_result(logits: np.ndarray, *, event: int, exit: str, classes: tuple[str, ...] | list[str],
                devices: list[str], captured: float, model: str, degraded: bool = False) -> Result:
    p = softmax(np.asarray(logits, dtype=np.float64))
    label = int(np.argmax(p))
    return Result(event=event, label=label, cls=classes[label], confidence=round(float(p[label]), 4),
                  exit=exit, devices=list(devices), captured=captured,
                  latency_ms=round((time.time() - captured) * 1000.0, 3), model=model,
                  degraded=degraded)
