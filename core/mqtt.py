"""The transport over paho-mqtt. Nothing else in fogsplit touches paho.

It speaks MQTT 5 when the broker does, and then gives each topic it publishes at QoS 0 a topic
alias, so that after the first packet a data packet carries no topic string at all (a scores
packet is about 20 bytes, of which the topic would otherwise be 40). With a broker that only
speaks MQTT 3.1.1 it falls back and sends topics in full.

Every PUBLISH is measured (fixed header, topic or alias, properties and payload) and the bytes
are charged to the events the caller names once paho reports the packet sent: written to the
socket for QoS 0, acknowledged for QoS 1. A QoS 0 packet published while offline is dropped,
counted and not charged; a QoS 1 packet is queued and sent on reconnect.

With ``manual_ack`` (the cloud workers) a QoS 1 message is acknowledged only when the service
has handled it (``Message.ack``): after the answer is handed to the client, so a worker that
dies mid-event leaves the forward unacknowledged and the broker delivers it again.

Reconnecting: paho reconnects by itself; before each attempt this module sets the delay with
:class:`Backoff`: 0.1 s doubling to a cap of 1 s, each delay drawn from its upper half
(0.05-0.1 s, 0.1-0.2 s, ... then 0.5-1 s). A cut link is back in a tenth of a second, a client
is back within a second of its broker being back, and the jitter keeps a fleet that lost the
broker together from reconnecting in lockstep. A broker that refuses the connection (bad
password, not authorised) is asked again only every ``REFUSED_DELAY_S``: retrying sooner
cannot help and would flood its log.

Refused publishes (docs/access.md): over MQTT 5 a broker answers a QoS 1 PUBLISH its ACL denies
with a PUBACK reason code of 0x80 or above (Mosquitto: 0x87, not authorized); a refused QoS 0
publish gets no answer, and over MQTT 3.1.1 nothing is ever answered. Each refusal is counted by
topic kind (``stats()["refused_by_kind"]``) and logged as one WARNING per topic. When the refused
topic is this client's own retained status (the birth message), the account does not belong
where the client was started (another fleet or cell): everything else it would publish is
refused too, silently for QoS 0. The transport then logs one ERROR naming the account and the
topic, is ``muted``: it withholds every other publish (counted as ``withheld_refused``) and asks
again with the status every ``REFUSED_DELAY_S``, on the next publish after that; an accepted
status (an ACL fixed and reloaded, or a reconnect) unmutes it.
"""
from __future__ import annotations

import logging
import random
import re
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

from fogsplit.core.topics import PREFIX, TOPICS
from fogsplit.core.transport import STATS_KEYS, Handler, Message, SubscribeError, split_filter
from fogsplit.core.wire import ALIAS_PROPERTY_BYTES, WireMeter, publish_packet_size

log = logging.getLogger(__name__)

MAX_INFLIGHT = 1000     # QoS 1 packets sent and not yet acknowledged, per client
PROTOCOLS = ("auto", "5", "3.1.1")
REFUSED_DELAY_S = 30.0
SUBACK_TIMEOUT_S = 10.0
MAX_LOGGED_TOPICS = 1024

_KINDS = [(kind, re.compile(re.escape(f"{PREFIX}/") + r"[^/]+/"
                            + re.sub(r"\\\{\w+\\\}", "[^/]+", re.escape(spec.pattern)) + "$"))
          for kind, spec in TOPICS.items() if not spec.pattern.startswith("{")]


def topic_kind(topic: str) -> str:
    """The kind of ``topic`` in the topic table, or ``other`` (e.g. a discovery config)."""
    return next((kind for kind, pattern in _KINDS if pattern.match(topic)), "other")


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


class Backoff:
    """Delays between reconnect attempts: ``first`` doubling up to ``cap``, each drawn at random
    from the upper half of its step."""

    def __init__(self, first: float = 0.1, cap: float = 1.0, rand: Callable[[], float] = random.random) -> None:
        self.first, self.cap, self._rand = first, cap, rand
        self._step = first

    def next(self) -> float:
        delay = self._step * (0.5 + 0.5 * self._rand())
        self._step = min(self._step * 2, self.cap)
        return delay

    def reset(self) -> None:
        self._step = self.first


@dataclass(frozen=True, slots=True)
class _Sent:
    topic: str
    size: int
    qos: int
    events: tuple[int, ...]
    on_sent: Callable[[], None] | None = None


class _SubAcks:
    """SUBACK reason codes by packet id, for the threads that wait for them.

    A SUBACK can arrive before the subscribing thread has its packet id back from paho, so
    arrivals are kept until taken; a new connection forgets them all."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._codes: dict[int, list] = {}

    def arrive(self, mid: int, codes: list) -> None:
        with self._cond:
            self._codes[mid] = codes
            self._cond.notify_all()

    def take(self, mid: int, timeout: float, alive: Callable[[], bool]) -> list | None:
        """The codes for ``mid``; None if ``alive()`` turned false or the time ran out."""
        with self._cond:
            self._cond.wait_for(lambda: mid in self._codes or not alive(), timeout)
            return self._codes.pop(mid, None)

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def clear(self) -> None:
        with self._cond:
            self._codes.clear()


class MqttTransport:
    """A paho client with reconnect, re-subscription, birth and last will, and a wire meter.

    Handlers and connect listeners run on paho's network thread: they must only hand work on.
    ``username`` and ``password`` override any in the URL.
    """

    def __init__(self, url: str | BrokerURL, client_id: str, *, username: str | None = None,
                 password: str | None = None, will: tuple[str, bytes] | None = None,
                 meter: WireMeter | None = None, keepalive: int = 15, ca_file: str | None = None,
                 protocol: str = "auto", session_expiry_s: int = 0, manual_ack: bool = False) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"MQTT protocol {protocol!r} is not one of {PROTOCOLS}")
        self.url = parse_broker_url(url) if isinstance(url, str) else url
        self.client_id = client_id
        self.meter = meter or WireMeter()
        self.protocol = protocol
        self._username = username if username is not None else self.url.username
        self._password = password if username is not None or password is not None else self.url.password
        self._will, self._ca_file, self._keepalive = will, ca_file, keepalive
        self.session_expiry_s = session_expiry_s
        self.manual_ack = manual_ack
        self.session_present = False      # the broker resumed this client's session on the last connect
        self._failed_publishes: dict[str, int] = {}
        self._failure_logged_at = -REFUSED_DELAY_S
        self._birth: tuple[str, Callable[[], bytes]] | None = None
        self._listeners: list[Callable[[], None]] = []
        self._routes: dict[str, Handler] = {}
        self._lock = threading.Lock()             # routes, connection state, counters
        self._publish_lock = threading.Lock()     # topic aliases
        self._pending_lock = threading.Lock()     # packets paho has not yet reported sent
        self._pending: dict[int, _Sent] = {}
        self._sent_early: set[int] = set()
        self._aliases: dict[str, int] = {}
        self._alias_max = 0
        self._acks = _SubAcks()
        self._connected = threading.Event()
        self._ready = threading.Event()           # set once on_connect has sent birth and subscriptions
        self._generation = 0
        self._started = False
        self._network_thread: int | None = None
        self._background_subs: dict[int, str] = {}   # SUBACKs no caller waits for: refusals are logged
        self._dropped_before_connack = threading.Event()
        self._refusal: paho.ReasonCode | None = None
        self._down_since: float | None = None
        self._closing = False
        self._backoff = Backoff()
        self._stats = dict.fromkeys(STATS_KEYS, 0)
        self._refused_kinds: dict[str, int] = {}
        self._refused_topics: set[str] = set()
        self._muted = False
        self._probe_at = 0.0
        self._client = self._make_client(mqtt5=protocol != "3.1.1")

    # -- configuration, before connect ----------------------------------------------------
    def set_presence(self, topic: str, online: Callable[[], bytes], offline: bytes) -> None:
        """Last will ``offline`` (QoS 1, retained); ``online()`` published on every connect."""
        self._will = (topic, offline)
        self._birth = (topic, online)
        self._client.will_set(topic, offline, qos=1, retain=True)

    def add_connect_listener(self, fn: Callable[[], None]) -> None:
        """Call ``fn()`` after every connect and reconnect, on the network thread."""
        self._listeners.append(fn)

    @property
    def mqtt5(self) -> bool:
        return self._client.protocol == paho.MQTTv5

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def muted(self) -> bool:
        """The broker refuses this client's status: its other publishes are withheld."""
        return self._muted

    def stats(self) -> dict[str, int | dict[str, int]]:
        with self._lock:
            return {**self._stats, "refused_by_kind": dict(self._refused_kinds)}

    def _make_client(self, *, mqtt5: bool) -> paho.Client:
        client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             protocol=paho.MQTTv5 if mqtt5 else paho.MQTTv311,
                             clean_session=None if mqtt5 else self.session_expiry_s == 0,
                             manual_ack=self.manual_ack)
        client.max_queued_messages_set(10000)
        # paho's default of 20 unacknowledged QoS 1 packets caps results at 20 per round trip, and
        # a round trip is stretched by what waits in the socket before the PUBACK: behind a
        # second of inbound backlog, 100 in flight allowed 100 results/s. compose's Mosquitto
        # allows MAX_INFLIGHT too (max_inflight_messages).
        client.max_inflight_messages_set(MAX_INFLIGHT)
        if self._username:
            client.username_pw_set(self._username, self._password)
        if self.url.tls:
            client.tls_set(ca_certs=self._ca_file, cert_reqs=ssl.CERT_REQUIRED)
        if self._will:
            client.will_set(self._will[0], self._will[1], qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_unrouted
        with self._lock:
            for topic_filter, handler in self._routes.items():
                client.message_callback_add(split_filter(topic_filter)[1], self._deliver_to(handler))
        return client

    # -- connecting -----------------------------------------------------------------------
    def connect(self, timeout: float = 10.0) -> "MqttTransport":
        """Connect, start the network loop, and return once every subscription is acknowledged.

        Raises ConnectionError if the broker cannot be reached or does not accept us, and
        SubscribeError if it refuses a subscription. With protocol ``auto`` a broker that drops
        an MQTT 5 CONNECT is tried again with 3.1.1."""
        deadline = time.monotonic() + timeout
        self._start(deadline)
        if not self._ready.is_set() and self.protocol == "auto" and self._speaks_311_only():
            log.info("%s: %s does not speak MQTT 5; using 3.1.1", self.client_id, self.url)
            self._client.loop_stop()
            self._client = self._make_client(mqtt5=False)
            self._start(deadline)
        if not self._ready.is_set():
            self._client.loop_stop()
            why = f"refused it: {self._refusal}" if self._refusal else f"did not accept it within {timeout}s"
            raise ConnectionError(f"{self.client_id}: broker {self.url} {why}")
        with self._lock:
            generation, pending = self._generation, dict(self._background_subs)
        try:
            for mid, topic_filter in pending.items():
                self._await_suback(topic_filter, mid, generation, timeout)
        except ConnectionError:
            self.close()
            raise
        self._started = True
        return self

    def _speaks_311_only(self) -> bool:
        """The broker closed the connection on our MQTT 5 CONNECT, or refused its version."""
        refusal = self._refusal
        return self.mqtt5 and (self._dropped_before_connack.is_set()
                               or (refusal is not None and refusal.value == 0x84))

    def _start(self, deadline: float) -> None:
        self._dropped_before_connack.clear()
        self._refusal = None
        try:
            if self.mqtt5:
                properties = None
                if self.session_expiry_s:
                    properties = Properties(PacketTypes.CONNECT)
                    properties.SessionExpiryInterval = self.session_expiry_s
                self._client.connect(self.url.host, self.url.port, keepalive=self._keepalive,
                                     clean_start=self.session_expiry_s == 0, properties=properties)
            else:
                self._client.connect(self.url.host, self.url.port, keepalive=self._keepalive)
        except OSError as exc:
            raise ConnectionError(f"{self.client_id}: cannot reach broker {self.url}: {exc}") from exc
        self._client.loop_start()
        while (time.monotonic() < deadline and not self._ready.is_set() and self._refusal is None
               and not self._dropped_before_connack.is_set()):
            self._ready.wait(0.01)

    def close(self) -> None:
        """Disconnect cleanly (the broker discards the will) and stop the network loop."""
        self._closing = True
        self._client.disconnect()
        self._client.loop_stop()
        self._connected.clear()
        self._ready.clear()
        self._acks.wake()

    # -- publishing -----------------------------------------------------------------------
    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                events: Iterable[int] = (), on_sent: Callable[[], None] | None = None) -> int:
        """Publish and return the packet's size on the wire (0 for a QoS 0 packet dropped
        because the transport is offline). QoS 0 packets travel under a topic alias when the
        broker grants aliases; QoS 1 never does: a resent packet would outlive the connection
        its alias belongs to."""
        events = tuple(events)
        if self._muted and self._birth is not None and topic != self._birth[0]:
            self._count("withheld_refused")
            if time.monotonic() >= self._probe_at:
                self._probe_at = time.monotonic() + REFUSED_DELAY_S
                self._guard("status probe", lambda: self.publish(self._birth[0], self._birth[1](), qos=1,
                                                                   retain=True))
            return 0
        with self._publish_lock:
            online = self.connected
            if qos == 0 and not online:
                self._count("dropped_offline")
                return 0
            sent_topic, properties = topic, None
            alias = self._aliases.get(topic) if qos == 0 else None
            new_alias = qos == 0 and alias is None and len(self._aliases) < self._alias_max
            if alias is not None or new_alias:
                properties = Properties(PacketTypes.PUBLISH)
                properties.TopicAlias = alias if alias is not None else len(self._aliases) + 1
                sent_topic = "" if alias is not None else topic
            info = self._client.publish(sent_topic, payload, qos=qos, retain=retain, properties=properties)
            if info.rc == paho.MQTT_ERR_SUCCESS and new_alias:
                self._aliases[topic] = properties.TopicAlias
        if info.rc == paho.MQTT_ERR_NO_CONN and qos == 0:
            self._count("dropped_offline")
            return 0
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            self._publish_failed(topic, paho.error_string(info.rc))
            return 0
        if qos > 0 and (info.rc == paho.MQTT_ERR_NO_CONN or not online):
            self._count("queued_offline")
        size = publish_packet_size(sent_topic, len(payload), qos, mqtt5=self.mqtt5,
                                   properties_len=ALIAS_PROPERTY_BYTES if properties is not None else 0)
        self._expect_sent(info.mid, _Sent(topic, size, qos, events, on_sent))
        return size

    def _publish_failed(self, topic: str, why: str) -> None:
        """Count a publish paho refused (its queue full); log the counts at most every
        ``REFUSED_DELAY_S``, not one line per packet."""
        now = time.monotonic()
        with self._lock:
            self._stats["failed_publishes"] += 1
            key = f"{topic_kind(topic)}: {why}"
            self._failed_publishes[key] = self._failed_publishes.get(key, 0) + 1
            if now - self._failure_logged_at < REFUSED_DELAY_S:
                return
            self._failure_logged_at, counts, self._failed_publishes = now, self._failed_publishes, {}
        log.warning("%s: publishes failed since the last report: %s", self.client_id,
                    ", ".join(f"{n} on {key}" for key, n in counts.items()))

    def _expect_sent(self, mid: int, sent: _Sent) -> None:
        with self._pending_lock:
            if mid not in self._sent_early:
                self._pending[mid] = sent
                return
            self._sent_early.discard(mid)
        self._charge(sent)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._pending_lock:
            sent = self._pending.pop(mid, None)
            if sent is None:
                self._sent_early.add(mid)
                return
        if reason_code.is_failure:
            self._refused(sent.topic, reason_code)
        elif self._muted and self._birth is not None and sent.topic == self._birth[0]:
            self._muted = False
            log.info("%s: broker %s accepts the status of user %r on %s again; publishing", self.client_id,
                     self.url, self._username, sent.topic)
        self._charge(sent)

    def _refused(self, topic: str, reason: paho.ReasonCode) -> None:
        """Count a refused publish; log the first refusal of each topic; mute on a refused status."""
        kind = topic_kind(topic)
        with self._lock:
            self._stats["refused_publishes"] += 1
            self._refused_kinds[kind] = self._refused_kinds.get(kind, 0) + 1
            first = topic not in self._refused_topics and len(self._refused_topics) < MAX_LOGGED_TOPICS
            if first:
                self._refused_topics.add(topic)
        if self._birth is not None and topic == self._birth[0]:
            if not self._muted:
                self._muted = True
                self._probe_at = time.monotonic() + REFUSED_DELAY_S
                log.error("%s: broker %s refuses the status of user %r on %s (%s): that account may not "
                          "publish where this client runs, so nothing it publishes would arrive. Check "
                          "broker.username against its fleet, cell and name (docs/access.md). Withholding "
                          "every other publish; asking again every %.0fs", self.client_id, self.url,
                          self._username, topic, reason, REFUSED_DELAY_S)
        elif first:
            log.warning("%s: broker %s refused a publish of user %r to %s (%s, kind %s); further refusals "
                        "on this topic are only counted (stats refused_publishes)", self.client_id, self.url,
                        self._username, topic, reason, kind)

    def _charge(self, sent: _Sent) -> None:
        self.meter.charge(sent.topic, sent.size, sent.events)
        self._count("sent")
        if sent.on_sent is not None:
            self._guard("sent callback", sent.on_sent)

    def _count(self, key: str) -> None:
        with self._lock:
            self._stats[key] += 1

    # -- subscribing ----------------------------------------------------------------------
    def subscribe(self, topic_filter: str, handler: Handler) -> None:
        """Route ``topic_filter`` to ``handler``; once connected, return only when the broker has
        acknowledged it. Raises ValueError if the filter is malformed, SubscribeError if the
        broker refuses it. Called on the network thread (from a handler or a connect listener)
        it cannot wait for the SUBACK: a refusal is then only logged."""
        plain = split_filter(topic_filter)[1]
        with self._lock:
            self._routes[topic_filter] = handler
            self._client.message_callback_add(plain, self._deliver_to(handler))
            online, generation = self.connected, self._generation
        if not online:
            return      # connect() subscribes it
        rc, mid = self._client.subscribe(topic_filter, qos=1)
        if rc != paho.MQTT_ERR_SUCCESS:
            return      # the connection dropped; the reconnect subscribes it
        if threading.get_ident() == self._network_thread:
            with self._lock:
                self._background_subs[mid] = topic_filter
            return
        try:
            self._await_suback(topic_filter, mid, generation, SUBACK_TIMEOUT_S)
        except SubscribeError:
            with self._lock:
                self._routes.pop(topic_filter, None)
                self._client.message_callback_remove(plain)
            raise

    def _await_suback(self, topic_filter: str, mid: int, generation: int, timeout: float) -> None:
        codes = self._acks.take(mid, timeout, lambda: self.connected and self._generation == generation)
        if codes is None:
            if self.connected and self._generation == generation:
                raise ConnectionError(f"{self.client_id}: broker {self.url} did not acknowledge the "
                                      f"subscription to {topic_filter!r} within {timeout:.1f}s")
            return      # the connection dropped; the reconnect subscribes it again
        refused = [code for code in codes if code.is_failure]
        if refused:
            raise SubscribeError(topic_filter, str(refused[0]))

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        with self._lock:
            topic_filter = self._background_subs.get(mid) if self._started else None
        if topic_filter is not None and any(code.is_failure for code in reason_codes):
            log.error("%s: broker %s refused the subscription to %s: %s", self.client_id, self.url,
                      topic_filter, reason_codes[0])
        self._acks.arrive(mid, list(reason_codes))

    def _deliver_to(self, handler: Handler) -> Callable[[paho.Client, object, paho.MQTTMessage], None]:
        def deliver(client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
            ack = None
            if self.manual_ack and msg.qos > 0:
                ack = lambda mid=msg.mid, qos=msg.qos: client.ack(mid, qos)  # noqa: E731
            try:
                handler(Message(msg.topic, bytes(msg.payload), bool(msg.retain), ack))
            except Exception:
                log.exception("%s: the handler for a message on %s failed", self.client_id, msg.topic)
                if ack is not None:
                    ack()
        return deliver

    def _on_unrouted(self, client, userdata, msg) -> None:
        log.debug("%s: no route for a message on %s", self.client_id, msg.topic)

    # -- connection events (network thread) -----------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties=None) -> None:
        if reason_code.is_failure:
            self._refusal = reason_code
            log.error("%s: broker %s refused the connection: %s", self.client_id, self.url, reason_code)
            return
        self._refusal = None
        self.session_present = bool(getattr(flags, "session_present", False))
        self._network_thread = threading.get_ident()
        self._backoff.reset()
        with self._publish_lock:
            self._aliases.clear()
            self._alias_max = int(getattr(properties, "TopicAliasMaximum", 0) or 0) if self.mqtt5 else 0
        with self._pending_lock:   # QoS 0 packets paho had queued on the lost socket are gone
            self._pending = {mid: sent for mid, sent in self._pending.items() if sent.qos > 0}
            self._sent_early.clear()
        sock = client.socket()
        if isinstance(sock, socket.socket):
            # Without this, Nagle's algorithm holds a small PUBLISH behind the PUBACKs we just
            # sent until the broker's delayed ACK comes back: tens of milliseconds per hop.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._acks.clear()
        with self._lock:
            self._generation += 1
            self._stats["connects"] += 1
            self._connected.set()
            filters = list(self._routes)
            down = time.monotonic() - self._down_since if self._down_since is not None else None
            self._down_since = None
        if down is None:
            log.info("%s: connected to %s (MQTT %s)", self.client_id, self.url, "5" if self.mqtt5 else "3.1.1")
        else:
            log.info("%s: reconnected to %s after %.2fs (session %s)", self.client_id, self.url, down,
                     "resumed" if self.session_present else "new")
        if self._birth is not None:
            self._guard("birth message", lambda: self.publish(self._birth[0], self._birth[1](), qos=1, retain=True))
        subs = {}
        for topic_filter in filters:
            rc, mid = client.subscribe(topic_filter, qos=1)
            if rc == paho.MQTT_ERR_SUCCESS:
                subs[mid] = topic_filter
        with self._lock:
            self._background_subs = subs     # connect() waits for these the first time
        self._ready.set()
        for listener in self._listeners:
            self._guard("connect listener", listener)

    def _guard(self, what: str, fn: Callable[[], object]) -> None:
        """Run ``fn`` on the network thread, which must survive it failing."""
        try:
            fn()
        except Exception:
            log.exception("%s: the %s failed", self.client_id, what)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties=None) -> None:
        with self._lock:
            was_connected = self._connected.is_set()
            self._connected.clear()
            self._ready.clear()
            if was_connected and not self._closing:
                self._stats["disconnects"] += 1
                self._down_since = time.monotonic()
        self._acks.wake()
        if self._closing:
            return
        if was_connected:
            log.warning("%s: lost the connection to %s (%s); reconnecting", self.client_id, self.url, reason_code)
        elif self._refusal is None:
            self._dropped_before_connack.set()
        delay = REFUSED_DELAY_S if self._refusal else self._backoff.next()
        client.reconnect_delay_set(delay, delay)

    def _on_connect_fail(self, client, userdata) -> None:
        delay = self._backoff.next()
        log.debug("%s: cannot reach %s; next attempt in %.2fs", self.client_id, self.url, delay)
        client.reconnect_delay_set(delay, delay)


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.01) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` seconds pass; return its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
