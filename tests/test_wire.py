"""The byte counts fogsplit reports are the bytes on the socket: checked through a counting proxy."""
from __future__ import annotations

import socket
import threading
import time

import pytest

from fogsplit.bench.embedded import free_port
from fogsplit.core.mqtt import MqttTransport, parse_broker_url, wait_until


class CountingProxy:
    """A TCP relay that counts the bytes each client sends towards the broker."""

    def __init__(self, broker_url: str) -> None:
        target = parse_broker_url(broker_url)
        self.target = (target.host, target.port)
        self.port = free_port()
        self.upstream_bytes = 0
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            broker = socket.create_connection(self.target)
            threading.Thread(target=self._pump, args=(client, broker, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(broker, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, count: bool) -> None:
        try:
            while data := src.recv(65536):
                if count:
                    with self._lock:
                        self.upstream_bytes += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._server.close()


@pytest.fixture
def proxy(broker):
    p = CountingProxy(broker)
    yield p
    p.close()


def test_reported_packet_sizes_are_the_bytes_sent(broker, proxy):
    received = []
    sub = MqttTransport(broker, f"wire-sub-{time.monotonic_ns()}")
    sub.subscribe("wire/#", received.append)
    sub.connect()
    pub = MqttTransport(proxy.url, f"wire-pub-{time.monotonic_ns()}", keepalive=60).connect()
    time.sleep(0.2)
    before = proxy.upstream_bytes
    sizes = []
    for i in range(30):
        topic = f"wire/cell/c0/device/cam{i % 3}/scores"
        sizes.append(pub.publish(topic, bytes(range(i % 20)) * (1 + i % 4), qos=i % 2))
    sizes.append(pub.publish("wire/big", b"x" * 3000, qos=0))
    assert wait_until(lambda: len(received) == 31, timeout=10)
    assert wait_until(lambda: proxy.upstream_bytes - before == sum(sizes), timeout=2), \
        (proxy.upstream_bytes - before, sum(sizes))
    assert pub.meter.packets == 31
    pub.close()
    sub.close()


def test_mosquitto_gets_mqtt5_topic_aliases(mosquitto):
    pub = MqttTransport(mosquitto, "alias-pub").connect()
    topic = "fogsplit/v1/demo/cell/cell0/device/cam0/scores"
    first, second = pub.publish(topic, b"x" * 12, qos=0), pub.publish(topic, b"x" * 12, qos=0)
    assert pub.mqtt5
    assert second == 2 + 2 + 1 + 3 + 12   # header, empty topic, properties length, alias, payload
    assert first == second + len(topic)
    assert pub.publish(topic, b"x" * 12, qos=1) == first + 2 - 3   # QoS 1: packet id, never an alias
    pub.close()


def test_a_311_broker_is_spoken_to_in_311(embedded):
    pub = MqttTransport(embedded, "v311-pub").connect()
    assert not pub.mqtt5
    topic = "a/b"
    assert pub.publish(topic, b"x" * 12, qos=0) == 2 + 2 + len(topic) + 12
    pub.close()


def test_protocol_choice_is_validated():
    with pytest.raises(ValueError, match="protocol"):
        MqttTransport("mqtt://127.0.0.1:1", "x", protocol="4")
