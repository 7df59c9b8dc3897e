"""What the tiers see of MQTT: a message, and a transport that publishes and subscribes.

The tiers depend on this protocol only; ``fogsplit.core.mqtt`` implements it over paho-mqtt
and ``fogsplit.core.loopback`` in memory, for fast tests of several tiers wired together.

Both keep the same promises:

- ``subscribe`` returns once the broker has acknowledged the filter (or, before ``connect``,
  records it, and ``connect`` returns only once every recorded filter is acknowledged), so a
  message published by anyone after ``subscribe`` returns is delivered;
- after ``set_presence``, every connect and reconnect publishes the birth message (retained)
  before subscribing again, and an unclean disconnect makes the broker publish the offline one;
- handlers run on the transport's thread (paho's network thread; the publisher's, in memory)
  and must only hand the message on (a queue);
- ``publish`` returns the packet's size on the wire (0 for a QoS 0 packet dropped while
  offline; QoS 1 packets are queued and sent on reconnect), and ``meter`` is charged only for
  packets that were really sent; ``on_sent`` is called (on the transport's thread) once the
  broker has the packet: acknowledged for QoS 1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Protocol

from fogsplit.core.wire import WireMeter


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    payload: bytes
    retain: bool = False
    ack: Callable[[], None] | None = None   # a transport with manual acks: call once the message is handled


Handler = Callable[[Message], None]


class SubscribeError(ConnectionError):
    """The broker refused a subscription (a SUBACK reason code of 0x80 or above)."""

    def __init__(self, topic_filter: str, reason: str) -> None:
        super().__init__(f"the broker refused the subscription to {topic_filter!r}: {reason}")
        self.topic_filter = topic_filter
        self.reason = reason


def split_filter(topic_filter: str) -> tuple[str | None, str]:
    """``(group, filter)`` of a subscription: the group is None unless the filter is
    ``$share/group/filter``. Raises ValueError if the filter is malformed."""
    group, plain = None, topic_filter
    if topic_filter.startswith("$share/"):
        _, group, plain = (topic_filter.split("/", 2) + [""])[:3]
        if not group or "+" in group or "#" in group:
            raise ValueError(f"topic filter {topic_filter!r} has no valid share name")
    levels = plain.split("/")
    if (not plain or "#" in levels[:-1]
            or any(("+" in level or "#" in level) and level not in ("+", "#") for level in levels)):
        raise ValueError(f"topic filter {topic_filter!r} is malformed: '+' and '#' stand alone in a "
                         f"level, '#' only last")
    return group, plain


STATS_KEYS = ("connects", "disconnects", "sent", "dropped_offline", "queued_offline", "refused_publishes",
              "withheld_refused", "failed_publishes")
"""The counters ``Transport.stats()`` returns: successful connects (the first one included),
connections lost other than by ``close()``, PUBLISH packets sent, QoS 0 packets dropped
because the transport was offline, QoS 1 packets queued while offline (sent on reconnect),
QoS 1 packets the broker refused (MQTT 5 PUBACK 0x80 or above, e.g. 0x87 not authorized), and
packets not sent because the broker refuses this client's status (docs/access.md), and
packets the client library refused (its queue of unsent packets full).
``fogsplit.core.mqtt`` adds ``refused_by_kind``: the refused packets by topic kind."""


class Transport(Protocol):
    meter: WireMeter

    def connect(self, timeout: float = 10.0) -> "Transport": ...

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                events: Iterable[int] = (), on_sent: Callable[[], None] | None = None) -> int: ...

    def subscribe(self, topic_filter: str, handler: Handler) -> None: ...

    def set_presence(self, topic: str, online: Callable[[], bytes], offline: bytes) -> None: ...

    def add_connect_listener(self, fn: Callable[[], None]) -> None: ...

    @property
    def connected(self) -> bool: ...

    def stats(self) -> dict[str, int]: ...

    def close(self) -> None: ...
