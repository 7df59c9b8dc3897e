"""What the tiers see of MQTT: a message, and a transport that publishes and subscribes.

The tiers depend on this protocol only; ``fogsplit.core.mqtt`` implements it over paho-mqtt
and ``fogsplit.core.loopback`` in memory, for fast tests of several tiers wired together.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Protocol


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    payload: bytes
    retain: bool = False


Handler = Callable[[Message], None]


class Transport(Protocol):
    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                events: Iterable[int] = ()) -> int: ...
    def subscribe(self, topic_filter: str, handler: Handler) -> None: ...
    def close(self) -> None: ...
