"""An application's side of the delivery contract: every result of a cell, once, through
broker restarts (docs/reliability.md).

A :class:`ResultFollower` subscribes to the cell's result topic with a persistent session, so
that results published while it is away wait for it at the broker. When a broker comes back
without its session (restarted without persistence, or a crash inside its autosave interval)
the follower asks the gateway to replay, from its journal, the results captured since the
last one it saw (minus ``margin_s``), and passes on only those it has not seen: results are
idempotent by event id. The ids it has seen are kept for ``remember_s`` of capture time.
"""
from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from typing import Callable

from fogsplit.core.mqtt import MqttTransport
from fogsplit.core.results import Result
from fogsplit.core.topics import Topics
from fogsplit.core.transport import Message

log = logging.getLogger(__name__)

MAX_REMEMBERED = 1_000_000


class ResultFollower:
    def __init__(self, url: str, topics: Topics, cell: str, on_result: Callable[[Result], None], *,
                 client_id: str = "app", session_expiry_s: int = 3600, margin_s: float = 5.0,
                 remember_s: float = 3600.0, username: str | None = None, password: str | None = None) -> None:
        self.topics, self.cell, self.client_id = topics, cell, client_id
        self.on_result, self.margin_s, self.remember_s = on_result, margin_s, remember_s
        self._lock = threading.Lock()
        self._seen: OrderedDict[int, float] = OrderedDict()   # event -> capture time, oldest first
        self._last_captured: float | None = None
        self.duplicates = 0       # live results of events already passed on (dropped here)
        self.overlap = 0          # replayed results of events already passed on (the margin; dropped)
        self.replayed = 0         # results that came by a replay and were new
        self.replays_asked = 0
        self.transport = MqttTransport(url, client_id, session_expiry_s=session_expiry_s, username=username,
                                       password=password)
        self.transport.subscribe(topics.result(cell), self._on_live)
        self.transport.subscribe(topics.replay_reply(cell, client_id), self._on_replayed)
        self.transport.add_connect_listener(self._on_connect)
        self._connected_once = False

    def connect(self, timeout: float = 10.0) -> "ResultFollower":
        self.transport.connect(timeout)
        return self

    def close(self) -> None:
        self.transport.close()

    def _on_connect(self) -> None:
        first, self._connected_once = not self._connected_once, True
        if first or self.transport.session_present:
            return
        with self._lock:
            since = None if self._last_captured is None else self._last_captured - self.margin_s
        if since is None:
            return
        self.replays_asked += 1
        log.info("%s: the broker lost this session; asking the gateway of %s for the results since %.3f",
                 self.client_id, self.cell, since)
        self.transport.publish(self.topics.replay(self.cell),
                               json.dumps({"client": self.client_id, "since": since}).encode(), qos=1)

    def _on_live(self, msg: Message) -> None:
        self._take(msg.payload, replayed=False)

    def _on_replayed(self, msg: Message) -> None:
        if b'"done"' in msg.payload[:16]:
            return
        self._take(msg.payload, replayed=True)

    def _take(self, payload: bytes, *, replayed: bool) -> None:
        try:
            result = Result.from_json(payload)
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("%s: not a result on %s: %s", self.client_id, self.cell, exc)
            return
        with self._lock:
            if result.event in self._seen:
                if replayed:
                    self.overlap += 1
                else:
                    self.duplicates += 1
                return
            self._seen[result.event] = result.captured
            self._last_captured = max(self._last_captured or result.captured, result.captured)
            while self._seen and (len(self._seen) > MAX_REMEMBERED or
                                  next(iter(self._seen.values())) < self._last_captured - self.remember_s):
                self._seen.popitem(last=False)
            self.replayed += replayed
        self.on_result(result)


