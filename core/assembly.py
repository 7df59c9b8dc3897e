"""Assembling an event from the frames of a cell's devices, with a deadline.

Pure bookkeeping over a clock the caller passes in: no threads, no MQTT, so it is tested
by calling it. An event opens with its first frame and is ready when every device that is
online has sent its part, or when its deadline passes (a dead device never blocks it).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Event:
    event: int
    opened: float                      # monotonic time of the first frame
    captured: float                    # earliest capture time (epoch seconds) of its frames
    deadline: float
    parts: dict[str, np.ndarray] = field(default_factory=dict)
    stage: str = "scores"              # "scores", "features", "fog", then "cloud" (waiting for its answer)
    waiting_for: frozenset[str] = frozenset()
    features: dict[str, np.ndarray] = field(default_factory=dict)
    local_logits: np.ndarray | None = None
    votes: dict[str, int | None] = field(default_factory=dict)   # each device's cache vote, if it has a cache
    late_s: float | None = None        # opened by a replayed frame: how long after its capture
    forward: bytes | None = None       # stage "cloud": the frame forwarded, sent again if unanswered
    tries: int = 0                     # forwards so far
    edge_logits: np.ndarray | None = None
    answered_by: list[str] = field(default_factory=list)        # the devices whose features made the edge answer
    nodes: list[str] | None = None

    @property
    def devices(self) -> list[str]:
        return sorted(self.parts)


class Assembler:
    """Open events of one cell; finished ids are remembered so late frames are recognised."""

    def __init__(self, sensors: list[str], deadline_s: float, *, max_open: int = 4096,
                 remember: int = 65536) -> None:
        self.sensors = list(sensors)
        self.deadline_s = deadline_s
        self.max_open = max_open
        self.online: set[str] = set(sensors)
        self.open: dict[int, Event] = {}
        self._finished: OrderedDict[int, None] = OrderedDict()
        self._remember = remember

    def expected(self) -> set[str]:
        return self.online & set(self.sensors)

    def is_finished(self, event: int) -> bool:
        return event in self._finished

    def add(self, event: int, device: str, value: np.ndarray, captured: float, now: float) -> Event | None:
        """Record one device's part; returns the event when it has become ready, else None."""
        if event in self._finished:
            return None
        ev = self.open.get(event)
        if ev is None:
            if len(self.open) >= self.max_open:
                oldest = min(self.open.values(), key=lambda e: e.opened)
                oldest.deadline = now
            ev = Event(event=event, opened=now, captured=captured, deadline=now + self.deadline_s)
            self.open[event] = ev
        if device in ev.parts:
            return None
        ev.parts[device] = value
        ev.captured = min(ev.captured, captured)
        self.online.add(device)
        return ev if self.expected() <= set(ev.parts) else None

    def expired(self, now: float) -> list[Event]:
        """Events whose deadline has passed, oldest first."""
        return sorted((e for e in self.open.values() if e.deadline <= now), key=lambda e: e.deadline)

    def next_deadline(self) -> float | None:
        return min((e.deadline for e in self.open.values()), default=None)

    def finish(self, event: int) -> Event | None:
        self._finished[event] = None
        while len(self._finished) > self._remember:
            self._finished.popitem(last=False)
        return self.open.pop(event, None)
