"""The device's store-and-forward spool: every event it captured, until the gateway acks it.

An event goes in at capture, with the scores and feature as they were encoded for the wire
and the capture time, and leaves when the cell's gateway acks it (it has answered the event
for good, docs/reliability.md). What is not acked ``reoffer_s`` after capture is replayed as
a ``late`` frame, then again after twice that, up to every ``MAX_REOFFER_S``; the order of
replay is the order of capture. While no ack comes at all (the gateway or the link is down),
only the oldest event is replayed, once per period, as a probe: a dead link is not fed a
backlog it would only queue. While the gateway's acks say it is busy (shedding load), nothing
is replayed: a replay would be more load on a gateway that cannot serve what it has.

It lives in SQLite (core/statefile.py): a killed agent loses nothing, a power cut at most the
last commits, and the file stays consistent. Without a path it is the same store in memory.

Bounds, each counted in :class:`SpoolStats`: ``max_bytes`` of frames (when full, the oldest
event is dropped: ``dropped_full``) and ``max_age_s`` (an event not acked by then is dropped:
``expired``). A dropped event is not forgotten: its frames give way to a lost notice (the
event id, its capture time and the reason, ``NOTICE_BYTES`` of the bound), replayed like an
event until the gateway acks it, so that the application gets an explicit ``lost`` result
instead of silence. Notices not acked within another ``max_age_s`` are deleted
(``notices_expired``): the one silent loss, after two spool ages without a gateway.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fogsplit.core.statefile import open_state

MAX_REOFFER_S = 30.0
NOTICE_BYTES = 16

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spool (
    event INTEGER PRIMARY KEY,
    captured REAL NOT NULL,
    model TEXT NOT NULL,
    scores BLOB NOT NULL,
    feature BLOB,
    vote INTEGER,
    reason TEXT,
    size INTEGER NOT NULL,
    offers INTEGER NOT NULL DEFAULT 0,
    next_offer REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS spool_next_offer ON spool (next_offer);
"""


@dataclass(frozen=True, slots=True)
class Held:
    """One spooled event, as a replay needs it."""

    event: int
    captured: float
    model: str
    scores: bytes
    feature: bytes | None
    vote: int | None
    offers: int
    reason: str | None = None     # a lost notice: why the event's frames were dropped


@dataclass
class SpoolStats:
    held: int = 0
    bytes: int = 0
    acked: int = 0
    replayed: int = 0
    dropped_full: int = 0
    expired: int = 0
    notices: int = 0
    notices_expired: int = 0


class Spool:
    def __init__(self, path: str | Path | None, *, max_bytes: int, max_age_s: float, reoffer_s: float) -> None:
        self.path = None if path is None else Path(path)
        self.max_bytes, self.max_age_s, self.reoffer_s = max_bytes, max_age_s, reoffer_s
        self._db = open_state(path, _SCHEMA)
        held, size = self._db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM spool").fetchone()
        self.stats = SpoolStats(held=held, bytes=size)
        self.last_ack: float | None = None      # epoch time of the last ack that removed an event
        self.hold_until = 0.0                   # a busy gateway asked for no replays until then
        self.resumed = held                     # events found in the file at start

    def put(self, event: int, captured: float, model: str, scores: bytes, feature: bytes | None,
            vote: int | None, now: float) -> list[int]:
        """Hold one captured event; returns the events dropped to stay within ``max_bytes``."""
        size = len(scores) + (len(feature) if feature is not None else 0)
        cur = self._db.execute(
            "INSERT OR IGNORE INTO spool (event, captured, model, scores, feature, vote, size, next_offer) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (event, captured, model, scores, feature, vote, size,
                                                captured + self.reoffer_s))
        if cur.rowcount:
            self.stats.held += 1
            self.stats.bytes += size
        dropped = []
        while self.stats.bytes > self.max_bytes:
            oldest = self._db.execute("SELECT event FROM spool WHERE reason IS NULL ORDER BY event LIMIT 1").fetchone()
            if oldest is None or oldest[0] == event:
                break
            self._to_notice(oldest[0], "dropped: the device's spool was full", now)
            dropped.append(oldest[0])
        self.stats.dropped_full += len(dropped)
        return dropped

    def _to_notice(self, event: int, reason: str, now: float) -> None:
        """The event's frames give way to a lost notice, offered at once."""
        size = self._db.execute("SELECT size FROM spool WHERE event = ?", (event,)).fetchone()[0]
        self._db.execute("UPDATE spool SET scores = x'', feature = NULL, vote = NULL, reason = ?, size = ?, "
                         "next_offer = ? WHERE event = ?", (reason, NOTICE_BYTES, now, event))
        self.stats.bytes += NOTICE_BYTES - size
        self.stats.notices += 1

    def ack(self, events: tuple[int, ...] | list[int], now: float, *, busy: bool = False) -> int:
        """The gateway answered ``events``: drop them. Returns how many were held. ``busy``: the
        gateway is shedding load; replays wait ``reoffer_s`` (each busy ack extends the wait)."""
        if busy:
            self.hold_until = now + self.reoffer_s
        removed = self._remove(events)
        if removed:
            self.stats.acked += removed
            self.last_ack = now
        return removed

    def due(self, now: float, limit: int) -> list[Held]:
        """Events to replay now, oldest first, and schedule their next replay. With no ack for
        longer than ``reoffer_s`` while events were replayed, only the oldest (a probe)."""
        if self.stats.held == 0 or now < self.hold_until:
            return []
        silent = self.stats.replayed > 0 and (self.last_ack is None or now - self.last_ack > self.reoffer_s)
        rows = self._db.execute(
            "SELECT event, captured, model, scores, feature, vote, offers, reason FROM spool WHERE next_offer <= ? "
            "ORDER BY event LIMIT ?", (now, 1 if silent else limit)).fetchall()
        held = [Held(*row) for row in rows]
        self._db.executemany("UPDATE spool SET offers = offers + 1, next_offer = ? WHERE event = ?",
                             [(now + min(self.reoffer_s * 2 ** h.offers, MAX_REOFFER_S), h.event) for h in held])
        self.stats.replayed += len(held)
        return held

    def expire(self, now: float) -> list[int]:
        """Turn the events captured more than ``max_age_s`` ago into lost notices, and delete the
        notices older than twice that; returns the events that expired now."""
        old = [row[0] for row in self._db.execute(
            "SELECT event FROM spool WHERE reason IS NULL AND captured < ? ORDER BY event", (now - self.max_age_s,))]
        for event in old:
            self._to_notice(event, f"dropped: not acked within {self.max_age_s:.0f}s of its capture", now)
        self.stats.expired += len(old)
        stale = [row[0] for row in self._db.execute(
            "SELECT event FROM spool WHERE reason IS NOT NULL AND captured < ?", (now - 2 * self.max_age_s,))]
        self.stats.notices_expired += self._remove(stale)
        return old

    def events(self) -> list[int]:
        return [row[0] for row in self._db.execute("SELECT event FROM spool ORDER BY event")]

    def _remove(self, events) -> int:
        events = list(events)
        if not events:
            return 0
        removed = 0
        for start in range(0, len(events), 500):
            chunk = events[start:start + 500]
            marks = ",".join("?" * len(chunk))
            size, count = self._db.execute(f"SELECT COALESCE(SUM(size), 0), COUNT(*) FROM spool WHERE event IN ({marks})",
                                           chunk).fetchone()
            self._db.execute(f"DELETE FROM spool WHERE event IN ({marks})", chunk)
            self.stats.bytes -= size
            self.stats.held -= count
            removed += count
        return removed

    def close(self) -> None:
        self._db.close()

    def __len__(self) -> int:
        return self.stats.held
