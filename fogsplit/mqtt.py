"""The transport: publish, subscribe, close, over paho-mqtt. Nothing else in fogsplit touches paho.

Every PUBLISH is measured as it leaves (fixed header, topic and payload included) and the
bytes are charged to the events the caller names, so a report can say what each event cost
on the wire.
"""
from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Iterable, Protocol
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as paho

log = logging.getLogger("fogsplit.mqtt")


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


@dataclass(frozen=True)
class BrokerURL:
    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_broker_url(url: str) -> BrokerURL:
    """``mqtt://[user[:password]@]host[:port]`` or ``mqtts://...`` (TLS, default port 8883)."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ValueError(f"broker URL {url!r} must start with mqtt:// or mqtts://")
    if not parts.hostname:
        raise ValueError(f"broker URL {url!r} names no host")
    try:
        port = parts.port or (8883 if parts.scheme == "mqtts" else 1883)
    except ValueError as exc:
        raise ValueError(f"broker URL {url!r} has a bad port") from exc
    if parts.path not in ("", "/") or parts.query:
        raise ValueError(f"broker URL {url!r} must not have a path or query")
    return BrokerURL(parts.hostname, port, parts.scheme == "mqtts",
                     unquote(parts.username) if parts.username else None,
                     unquote(parts.password) if parts.password else None)


def publish_packet_size(topic: str, payload_len: int, qos: int) -> int:
    """Bytes of an MQTT 3.1.1 PUBLISH packet on the wire."""
    remaining = 2 + len(topic.encode()) + (2 if qos > 0 else 0) + payload_len
    length_bytes = 1
    while remaining >= 128 ** length_bytes:
        length_bytes += 1
    return 1 + length_bytes + remaining


class WireMeter:
    """Thread-safe tally of PUBLISH bytes, per event and per topic leaf."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.by_event: dict[int, float] = defaultdict(float)
        self.by_leaf: dict[str, int] = defaultdict(int)
        self.packets = 0

    def charge(self, topic: str, nbytes: int, events: Iterable[int]) -> None:
        events = list(events)
        with self._lock:
            self.packets += 1
            self.by_leaf[topic.rsplit("/", 1)[-1]] += nbytes
            for e in events:
                self.by_event[e] += nbytes / len(events)

    def snapshot(self) -> tuple[dict[int, float], dict[str, int]]:
        with self._lock:
            return dict(self.by_event), dict(self.by_leaf)


class MqttTransport:
    """A paho client with automatic reconnect, re-subscription and a last will.

    Handlers run on paho's network thread: they must only hand the message on (a queue).
    """

    def __init__(self, url: str | BrokerURL, client_id: str, *,
                 will: tuple[str, bytes] | None = None, meter: WireMeter | None = None,
                 keepalive: int = 15, ca_file: str | None = None) -> None:
        self.url = parse_broker_url(url) if isinstance(url, str) else url
        self.client_id = client_id
        self.meter = meter or WireMeter()
        self._routes: dict[str, Handler] = {}
        self._connected = threading.Event()
        self._lock = threading.Lock()
        self._client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id,
                                   protocol=paho.MQTTv311, clean_session=True)
        self._client.reconnect_delay_set(min_delay=1, max_delay=30)
        self._client.max_queued_messages_set(10000)
        if self.url.username:
            self._client.username_pw_set(self.url.username, self.url.password)
        if self.url.tls:
            self._client.tls_set(ca_certs=ca_file, cert_reqs=ssl.CERT_REQUIRED)
        if will:
            self._client.will_set(will[0], will[1], qos=1, retain=True)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._keepalive = keepalive
        self._closing = False
        self.on_connect: Callable[[], None] | None = None

    def connect(self, timeout: float = 10.0) -> "MqttTransport":
        """Connect and start the network loop; raises ConnectionError if the broker does not accept us."""
        try:
            self._client.connect(self.url.host, self.url.port, keepalive=self._keepalive)
        except OSError as exc:
            raise ConnectionError(f"{self.client_id}: cannot reach broker {self.url}: {exc}") from exc
        self._client.loop_start()
        if not self._connected.wait(timeout):
            self._client.loop_stop()
            raise ConnectionError(f"{self.client_id}: broker {self.url} did not accept the connection "
                                  f"within {timeout}s")
        return self

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                events: Iterable[int] = ()) -> int:
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            log.warning("%s: publish to %s failed: %s", self.client_id, topic, paho.error_string(info.rc))
        size = publish_packet_size(topic, len(payload), qos)
        self.meter.charge(topic, size, events)
        return size

    def subscribe(self, topic_filter: str, handler: Handler) -> None:
        with self._lock:
            self._routes[topic_filter] = handler
        if self._connected.is_set():
            self._client.subscribe(topic_filter, qos=1)

    def close(self) -> None:
        self._closing = True
        self._client.disconnect()
        self._client.loop_stop()
        self._connected.clear()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def _on_connect(self, client, userdata, flags, reason_code, properties=None) -> None:
        if reason_code.is_failure:
            log.error("%s: broker %s refused the connection: %s", self.client_id, self.url, reason_code)
            return
        sock = client.socket()
        if isinstance(sock, socket.socket):
            # Without this, Nagle's algorithm holds a small PUBLISH behind the PUBACKs we just
            # sent until the broker's delayed ACK comes back: tens of milliseconds per hop.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            filters = list(self._routes)
        for f in filters:
            client.subscribe(f, qos=1)
        log.info("%s: connected to %s", self.client_id, self.url)
        self._connected.set()
        if self.on_connect:
            self.on_connect()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties=None) -> None:
        if self._connected.is_set() and not self._closing:
            log.warning("%s: disconnected from %s (%s); reconnecting", self.client_id, self.url, reason_code)
        self._connected.clear()

    def _on_message(self, client, userdata, msg) -> None:
        message = Message(msg.topic, bytes(msg.payload), bool(msg.retain))
        with self._lock:
            routes = list(self._routes.items())
        for topic_filter, handler in routes:
            if paho.topic_matches_sub(_unshare(topic_filter), msg.topic):
                handler(message)
                return


def _unshare(topic_filter: str) -> str:
    if topic_filter.startswith("$share/"):
        return topic_filter.split("/", 2)[2]
    return topic_filter


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
