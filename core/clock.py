"""The clock a tier's logic reads, passed in so that the logic is tested without sleeping.

Two readings: ``monotonic()`` for deadlines and ages (never jumps), ``time()`` for capture
times and event ids (epoch seconds, shared by the cell through NTP).
"""
from __future__ import annotations

import time as _time
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float: ...
    def time(self) -> float: ...


class SystemClock:
    """The real clock."""

    def monotonic(self) -> float:
        return _time.monotonic()

    def time(self) -> float:
        return _time.time()


class FakeClock:
    """A clock that moves only when told: ``advance(seconds)`` moves both readings together."""

    def __init__(self, wall: float = 1_700_000_000.0, mono: float = 1000.0) -> None:
        self._wall, self._mono = wall, mono

    def monotonic(self) -> float:
        return self._mono

    def time(self) -> float:
        return self._wall

    def advance(self, seconds: float) -> None:
        self._mono += seconds
        self._wall += seconds


SYSTEM_CLOCK = SystemClock()
