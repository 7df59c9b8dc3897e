"""MqttTransport against real brokers: subscriptions in place on return, presence across a cut
link, the meter charging only what was sent, refused subscriptions raised."""
from __future__ import annotations

import glob
import json
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable

import pytest
from fogsplit.bench.proxy import TcpProxy

from fogsplit.bench.embedded import free_port, mosquitto_binary, wait_for_port
from fogsplit.core.mqtt import Backoff, MqttTransport, wait_until
from fogsplit.core.transport import SubscribeError
from fogsplit.core.wire import WireMeter, publish_packet_size


def unique(name: str) -> str:
    return f"{name}-{time.monotonic_ns()}"


def publish_until(publisher: MqttTransport, topic: str, arrived: Callable[[], object]) -> bool:
    """Publish every 50 ms until ``arrived()``: for a subscription whose SUBACK nobody waits for
    (a resubscription after a reconnect, or one made on the network thread)."""
    def attempt() -> bool:
        publisher.publish(topic, b"go", qos=0)
        return bool(arrived())
    return wait_until(attempt, timeout=5, interval=0.05)


@pytest.fixture
def transports():
    """Make transports that are closed when the test ends, passed or not."""
    made: list[MqttTransport] = []

    def make(url: str, client_id: str, **kwargs) -> MqttTransport:
        made.append(MqttTransport(url, unique(client_id), **kwargs))
        return made[-1]

    yield make
    for t in made:
        t.close()


@pytest.fixture
def proxy(broker):
    with TcpProxy(broker) as p:
        yield p


def test_a_message_published_as_soon_as_subscribe_returns_arrives(broker, transports):
    root = unique("sub")
    early, late = [], []
    sub = transports(broker, "sub")
    sub.subscribe(f"{root}/early", early.append)
    pub = transports(broker, "pub").connect()
    sub.connect()
    pub.publish(f"{root}/early", b"1", qos=0)
    sub.subscribe(f"{root}/late/+", late.append)
    pub.publish(f"{root}/late/x", b"2", qos=0)
    assert wait_until(lambda: early and late, timeout=5), (early, late)
    assert [m.payload for m in early + late] == [b"1", b"2"]


def test_presence_and_subscriptions_survive_a_cut_link(broker, proxy, transports):
    """Both brokers publish the will on a reset connection (rumqttd included)."""
    root = unique("presence")
    status, seen = f"{root}/status/cam0", []
    watcher = transports(broker, "watch")
    watcher.subscribe(status, lambda m: seen.append(m.payload))
    watcher.connect()
    device = transports(proxy.url, "cam0")
    births = iter(range(1, 100))
    device.set_presence(status, lambda: f"online {next(births)}".encode(), b"offline")
    commands, connects = [], []
    device.subscribe(f"{root}/cmd/#", commands.append)
    device.add_connect_listener(lambda: connects.append(device.connected))
    device.connect()
    assert wait_until(lambda: seen == [b"online 1"], timeout=5), seen

    assert proxy.cut() == 1
    assert wait_until(lambda: len(seen) == 3, timeout=10), seen
    assert seen == [b"online 1", b"offline", b"online 2"]
    assert wait_until(lambda: device.connected, timeout=5)
    assert publish_until(watcher, f"{root}/cmd/go", lambda: commands)
    assert {m.payload for m in commands} == {b"go"}

    retained = []
    late = transports(broker, "late")
    late.subscribe(status, retained.append)
    late.connect()
    assert wait_until(lambda: retained, timeout=5)
    assert (retained[0].payload, retained[0].retain) == (b"online 2", True)
    assert connects == [True, True]
    assert device.stats()["connects"] == 2 and device.stats()["disconnects"] == 1


def test_offline_qos0_is_dropped_uncharged_and_qos1_queued_then_charged(broker, proxy, transports):
    root = unique("offline")
    got = []
    watcher = transports(broker, "watch")
    watcher.subscribe(f"{root}/#", got.append)
    watcher.connect()
    device = transports(proxy.url, "cam0", meter=WireMeter(max_events=100)).connect()
    proxy.refuse(30)
    proxy.cut()
    assert wait_until(lambda: not device.connected, timeout=5)

    assert device.publish(f"{root}/scores", b"s" * 10, qos=0, events=[1]) == 0
    size = device.publish(f"{root}/feature", b"f" * 10, qos=1, events=[2])
    assert size == publish_packet_size(f"{root}/feature", 10, 1, mqtt5=device.mqtt5)
    assert device.meter.packets == 0
    assert device.stats()["dropped_offline"] == 1 and device.stats()["queued_offline"] == 1

    proxy.refuse(0)
    assert wait_until(lambda: got, timeout=10)
    assert wait_until(lambda: device.meter.packets == 1, timeout=5)
    assert [m.topic for m in got] == [f"{root}/feature"]
    assert device.meter.snapshot()[0] == {2: size}
    assert device.stats()["sent"] == 1


def test_a_failing_handler_does_not_stop_delivery(mosquitto, transports):
    topic, got = unique("boom"), []

    def handler(msg):
        got.append(msg.payload)
        if len(got) == 1:
            raise RuntimeError("a bug in a handler")

    sub = transports(mosquitto, "sub")
    sub.subscribe(topic, handler)
    sub.connect()
    pub = transports(mosquitto, "pub").connect()
    pub.publish(topic, b"1")
    pub.publish(topic, b"2")
    assert wait_until(lambda: got == [b"1", b"2"], timeout=5), got


def test_subscribing_from_a_connect_listener_does_not_block_the_network_thread(mosquitto, transports):
    topic, got = unique("later"), []
    sub = transports(mosquitto, "sub")
    sub.add_connect_listener(lambda: sub.subscribe(topic, got.append))
    sub.connect()
    pub = transports(mosquitto, "pub").connect()
    assert publish_until(pub, topic, lambda: got)


DYNSEC_PLUGIN = next(iter(sorted(glob.glob("/usr/lib/*/mosquitto_dynamic_security.so")
                                  + glob.glob("/usr/*lib/mosquitto_dynamic_security.so"))), None)
DYNSEC_CONFIG = {   # anonymous clients may use open/# only
    "defaultACLAccess": {"publishClientSend": False, "publishClientReceive": True, "subscribe": False,
                         "unsubscribe": True},
    "clients": [], "groups": [{"groupname": "anonymous", "roles": [{"rolename": "open"}]}],
    "roles": [{"rolename": "open", "acls": [{"acltype": "subscribePattern", "topic": "open/#", "allow": True},
                                            {"acltype": "publishClientSend", "topic": "open/#", "allow": True}]}],
    "anonymousGroup": "anonymous",
}


@pytest.fixture(scope="module")
def acl_mosquitto():
    """A Mosquitto that refuses subscriptions outside ``open/#``. Its plain ``acl_file`` would
    not do: Mosquitto 2.0 grants a denied subscription and then delivers nothing; the dynamic
    security plugin refuses it in the SUBACK."""
    binary = mosquitto_binary()
    if binary is None or DYNSEC_PLUGIN is None:
        pytest.skip("needs mosquitto and its dynamic security plugin (apt-get install mosquitto)")
    with tempfile.TemporaryDirectory(prefix="fogsplit-dynsec-") as tmp:
        root, port = Path(tmp), free_port()
        root.chmod(0o755)     # started as root, Mosquitto reads its files as user mosquitto
        (root / "dynsec.json").write_text(json.dumps(DYNSEC_CONFIG))
        (root / "mosquitto.conf").write_text(
            f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            f"plugin {DYNSEC_PLUGIN}\nplugin_opt_config_file {root / 'dynsec.json'}\n")
        process = subprocess.Popen([binary, "-c", str(root / "mosquitto.conf")],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for_port("127.0.0.1", port, process=process)
            yield f"mqtt://127.0.0.1:{port}"
        finally:
            process.terminate()
            process.wait(10)


@pytest.mark.parametrize("protocol, reason", [("5", "Not authorized"), ("3.1.1", "Unspecified error")])
def test_a_refused_subscription_raises(acl_mosquitto, transports, protocol, reason):
    """A denied subscription comes back as 0x87 (MQTT 5) or 0x80 (3.1.1)."""
    live = transports(acl_mosquitto, "live", protocol=protocol).connect()
    live.subscribe("open/x", lambda m: None)
    with pytest.raises(SubscribeError, match=reason) as refused:
        live.subscribe("closed/x", lambda m: None)
    assert refused.value.topic_filter == "closed/x"
    assert live.connected

    early = transports(acl_mosquitto, "early", protocol=protocol)
    early.subscribe("closed/#", lambda m: None)
    with pytest.raises(SubscribeError, match="closed/#"):
        early.connect()
    assert not early.connected


def test_a_malformed_filter_is_refused_before_it_is_recorded(transports):
    t = transports("mqtt://127.0.0.1:1", "bad")
    with pytest.raises(ValueError, match="malformed"):
        t.subscribe("a/#/b", lambda m: None)


def test_backoff_doubles_to_its_cap_with_jitter_in_the_upper_half():
    backoff = Backoff(first=0.1, cap=1.0, rand=lambda: 1.0)
    assert [round(backoff.next(), 3) for _ in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    backoff.reset()
    low = Backoff(first=0.1, cap=1.0, rand=lambda: 0.0)
    assert backoff.next() == 0.1 and [low.next() for _ in range(2)] == [0.05, 0.1]
