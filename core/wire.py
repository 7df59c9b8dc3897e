"""What MQTT packets cost on the wire: packet sizes, and a tally of the bytes each event cost.

Plain arithmetic with no MQTT client, so that export/ can plan a bundle's bytes on the wire
and the transports can charge what they send."""
from __future__ import annotations

import threading
from collections import defaultdict
from typing import Iterable

ALIAS_PROPERTY_BYTES = 3   # identifier 0x23 and a two-byte alias


def _varint_len(value: int) -> int:
    n = 1
    while value >= 128 ** n:
        n += 1
    return n


def publish_packet_size(topic: str, payload_len: int, qos: int, *, mqtt5: bool = False,
                        properties_len: int = 0) -> int:
    """Bytes of a PUBLISH packet on the wire; ``topic`` is what is sent ("" under an alias)."""
    remaining = 2 + len(topic.encode()) + (2 if qos > 0 else 0) + payload_len
    if mqtt5:
        remaining += _varint_len(properties_len) + properties_len
    return 1 + _varint_len(remaining) + remaining


class WireMeter:
    """Thread-safe tally of PUBLISH bytes per topic leaf and, for the newest ``max_events``
    events, per event (a benchmark asks for it; a serving tier keeps none, so nothing grows
    with the events it serves)."""

    def __init__(self, max_events: int = 0) -> None:
        self._lock = threading.Lock()
        self.max_events = max_events
        self.by_event: dict[int, float] = {}
        self.by_leaf: dict[str, int] = defaultdict(int)
        self.packets = 0

    def charge(self, topic: str, nbytes: int, events: Iterable[int]) -> None:
        events = list(events) if self.max_events else ()
        with self._lock:
            self.packets += 1
            self.by_leaf[topic.rsplit("/", 1)[-1]] += nbytes
            for e in events:
                self.by_event[e] = self.by_event.get(e, 0.0) + nbytes / len(events)
            while len(self.by_event) > self.max_events:
                del self.by_event[next(iter(self.by_event))]

    def total(self) -> int:
        """Every byte charged so far, without copying the per-event tally (stats read this)."""
        with self._lock:
            return sum(self.by_leaf.values())

    def snapshot(self) -> tuple[dict[int, float], dict[str, int]]:
        with self._lock:
            return dict(self.by_event), dict(self.by_leaf)
