"""The gateway's journal of answered events: what makes its answers exactly-once.

Every result is written here before it is published, and marked sent once the broker has
acknowledged it. So a gateway killed at any moment and restarted:

- never answers an event twice: a replayed frame of a journaled event is only acked again;
- loses no answer: a result journaled but not acknowledged by the broker is published again
  at start (the one window for a repeat is a kill between the broker's PUBACK and its
  arrival, docs/reliability.md);
- serves an application's replay request (the results since a capture time) from here.

SQLite (core/statefile.py), or the same store in memory without a path; one lock
around it, since the broker's acknowledgement is marked from the network thread the moment it
arrives (a later mark would widen the window for a repeat after a kill). Bounds:
answers older than ``window_s`` (the devices' replay window) and beyond ``max_rows`` are
pruned, oldest first, counted in ``pruned``: a replay of a pruned event would be answered
again, which is why the window matches the devices' spool age.
"""
from __future__ import annotations

import threading
from pathlib import Path

from fogsplit.core.results import Result
from fogsplit.core.statefile import open_state

_SCHEMA = """
CREATE TABLE IF NOT EXISTS answered (
    event INTEGER PRIMARY KEY,
    captured REAL NOT NULL,
    result BLOB NOT NULL,
    sent INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS answered_captured ON answered (captured);
"""


class Journal:
    def __init__(self, path: str | Path | None, *, window_s: float, max_rows: int) -> None:
        self.path = None if path is None else Path(path)
        self.window_s, self.max_rows = window_s, max_rows
        self._db = open_state(path, _SCHEMA)
        self._lock = threading.Lock()
        self.rows = self._db.execute("SELECT COUNT(*) FROM answered").fetchone()[0]
        self.resumed = self.rows
        self.pruned = 0

    def has(self, event: int) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM answered WHERE event = ?", (event,)).fetchone() is not None

    def record(self, result: Result, payload: bytes) -> bool:
        """Journal ``result`` (its JSON ``payload``); False if the event was answered already."""
        with self._lock:
            cur = self._db.execute("INSERT OR IGNORE INTO answered (event, captured, result) VALUES (?, ?, ?)",
                                   (result.event, result.captured, payload))
        self.rows += cur.rowcount
        return bool(cur.rowcount)

    def mark_sent(self, events: list[int]) -> None:
        """The broker acknowledged the results of ``events``."""
        if events:
            with self._lock:
                self._db.executemany("UPDATE answered SET sent = 1 WHERE event = ?", [(e,) for e in events])

    def unsent(self) -> list[bytes]:
        """Results journaled whose publication the broker never acknowledged, oldest first."""
        with self._lock:
            return [row[0] for row in self._db.execute("SELECT result FROM answered WHERE sent = 0 ORDER BY event")]

    def since(self, captured: float, limit: int) -> list[bytes]:
        """Results of the events captured at or after ``captured``, oldest first."""
        with self._lock:
            return [row[0] for row in self._db.execute(
                "SELECT result FROM answered WHERE captured >= ? ORDER BY captured, event LIMIT ?", (captured, limit))]

    def prune(self, now: float) -> int:
        with self._lock:
            removed = self._db.execute("DELETE FROM answered WHERE captured < ?", (now - self.window_s,)).rowcount
            excess = self.rows - removed - self.max_rows
            if excess > 0:
                removed += self._db.execute("DELETE FROM answered WHERE event IN (SELECT event FROM answered "
                                            "ORDER BY captured, event LIMIT ?)", (excess,)).rowcount
        self.rows -= removed
        self.pruned += removed
        return removed

    def close(self) -> None:
        with self._lock:
            self._db.close()
