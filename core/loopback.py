"""An MQTT broker and transport in memory: devices, gateways and clouds wired together in one
process, with no network and no sleeping, for fast tests.

``LoopbackTransport`` keeps the promises of ``fogsplit.core.transport`` and the broker keeps the
parts of MQTT that fogsplit relies on: ``+`` and ``#`` (which never match a topic starting with
``$`` at their level), ``$share/group/filter`` spreading messages round-robin over the group's
members, retained messages (an empty retained payload clears one; none go to a shared
subscription), wills fired by :meth:`LoopbackTransport.drop` (an unclean disconnect) and
births on every connect.

Delivery is synchronous, on the publisher's thread, one copy per matching subscription; a
publish returns once every handler has been called. Packets are metered as MQTT 3.1.1
PUBLISH packets (full topic, no alias). QoS 1 packets published while offline are queued and
sent on reconnect; QoS 0 packets are dropped.
"""
from __future__ import annotations

import itertools
import logging
import threading
from typing import Callable, Iterable

from fogsplit.core.transport import STATS_KEYS, Handler, Message, split_filter
from fogsplit.core.wire import WireMeter, publish_packet_size

log = logging.getLogger(__name__)


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether ``topic`` matches ``topic_filter`` (no ``$share`` prefix) as an MQTT broker matches it."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    levels, topic_levels = topic_filter.split("/"), topic.split("/")
    for i, level in enumerate(levels):
        if level == "#":
            return True
        if i >= len(topic_levels) or level not in ("+", topic_levels[i]):
            return False
    return len(levels) == len(topic_levels)


class LoopbackBroker:
    """The broker the loopback transports of one test share."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._clients: dict[str, LoopbackTransport] = {}
        self._subscriptions: dict[str, dict[str, Handler]] = {}               # client id -> filter -> handler
        self._shares: dict[tuple[str, str], dict[str, Handler]] = {}          # (group, filter) -> client id -> handler
        self._turns: dict[tuple[str, str], itertools.count] = {}
        self._retained: dict[str, Message] = {}

    def retained(self, topic: str) -> bytes | None:
        """The payload retained on ``topic``, if any."""
        with self._lock:
            message = self._retained.get(topic)
        return message.payload if message else None

    def _attach(self, client: LoopbackTransport) -> LoopbackTransport | None:
        """Open ``client``'s session; return the client it took over, if one was connected."""
        with self._lock:
            previous = self._clients.get(client.client_id)
            self._clients[client.client_id] = client
            self._subscriptions[client.client_id] = {}
            for members in self._shares.values():
                members.pop(client.client_id, None)
        return previous if previous is not client else None

    def _detach(self, client: LoopbackTransport) -> bool:
        with self._lock:
            if self._clients.get(client.client_id) is not client:
                return False
            del self._clients[client.client_id]
            del self._subscriptions[client.client_id]
            for members in self._shares.values():
                members.pop(client.client_id, None)
        return True

    def _subscribe(self, client_id: str, topic_filter: str, handler: Handler) -> list[Message]:
        """Add a subscription; return the retained messages it must receive now."""
        group, plain = split_filter(topic_filter)
        with self._lock:
            if group is not None:
                self._shares.setdefault((group, plain), {})[client_id] = handler
                self._turns.setdefault((group, plain), itertools.count())
                return []
            self._subscriptions[client_id][plain] = handler
            return [m for t, m in self._retained.items() if topic_matches(plain, t)]

    def _publish(self, topic: str, payload: bytes, retain: bool) -> None:
        message = Message(topic, payload)
        with self._lock:
            if retain and payload:
                self._retained[topic] = Message(topic, payload, retain=True)
            elif retain:
                self._retained.pop(topic, None)
            targets = [handler for subscriptions in self._subscriptions.values()
                       for f, handler in subscriptions.items() if topic_matches(f, topic)]
            for (group, f), members in self._shares.items():
                if members and topic_matches(f, topic):
                    targets.append(list(members.values())[next(self._turns[group, f]) % len(members)])
        for handler in targets:
            _deliver(handler, message)


def _deliver(handler: Handler, message: Message) -> None:
    try:
        handler(message)
    except Exception:
        log.exception("the handler for a message on %s failed", message.topic)


class LoopbackTransport:
    """A client of a :class:`LoopbackBroker`, with the API of ``MqttTransport`` plus
    :meth:`drop` and :meth:`reconnect` to play a lost and recovered connection."""

    def __init__(self, broker: LoopbackBroker, client_id: str, *, meter: WireMeter | None = None) -> None:
        self.broker = broker
        self.client_id = client_id
        self.meter = meter or WireMeter()
        self._lock = threading.Lock()
        self._connected = False
        self._routes: dict[str, Handler] = {}
        self._queued: list[tuple[str, bytes, bool, tuple[int, ...], Callable[[], None] | None]] = []
        self._presence: tuple[str, Callable[[], bytes], bytes] | None = None
        self._listeners: list[Callable[[], None]] = []
        self._stats = dict.fromkeys(STATS_KEYS, 0)

    def set_presence(self, topic: str, online: Callable[[], bytes], offline: bytes) -> None:
        self._presence = (topic, online, offline)

    def add_connect_listener(self, fn: Callable[[], None]) -> None:
        self._listeners.append(fn)

    @property
    def connected(self) -> bool:
        return self._connected

    def stats(self) -> dict[str, int]:
        with self._lock:
            return dict(self._stats)

    def connect(self, timeout: float = 10.0) -> "LoopbackTransport":
        """Open a session: publish the birth message, subscribe every route, send what was queued."""
        taken_over = self.broker._attach(self)
        if taken_over is not None:
            taken_over._lost()
        with self._lock:
            self._connected = True
            self._stats["connects"] += 1
            routes, queued, self._queued = dict(self._routes), self._queued, []
        if self._presence is not None:
            self.publish(self._presence[0], self._presence[1](), qos=1, retain=True)
        for topic_filter, handler in routes.items():
            self._subscribe(topic_filter, handler)
        for listener in self._listeners:
            listener()
        for topic, payload, retain, events, on_sent in queued:
            self.publish(topic, payload, qos=1, retain=retain, events=events, on_sent=on_sent)
        return self

    reconnect = connect

    def drop(self) -> None:
        """Lose the connection uncleanly: the broker publishes the will."""
        if self.broker._detach(self):
            self._lost()

    def close(self) -> None:
        """Disconnect cleanly: no will."""
        with self._lock:
            self._connected = False
        self.broker._detach(self)

    def _lost(self) -> None:
        with self._lock:
            self._connected = False
            self._stats["disconnects"] += 1
        if self._presence is not None:
            self.broker._publish(self._presence[0], self._presence[2], retain=True)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                events: Iterable[int] = (), on_sent: Callable[[], None] | None = None) -> int:
        """Publish; return the size of the PUBLISH packet (0 if dropped while offline).
        ``on_sent`` is called once the packet is delivered to the broker."""
        if not topic or "+" in topic or "#" in topic:
            raise ValueError(f"cannot publish to {topic!r}")
        events = tuple(events)
        with self._lock:
            online = self._connected
            if not online:
                self._stats["queued_offline" if qos > 0 else "dropped_offline"] += 1
                if qos > 0:
                    self._queued.append((topic, bytes(payload), retain, events, on_sent))
            else:
                self._stats["sent"] += 1
        size = publish_packet_size(topic, len(payload), qos)
        if not online:
            return size if qos > 0 else 0
        self.meter.charge(topic, size, events)
        self.broker._publish(topic, bytes(payload), retain)
        if on_sent is not None:
            on_sent()
        return size

    def subscribe(self, topic_filter: str, handler: Handler) -> None:
        """Route ``topic_filter`` to ``handler``; retained messages arrive before this returns.
        Raises ValueError if the filter is malformed."""
        split_filter(topic_filter)
        with self._lock:
            self._routes[topic_filter] = handler
            online = self._connected
        if online:
            self._subscribe(topic_filter, handler)

    def _subscribe(self, topic_filter: str, handler: Handler) -> None:
        for message in self.broker._subscribe(self.client_id, topic_filter, handler):
            _deliver(handler, message)
