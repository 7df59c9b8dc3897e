"""The embedded broker meets the transport's contract (docs/broker.md): MQTT 5 with topic aliases,
persistent sessions that queue QoS 1, shared subscriptions, retained messages and wills; and it
runs as a process of its own that can be killed (SIGKILL) and started again on the same port.
No timing assertions: every wait is a bound on something that must happen."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from fogsplit.bench.broker import _Probe, contract
from fogsplit.bench.embedded import EmbeddedBroker, mosquitto_binary, rumqttd_config
from fogsplit.core.mqtt import MqttTransport, wait_until

pytestmark = pytest.mark.broker

KINDS = ["mosquitto", "rumqttd"]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (killed, not yet reaped by its parent) counts as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


@pytest.fixture(params=KINDS)
def kind(request) -> str:
    if request.param == "mosquitto" and mosquitto_binary() is None:
        pytest.fail("mosquitto is not installed (apt-get install mosquitto); .ci/run installs it")
    return request.param


def test_rumqttd_is_started_with_an_mqtt5_listener():
    assert '[v5.1]' in rumqttd_config("127.0.0.1", 1883)
    assert '[v4.1]' in rumqttd_config("127.0.0.1", 1883, "3.1.1")


def test_bad_arguments_are_refused_before_anything_starts():
    with pytest.raises(ValueError, match="kind"):
        EmbeddedBroker(kind="nanomq")
    with pytest.raises(ValueError, match="3.1.1"):
        EmbeddedBroker(kind="mosquitto", mqtt="3.1.1")
    with pytest.raises(ValueError, match="data_dir"):
        EmbeddedBroker(kind="rumqttd", data_dir="/tmp/x")


def test_the_contract_holds(kind):
    """MQTT 5, aliases granted and honoured, QoS 1 queued for a persistent session while it is
    away, a shared subscription handing each message to one member, retained, will."""
    with EmbeddedBroker(kind=kind) as url:
        c = contract(url)
    assert c["mqtt5"] and c["topic_alias_maximum"] > 0 and c["alias_delivered"] == 3, c
    assert c["session_present"] and c["queued_qos1_delivered"] == 5, c
    assert c["shared"]["each_once"] and all(c["shared"]["members"]), c
    assert c["retained"] and c["will"], c


def test_the_transport_gets_topic_aliases_from_rumqttd():
    with EmbeddedBroker(kind="rumqttd") as url:
        got = []
        sub = MqttTransport(url, "alias-sub")
        sub.subscribe("fogsplit/v1/demo/cell/cell0/device/cam0/scores", lambda m: got.append(m.topic))
        sub.connect()
        pub = MqttTransport(url, "alias-pub").connect()
        topic = "fogsplit/v1/demo/cell/cell0/device/cam0/scores"
        first, second = pub.publish(topic, b"x" * 12, qos=0), pub.publish(topic, b"x" * 12, qos=0)
        assert pub.mqtt5
        assert second == 2 + 2 + 1 + 3 + 12      # header, empty topic, properties length, alias, payload
        assert first == second + len(topic)
        assert wait_until(lambda: len(got) == 2, timeout=5)
        assert got == [topic, topic]
        pub.close()
        sub.close()


def test_rumqttd_sets_tcp_nodelay_on_its_listener():
    broker = EmbeddedBroker(kind="rumqttd").start()
    try:
        assert broker.nodelay
    finally:
        broker.stop()


def test_a_3_1_1_listener_is_spoken_to_in_3_1_1():
    with EmbeddedBroker(kind="rumqttd", mqtt="3.1.1") as url:
        pub = MqttTransport(url, "v311-pub").connect()
        assert not pub.mqtt5
        assert pub.publish("a/b", b"x" * 12, qos=0) == 2 + 2 + len("a/b") + 12
        pub.close()


def test_a_persistent_session_gets_what_was_published_while_it_was_away(kind):
    with EmbeddedBroker(kind=kind) as url:
        pub = _Probe(url, "q-pub")
        away = _Probe(url, "q-away", persistent=True)
        away.subscribe("q/t")
        away.crash()                              # gone without a DISCONNECT, as a killed process
        for n in range(5):
            pub.publish("q/t", f"m{n}".encode(), qos=1)
        back = _Probe(url, "q-away", persistent=True)
        assert back.session_present
        assert wait_until(lambda: len(back.messages) == 5, timeout=5), back.messages
        assert [p for _, p, _ in back.messages] == [b"m0", b"m1", b"m2", b"m3", b"m4"]
        for probe in (back, pub):
            probe.close()


def test_shared_subscriptions_of_two_fleets_each_get_every_message(kind):
    """rumqttd 0.20 keys a shared group by its name alone: two filters under one group name
    share one cursor and each loses half. With a group name per filter (as here) both get all."""
    with EmbeddedBroker(kind=kind) as url:
        pub = _Probe(url, "s-pub")
        workers = {fleet: _Probe(url, f"s-{fleet}") for fleet in ("fa", "fb")}
        for fleet, worker in workers.items():
            worker.subscribe(f"$share/cloud-{fleet}/{fleet}/+/forward")
        for n in range(20):
            for fleet in workers:
                pub.publish(f"{fleet}/c{n % 3}/forward", str(n).encode(), qos=1)
        for worker in workers.values():
            assert wait_until(lambda: len(worker.messages) == 20, timeout=5), len(worker.messages)
        for probe in (*workers.values(), pub):
            probe.close()


def test_a_killed_broker_comes_back_on_the_same_port_and_clients_reconnect(kind):
    broker = EmbeddedBroker(kind=kind).start()
    try:
        port, pid = broker.port, broker.pid
        got = []
        sub = MqttTransport(broker.url, "k-sub")
        sub.subscribe("k/t", lambda m: got.append(m.payload))
        sub.connect()
        pub = MqttTransport(broker.url, "k-pub").connect()
        broker.kill()
        assert not broker.running and broker.pid is None
        assert wait_until(lambda: not alive(pid), timeout=5)     # SIGKILL: the process is gone
        assert wait_until(lambda: not sub.connected and not pub.connected, timeout=10)
        broker.start()
        assert broker.port == port and broker.pid != pid
        assert wait_until(lambda: sub.connected and pub.connected, timeout=15)   # by themselves
        assert wait_until(lambda: (pub.publish("k/t", b"again", qos=1), got)[1], timeout=10, interval=0.2)
        assert set(got) == {b"again"}
        pub.close()
        sub.close()
    finally:
        broker.stop()


def test_the_broker_is_its_own_process_and_sigkill_to_it_is_a_crash(kind):
    broker = EmbeddedBroker(kind=kind).start()
    try:
        pid = broker.pid
        assert pid and pid != os.getpid() and alive(pid)
        os.kill(pid, signal.SIGKILL)               # from outside, as a chaos benchmark does
        assert wait_until(lambda: not broker.running, timeout=5)
        broker.start()                             # same port
        assert broker.running and MqttTransport(broker.url, "after").connect().mqtt5
    finally:
        broker.stop()


def test_rumqttd_exits_when_its_parent_dies():
    """A parent killed with SIGKILL cannot stop its broker: the rumqttd child notices that its
    stdin closed and exits, freeing the port."""
    code = ("from fogsplit.bench.embedded import EmbeddedBroker; import time, sys\n"
            "b = EmbeddedBroker(kind='rumqttd').start(); print(b.pid, flush=True); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        assert alive(child)
        parent.kill()
        parent.wait(10)
        assert wait_until(lambda: not alive(child), timeout=10)
    finally:
        parent.kill()


def test_mosquitto_keeps_retained_messages_in_its_data_dir_across_a_restart(tmp_path):
    if mosquitto_binary() is None:
        pytest.fail("mosquitto is not installed (apt-get install mosquitto); .ci/run installs it")
    broker = EmbeddedBroker(kind="mosquitto", data_dir=tmp_path / "data").start()
    try:
        pub = _Probe(broker.url, "d-pub")
        pub.publish("d/status", b"online", qos=1, retain=True)
        pub.close()
        broker.stop()                               # SIGTERM: Mosquitto saves on its way out
        broker.start()
        late = _Probe(broker.url, "d-late")
        late.subscribe("d/+")
        assert wait_until(lambda: late.messages, timeout=5)
        assert late.messages[0] == ("d/status", b"online", True)
        late.close()
    finally:
        broker.stop()


def test_a_rumqttd_panic_makes_its_process_exit_rather_than_hang():
    """rumqttd 0.20's router panics ("group must exists") when the last member of a shared
    group, holding a persistent session, drops with QoS 1 messages unacknowledged (a cloud
    worker killed mid-event). The process would stay up with no router: the child exits
    instead (code 70), as a crash. If a later iotcore no longer panics there is nothing to check."""
    broker = EmbeddedBroker(kind="rumqttd").start()
    try:
        pub = _Probe(broker.url, "p-pub")
        worker = _Probe(broker.url, "p-worker", persistent=True, manual_ack=True)
        worker.subscribe("$share/cloud/p/+/forward")
        for n in range(3):
            pub.publish("p/c0/forward", str(n).encode(), qos=1)
        assert wait_until(lambda: len(worker.messages) == 3, timeout=5)
        worker.crash()                               # never acknowledged
        if not wait_until(lambda: not broker.running, timeout=5):
            assert _Probe(broker.url, "p-check").connack is not None
            pytest.skip("this rumqttd survives a persistent shared member dropping mid-event")
        assert broker.exit_code == 70
    finally:
        broker.stop()
