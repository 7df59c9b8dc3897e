"""The SQLite files where a tier keeps what must survive it: the device's spool, the gateway's
journal (docs/reliability.md).

SQLite from the standard library: nothing to install on a device, one file, transactions.
WAL with ``synchronous=NORMAL``: a commit is a write to the log, not an fsync, so a killed
process loses nothing and a power cut at most the last commits, and the file stays
consistent. Without a path the same schema lives in memory (tests, throwaway services).
"""
from __future__ import annotations

import sqlite3
from pathlib import Path


def open_state(path: str | Path | None, schema: str) -> sqlite3.Connection:
    """A connection in autocommit mode to the file at ``path`` (its folder made), with ``schema``
    applied; to a database in memory without a path. The caller serialises its use."""
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(":memory:" if path is None else str(path), isolation_level=None, check_same_thread=False)
    if path is not None:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
    db.executescript(schema)
    return db
