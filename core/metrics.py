"""Small measuring helpers the tiers share for their stats: a bounded latency window, a rate
since the last snapshot, and a probe of this process's memory and CPU.

No psutil: the probe reads ``/proc/self/statm`` (Linux) and ``time.process_time()``, which
cost a few microseconds (docs/monitoring.md), and falls back to :mod:`resource` elsewhere.
"""
from __future__ import annotations

import logging
import math
import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable

WINDOW = 1024
"""Samples a latency window keeps by default: the newest ones; older ones fall out."""


class Window:
    """The newest ``size`` samples (a bounded deque), and their percentiles."""

    def __init__(self, size: int = WINDOW) -> None:
        if size < 1:
            raise ValueError(f"a window holds at least one sample, got size {size}")
        self._samples: deque[float] = deque(maxlen=size)

    def add(self, value: float) -> None:
        if math.isfinite(value):
            self._samples.append(float(value))

    def __len__(self) -> int:
        return len(self._samples)

    def percentiles(self, *qs: float) -> dict[str, float | None]:
        """``{"p50": ..., "p99": ...}`` by nearest rank, rounded to 0.001; None when empty."""
        ordered = sorted(self._samples)
        return {f"p{q:g}": nearest_rank(ordered, q) for q in qs}


def nearest_rank(ordered: list[float], q: float) -> float | None:
    """The ``q``-th percentile (0 < q <= 100) of sorted samples by the nearest-rank method."""
    if not 0 < q <= 100:
        raise ValueError(f"percentile {q} is not in (0, 100]")
    if not ordered:
        return None
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return round(ordered[rank - 1], 3)


class Rate:
    """Events per second between two readings of a growing counter (the last snapshot and now)."""

    def __init__(self, count: int = 0, at: float = 0.0) -> None:
        self._count, self._at = count, at

    def per_second(self, count: int, now: float) -> float:
        elapsed = now - self._at
        rate = (count - self._count) / elapsed if elapsed > 0 else 0.0
        self._count, self._at = count, now
        return round(max(rate, 0.0), 3)


@dataclass(frozen=True, slots=True)
class ProcessSample:
    rss_mb: float | None
    cpu_s: float
    cpu_percent: float | None


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_mb() -> float | None:
    """Resident memory of this process now, in MiB; the peak when /proc is not there."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return round(int(f.read().split()[1]) * _PAGE / 2**20, 1)
    except (OSError, IndexError, ValueError):
        pass
    try:
        import resource   # not on Windows
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    except (ImportError, OSError):
        return None


class ProcessProbe:
    """RSS and CPU of this process: CPU seconds so far, and percent of one core since the last
    :meth:`sample` (None on the first)."""

    def __init__(self) -> None:
        self._last: tuple[float, float] | None = None

    def sample(self) -> ProcessSample:
        cpu, wall = time.process_time(), time.monotonic()
        percent = None
        if self._last is not None and wall > self._last[1]:
            percent = round(100.0 * (cpu - self._last[0]) / (wall - self._last[1]), 1)
        self._last = (cpu, wall)
        return ProcessSample(rss_mb(), round(cpu, 3), percent)


def ratio(part: float, whole: float) -> float | None:
    """``part / whole`` rounded to 0.0001, None when there is no whole."""
    return round(part / whole, 4) if whole else None


def ages(seen: dict[str, float], now: float, names: Iterable[str] = ()) -> dict[str, float | None]:
    """Seconds since each name was last seen (None: never), for ``names`` and every seen one."""
    return {n: (round(now - seen[n], 1) if n in seen else None) for n in sorted({*names, *seen})}


class Throttled:
    """A per-event log line at most once per ``period`` seconds for each ``key``: the others
    are counted and the count is told with the next line. A flood of one kind of event (a
    gateway far behind, a cloud gone) then costs a line per period, not one per event."""

    def __init__(self, logger: logging.Logger, monotonic: Callable[[], float], period: float = 10.0) -> None:
        self.logger, self.monotonic, self.period = logger, monotonic, period
        self._at: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def warning(self, key: str, msg: str, *args: object) -> None:
        now = self.monotonic()
        if now - self._at.get(key, -math.inf) < self.period:
            self._held[key] = self._held.get(key, 0) + 1
            return
        self._at[key] = now
        held = self._held.pop(key, 0)
        self.logger.warning(msg + (f" ({held} more like it in the last {self.period:.0f}s)" if held else ""), *args)
