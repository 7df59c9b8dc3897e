"""The logics of one service during a switch of models, and which model owns which event.

A service holds one logic per model it can still serve (the running one; the staged one; the
old one while its events drain). :class:`ModelSet` routes an incoming frame to the logic of
the model its tag names, and answers which model owns an event captured at a time: the
schedule is a list of ``(from, model)``, so a cell's devices and its gateway agree on the
boundary without talking (an event id is a capture slot, docs/architecture.md).
"""
from __future__ import annotations

import bisect
import math
from typing import Generic, TypeVar

import numpy as np

from fogsplit.core.frames import frame_tag
from fogsplit.core.runner import ShardRunner

L = TypeVar("L")


def peek_tag(payload: bytes) -> int | None:
    """The model tag of a frame (a msgpack array whose first item is a fixint), undecoded."""
    if len(payload) >= 2 and 0x91 <= payload[0] <= 0x9F and payload[1] < 0x80:
        return payload[1]
    return None


class ModelSet(Generic[L]):
    def __init__(self, model: str, logic: L) -> None:
        self.logics: dict[str, L] = {model: logic}
        self.schedule: list[tuple[float, str]] = [(-math.inf, model)]

    def add(self, model: str, logic: L) -> None:
        self.logics[model] = logic

    def switch(self, model: str, at: float) -> None:
        """Events captured at or after ``at`` belong to ``model`` (later plans are replaced)."""
        del self.schedule[bisect.bisect_left(self.schedule, (at, "")):]
        self.schedule.append((at, model))

    def forget(self, model: str) -> None:
        """Drop ``model``'s logic, unless it owns the newest part of the schedule."""
        if self.schedule[-1][1] != model:
            self.logics.pop(model, None)

    def model_at(self, t: float) -> str:
        i = bisect.bisect_right(self.schedule, (t, "\uffff")) - 1
        return self.schedule[max(i, 0)][1]

    def logic_at(self, t: float) -> L:
        """The logic of the model that owns an event captured at ``t`` (the newest if it is gone)."""
        return self.logics.get(self.model_at(t)) or self.newest

    @property
    def newest(self) -> L:
        return self.logics.get(self.schedule[-1][1]) or next(reversed(self.logics.values()))

    def owns(self, model: str, t: float) -> bool:
        return self.model_at(t) == model

    def by_tag(self, payload: bytes) -> L | None:
        """The logic whose model the frame's tag names, if this service holds it."""
        tag = peek_tag(payload)
        for model, logic in self.logics.items():
            if frame_tag(model) == tag:
                return logic
        return None


class WatchedRunner:
    """A shard runner that notes non-finite outputs and errors, for the health check."""

    def __init__(self, runner: ShardRunner) -> None:
        self.runner = runner
        self.path = runner.path
        self.failure: str | None = None

    def run(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        try:
            out = self.runner.run(**inputs)
        except Exception as exc:
            self.failure = f"shard {self.path.name} raised {type(exc).__name__}: {exc}"
            raise
        bad = [name for name, value in out.items() if not np.all(np.isfinite(value))]
        if bad:
            self.failure = f"shard {self.path.name} gave non-finite {', '.join(bad)}"
        return out

    def take_failure(self) -> str | None:
        failure, self.failure = self.failure, None
        return failure
