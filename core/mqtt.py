"""The transport: publish, subscribe, close, over paho-mqtt. Nothing else in fogsplit touches paho.

It speaks MQTT 5 when the broker does, and then gives each topic it publishes at QoS 0 a topic
alias, so that after the first packet a data packet carries no topic string at all (a scores
packet is about 20 bytes, of which the topic would otherwise be 40). With a broker that only
speaks MQTT 3.1.1 it falls back and sends topics in full.

Every PUBLISH is measured as it leaves (fixed header, topic or alias, properties and payload)
and the bytes are charged to the events the caller names, so a report can say what each event
cost on the wire.
"""
from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fogsplit.core.transport import Handler, Message
from fogsplit.core.wire import ALIAS_PROPERTY_BYTES, WireMeter, publish_packet_size

log = logging.getLogger(__name__)


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


PROTOCOLS = ("auto", "5", "3.1.1")
class MqttTransport:
    """A paho client with automatic reconnect, re-subscription and a last will.

    Handlers run on paho's network thread: they must only hand the message on (a queue).
    """

    def __init__(self, url: str | BrokerURL, client_id: str, *,
                 will: tuple[str, bytes] | None = None, meter: WireMeter | None = None,
                 keepalive: int = 15, ca_file: str | None = None, protocol: str = "auto") -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"MQTT protocol {protocol!r} is not one of {PROTOCOLS}")
        self.url = parse_broker_url(url) if isinstance(url, str) else url
        self.client_id = client_id
        self.meter = meter or WireMeter()
        self.protocol = protocol
        self._routes: dict[str, Handler] = {}
        self._connected = threading.Event()
        self._refused = threading.Event()
        self._lock = threading.Lock()
        self._publish_lock = threading.Lock()
        self._aliases: dict[str, int] = {}
        self._alias_max = 0
        self._will, self._ca_file, self._keepalive = will, ca_file, keepalive
        self._closing = False
        self.on_connect: Callable[[], None] | None = None
        self._client = self._make_client(mqtt5=protocol != "3.1.1")

    @property
    def mqtt5(self) -> bool:
        return self._client.protocol == paho.MQTTv5

    def _make_client(self, *, mqtt5: bool) -> paho.Client:
        client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             protocol=paho.MQTTv5 if mqtt5 else paho.MQTTv311,
                             clean_session=None if mqtt5 else True)
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.max_queued_messages_set(10000)
        if self.url.username:
            client.username_pw_set(self.url.username, self.url.password)
        if self.url.tls:
            client.tls_set(ca_certs=self._ca_file, cert_reqs=ssl.CERT_REQUIRED)
        if self._will:
            client.will_set(self._will[0], self._will[1], qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        return client

    def connect(self, timeout: float = 10.0) -> "MqttTransport":
        """Connect and start the network loop; raises ConnectionError if the broker does not accept us.

        With protocol ``auto`` a broker that drops an MQTT 5 CONNECT is tried again with 3.1.1."""
        self._start(timeout)
        if not self._connected.is_set() and self._refused.is_set() and self.protocol == "auto":
            log.info("%s: %s does not speak MQTT 5; using 3.1.1", self.client_id, self.url)
            self._client.loop_stop()
            self._client = self._make_client(mqtt5=False)
            self._start(timeout)
        if not self._connected.is_set():
            self._client.loop_stop()
            raise ConnectionError(f"{self.client_id}: broker {self.url} did not accept the connection "
                                  f"within {timeout}s")
        return self

    def _start(self, timeout: float) -> None:
        self._refused.clear()
        try:
            if self.mqtt5:
                self._client.connect(self.url.host, self.url.port, keepalive=self._keepalive, clean_start=True)
            else:
                self._client.connect(self.url.host, self.url.port, keepalive=self._keepalive)
        except OSError as exc:
            raise ConnectionError(f"{self.client_id}: cannot reach broker {self.url}: {exc}") from exc
        self._client.loop_start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self._connected.is_set() and not self._refused.is_set():
            self._connected.wait(0.01)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                events: Iterable[int] = ()) -> int:
        """Publish and return the packet's size on the wire. QoS 0 packets travel under a topic
        alias when the broker grants aliases (never QoS 1: a resent packet would outlive the
        connection its alias belongs to)."""
        with self._publish_lock:
            sent_topic, properties = topic, None
            alias = self._aliases.get(topic) if qos == 0 else None
            new_alias = qos == 0 and alias is None and len(self._aliases) < self._alias_max and self.connected
            if alias is not None or new_alias:
                properties = Properties(PacketTypes.PUBLISH)
                properties.TopicAlias = alias if alias is not None else len(self._aliases) + 1
                sent_topic = "" if alias is not None else topic
            info = self._client.publish(sent_topic, payload, qos=qos, retain=retain, properties=properties)
            if info.rc == paho.MQTT_ERR_SUCCESS and new_alias:
                self._aliases[topic] = properties.TopicAlias
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            log.warning("%s: publish to %s failed: %s", self.client_id, topic, paho.error_string(info.rc))
        size = publish_packet_size(sent_topic, len(payload), qos, mqtt5=self.mqtt5,
                                   properties_len=ALIAS_PROPERTY_BYTES if properties is not None else 0)
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
        with self._publish_lock:
            self._aliases.clear()
            self._alias_max = int(getattr(properties, "TopicAliasMaximum", 0) or 0) if self.mqtt5 else 0
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
        if not self._connected.is_set():
            self._refused.set()
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
