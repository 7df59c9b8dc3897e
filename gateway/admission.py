"""Admission control: how much of the devices' live stream a gateway that is behind takes.

A gateway that cannot keep up cannot catch up by shedding what it reads: what it has not read
yet waits in the broker's queue and in the sockets' buffers, so each frame it reads is older
than the last, every one is stale by the time it is read, and nothing is answered in time
(`bench load`'s overload row before this module: 0 of 30,000 events answered within 15 s).
The sources have to slow down, as TCP's senders do. So the gateway measures how far behind
the stream it is, and every ack tells the devices what share of their live events to publish:
``keep`` = k asks for the events ``e % k == 0`` only, the same events on every device, so the
events the gateway takes are whole. The others stay in the devices' spools and are replayed,
answered late, once the gateway has caught up (docs/reliability.md, "Overload").

A live frame's *lag* is its age when handled (gateway clock minus capture time) less its
device's usual age (clock offset plus transit), so a device whose clock is off by a second is
not taken for a backlog. The usual age is LEDBAT's base delay made robust: the least of the
per-second medians of that device's ages over the last ``BASELINE_S`` seconds, so that one
frame (a forged one, a clock step) cannot move it. Per period between two acks:

- *behind*: a frame waited too long in the gateway's inbox (``shed``), or in every period of
  the last ``REACT_S`` most live frames (over ``LAGGING_SHARE``) lagged more than
  ``target_s``. A burst (a GC pause, a busy neighbour on the board) is not a backlog, and
  neither are a few stale frames among fresh ones (one device with a broken clock is a
  sixth of a cell's frames); a backlog lasts. A flood of stale frames larger than the cell's
  own traffic does thin the stream: it is load. The broker's ACL (docs/access.md) keeps
  anyone but the device off its topics.
- behind and the lag not falling since ``keep`` last changed: ``keep`` goes up, at most once
  per ``REACT_S`` and up to ``MAX_KEEP``. A gateway that is behind works flat out, so the
  live frames it took per second since it fell behind are its capacity; with the rate the
  devices announced (frames per second at ``keep`` = 1) that gives the ``keep`` that leaves
  ``HEADROOM`` of it free for the backlog to drain: ``keep`` goes there, by one at least and
  at most twice what it was (doubles when either rate is unknown). Behind but the lag falling: ``keep`` holds
  while the backlog drains.
- not behind for ``CALM_S``: ``keep`` falls by a quarter (at least 1), back to 1.

That is TCP's congestion control, inverted: cut the share taken at once, give it back slowly.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass, field, replace

from fogsplit.core.frames import MAX_KEEP

BASELINE_S = 60       # seconds of per-second medians the usual age is the least of
LAGGING_SHARE = 0.5
REACT_S = 0.5
CALM_S = 1.0
HEADROOM = 0.8        # the share of its capacity a thinned stream may take


@dataclass
class AdmissionStats:
    """What an operator reads under the gateway's stats ``admission``."""

    keep: int = 1                 # now: the devices publish live 1 event in ``keep``
    busy_s: float = 0.0           # seconds the acks said "busy" (shedding or thinning)
    thinned_s: float = 0.0        # of which the devices were asked to thin their stream
    raises: int = 0               # times ``keep`` went up
    lag_ms: float = 0.0           # the largest lag of a live frame in the last period
    base_ms: dict[str, float] = field(default_factory=dict)   # per device: its usual age (clock offset plus transit)
    capacity_fps: float | None = None   # live frames per second taken, measured the last time it was behind


class Admission:
    """A plain object: ``lag`` for every live frame, ``took`` for each one not shed, ``shed``
    for every frame the inbox shed, ``update`` once per ack period, which returns ``keep``;
    ``busy`` says whether the last period asked the devices to hold their replays."""

    def __init__(self, *, target_s: float, now: float) -> None:
        if target_s <= 0:
            raise ValueError(f"the lag target must be positive, got {target_s}")
        self.target_s = target_s
        self.keep = 1
        self.busy = False
        self.stats = AdmissionStats()
        self._baselines: dict[str, _UsualAge] = {}
        self._calm_since = self._period_start = now
        self._changed_at = now - REACT_S          # the first time behind is acted on at once
        self._lagging_since: float | None = None  # since when most live frames lag
        self._lag_at_change = 0.0                 # the mean lag when keep last went up
        self._shed = self._frames = self._lagging = self._taken = 0
        self._max_lag = self._lag_sum = 0.0
        self._behind_taken = 0                    # live frames taken since the gateway fell behind

    def lag(self, device: str, age_s: float, now: float) -> float:
        """The lag of a live frame from ``device`` handled ``age_s`` after its capture."""
        usual = self._baselines.get(device)
        if usual is None:
            usual = self._baselines[device] = _UsualAge(now)
        lag = max(0.0, age_s - usual.add(age_s, now))
        self._frames += 1
        self._lagging += lag > self.target_s
        self._lag_sum += lag
        self._max_lag = max(self._max_lag, lag)
        return lag

    def shed(self, frames: int = 1) -> None:
        """Frames that waited too long in the gateway's own inbox: it is behind at once."""
        self._shed += frames

    def took(self) -> None:
        """A live frame was taken (not shed): the gateway's throughput."""
        self._taken += 1

    def update(self, now: float, offered_fps: float | None = None) -> int:
        """Close the period: adjust the share of live events taken; the ``keep`` to announce.
        ``offered_fps``: the live frames per second the devices send at ``keep`` = 1."""
        if self._frames and self._lagging > LAGGING_SHARE * self._frames:
            if self._lagging_since is None:
                self._lagging_since, self._behind_taken = self._period_start, 0
            self._behind_taken += self._taken
        else:
            self._lagging_since = None            # fresh frames, or none at all: nothing to be behind on
        lagging = self._lagging_since is not None and now - self._lagging_since >= REACT_S
        behind = self._shed > 0 or lagging
        mean_lag = self._lag_sum / self._frames if self._frames else None
        if behind:
            self._calm_since = now
            rising = mean_lag is None or mean_lag >= self._lag_at_change
            if rising and now - self._changed_at >= REACT_S and self.keep < MAX_KEEP:
                self.keep = min(MAX_KEEP, self._next_keep(now, offered_fps))
                self._changed_at = now
                self._lag_at_change = mean_lag or 0.0
                self.stats.raises += 1
        elif self.keep > 1 and now - self._calm_since >= CALM_S and now - self._changed_at >= CALM_S:
            self.keep -= max(1, self.keep // 4)
            self._changed_at = now
            self._lag_at_change = 0.0
        elapsed = max(0.0, now - self._period_start)
        keep = self.keep
        self.busy = behind or keep > 1
        self.stats.busy_s += elapsed if self.busy else 0.0
        self.stats.thinned_s += elapsed if keep > 1 else 0.0
        self.stats.lag_ms = round(self._max_lag * 1000.0, 1)
        self._period_start = now
        self._shed = self._frames = self._lagging = self._taken = 0
        self._max_lag = self._lag_sum = 0.0
        return keep

    def snapshot(self) -> dict:
        """What the gateway's stats carry under ``admission``."""
        return asdict(replace(self.stats, keep=self.keep,
                              base_ms={d: round(1000.0 * u.value, 1) for d, u in self._baselines.items()}))

    def _next_keep(self, now: float, offered_fps: float | None) -> int:
        since = self._lagging_since
        capacity = self._behind_taken / (now - since) if since is not None and now > since else 0.0
        if not offered_fps or capacity <= 0:
            return 2 * self.keep
        self.stats.capacity_fps = round(capacity, 1)
        return max(self.keep + 1, min(2 * self.keep, math.ceil(offered_fps / (HEADROOM * capacity))))


class _UsualAge:
    """A device's usual age: the least per-second median of its frames' ages over the last
    ``BASELINE_S`` seconds (before the first second closes, the least age seen)."""

    def __init__(self, now: float) -> None:
        self.second = math.floor(now)
        self.ages: list[float] = []
        self.medians: deque[float] = deque(maxlen=BASELINE_S)
        self.value = math.inf

    def add(self, age_s: float, now: float) -> float:
        second = math.floor(now)
        if second != self.second and self.ages:
            self.ages.sort()
            self.medians.append(self.ages[len(self.ages) // 2])
            self.value = min(self.medians)
            self.ages = []
        self.second = second
        self.ages.append(age_s)
        if not self.medians:
            self.value = min(self.value, age_s)
        return self.value
