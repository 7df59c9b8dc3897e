"""Where a device's samples come from.

A source yields captures on a schedule shared by the whole cell: capture slot ``n`` happens at
``n / rate`` seconds since the epoch, and ``n`` is the event id. Devices whose clocks agree
(NTP) therefore give the same id to the same moment without talking to each other, the way
a cell of cameras is triggered together. A camera or a serial IMU implements the same
``read`` method.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Iterator, Protocol

import numpy as np


@dataclass(frozen=True, slots=True)
class Capture:
    event: int
    captured: float       # epoch seconds
    sample: np.ndarray    # one raw sample, [C, H, W] or [C, T]


class Source(Protocol):
    rate: float           # captures per second, the cell's common slot rate

    def captures(self) -> Iterator[Capture]: ...


class ReplaySource:
    """Replays the samples of one sensor from a dataset split, paced by the cell's clock.

    ``start_slot`` fixes which slot plays sample 0 (the demo sets it for the whole cell);
    without it, slot ``n`` plays sample ``n mod N``, so independently started devices agree.

    Pacing never bursts: a source that fell behind its schedule (the process was frozen, the
    machine overloaded) skips to the current slot instead of firing every missed capture at
    once, and counts the slots it skipped in ``skipped``. A lag shorter than ``CATCH_UP_S`` is
    scheduling jitter and is caught up, so that no event of a replay is lost to it.
    """

    CATCH_UP_S = 1.0

    def __init__(self, samples: np.ndarray, *, rate: float, start_slot: int | None = None,
                 count: int | None = None, loop: bool = False) -> None:
        if rate <= 0 or not math.isfinite(rate):
            raise ValueError(f"rate must be a positive number of captures per second, got {rate}")
        if len(samples) == 0:
            raise ValueError("no samples to replay")
        self.samples = samples
        self.rate = rate
        self.start_slot = start_slot
        self.count = count if count is not None else (None if loop else len(samples))
        self._stop = False
        self.skipped = 0

    def stop(self) -> None:
        self._stop = True

    def captures(self) -> Iterator[Capture]:
        slot = self.start_slot if self.start_slot is not None else math.ceil(time.time() * self.rate)
        first = slot
        while not self._stop and (self.count is None or slot - first < self.count):
            due = slot / self.rate
            delay = due - time.time()
            if delay > 0:
                time.sleep(delay)
            elif -delay > max(self.CATCH_UP_S, 2 / self.rate):
                now_slot = math.floor(time.time() * self.rate)
                self.skipped += now_slot - slot
                slot = now_slot
                if self.count is not None and slot - first >= self.count:
                    return
            if self._stop:
                return
            index = (slot - self.start_slot) if self.start_slot is not None else slot
            yield Capture(event=slot, captured=time.time(), sample=self.samples[index % len(self.samples)])
            slot += 1
