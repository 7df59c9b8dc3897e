"""The byte counts fogsplit reports are the bytes on the socket: checked through a counting proxy."""
from __future__ import annotations

import time

import pytest
from fogsplit.bench.proxy import TcpProxy

from fogsplit.core.mqtt import MqttTransport, wait_until


@pytest.fixture
def proxy(broker):
    with TcpProxy(broker) as p:
        yield p


def test_reported_packet_sizes_are_the_bytes_sent(broker, proxy):
    received = []
    sub = MqttTransport(broker, f"wire-sub-{time.monotonic_ns()}")
    sub.subscribe("wire/#", received.append)
    sub.connect()
    pub = MqttTransport(proxy.url, f"wire-pub-{time.monotonic_ns()}", keepalive=60).connect()
    before = proxy.upstream_bytes
    sizes = []
    for i in range(30):
        topic = f"wire/cell/c0/device/cam{i % 3}/scores"
        sizes.append(pub.publish(topic, bytes(range(i % 20)) * (1 + i % 4), qos=i % 2))
    sizes.append(pub.publish("wire/big", b"x" * 3000, qos=0))
    assert wait_until(lambda: len(received) == 31, timeout=10)
    assert wait_until(lambda: proxy.upstream_bytes - before == sum(sizes), timeout=2), \
        (proxy.upstream_bytes - before, sum(sizes))
    assert wait_until(lambda: pub.meter.packets == 31, timeout=5)   # QoS 1 is charged on its PUBACK
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


def test_protocol_choice_is_validated():
    with pytest.raises(ValueError, match="protocol"):
        MqttTransport("mqtt://127.0.0.1:1", "x", protocol="4")
