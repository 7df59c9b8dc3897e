"""The in-memory broker keeps the MQTT rules fogsplit relies on: matching, retained, wills, births, shares."""
from __future__ import annotations

import pytest

from fogsplit.core.loopback import LoopbackBroker, LoopbackTransport, topic_matches
from fogsplit.core.transport import Message
from fogsplit.core.wire import WireMeter, publish_packet_size


@pytest.fixture
def broker() -> LoopbackBroker:
    return LoopbackBroker()


def client(broker: LoopbackBroker, name: str) -> LoopbackTransport:
    return LoopbackTransport(broker, name).connect()


def inbox(transport: LoopbackTransport, topic_filter: str) -> list[Message]:
    got: list[Message] = []
    transport.subscribe(topic_filter, got.append)
    return got


@pytest.mark.parametrize("topic_filter, topic, expected", [
    ("a/b", "a/b", True),
    ("a/+", "a/b", True),
    ("a/+", "a/b/c", False),          # + is one level
    ("a/+/c", "a/b/c", True),
    ("+/+", "a/b", True),
    ("+", "a/b", False),
    ("a/#", "a/b/c", True),
    ("a/#", "a", True),               # # also matches the parent level
    ("#", "a/b", True),
    ("a/b", "a/b/c", False),
    ("a/b/c", "a/b", False),
    ("a/+", "a/", True),              # an empty level is a level
    ("#", "$SYS/uptime", False),      # wildcards never match a leading $ level
    ("+/uptime", "$SYS/uptime", False),
    ("$SYS/#", "$SYS/uptime", True),
])
def test_topic_matching(topic_filter, topic, expected):
    assert topic_matches(topic_filter, topic) is expected


def test_a_message_reaches_every_matching_subscription_and_no_other(broker):
    a, b = client(broker, "a"), client(broker, "b")
    wide, narrow, other = inbox(a, "f/#"), inbox(b, "f/cell/+/scores"), inbox(b, "f/cell/c0")
    size = client(broker, "pub").publish("f/cell/c0/scores", b"xy", qos=0)
    assert [m.payload for m in wide] == [b"xy"] and [m.payload for m in narrow] == [b"xy"]
    assert other == []
    assert size == publish_packet_size("f/cell/c0/scores", 2, 0)


def test_retained_messages_reach_later_subscribers_until_cleared(broker):
    pub = client(broker, "pub")
    pub.publish("s/cam0", b"online", retain=True)
    pub.publish("s/cam1", b"offline", retain=True)
    got = inbox(client(broker, "late"), "s/+")
    assert sorted((m.topic, m.payload, m.retain) for m in got) == [("s/cam0", b"online", True),
                                                                    ("s/cam1", b"offline", True)]
    pub.publish("s/cam0", b"", retain=True)
    assert broker.retained("s/cam0") is None and got[-1] == Message("s/cam0", b"")
    assert [m.topic for m in inbox(client(broker, "later"), "s/+")] == ["s/cam1"]


def test_shared_subscription_spreads_round_robin_and_gets_no_retained(broker):
    pub = client(broker, "pub")
    pub.publish("fwd/c0", b"old", retain=True)
    workers = [client(broker, f"w{i}") for i in range(3)]
    boxes = [inbox(w, "$share/cloud/fwd/+") for w in workers]
    plain = inbox(client(broker, "watch"), "fwd/+")
    for i in range(6):
        pub.publish("fwd/c0", str(i).encode())
    assert [[m.payload for m in box] for box in boxes] == [[b"0", b"3"], [b"1", b"4"], [b"2", b"5"]]
    assert len(plain) == 1 + 6      # the retained one, then every message


def test_a_drop_fires_the_will_and_a_reconnect_the_birth(broker):
    births = iter(range(1, 10))
    dev = LoopbackTransport(broker, "cam0")
    dev.set_presence("s/cam0", lambda: f"online {next(births)}".encode(), b"offline")
    dev.subscribe("cmd/cam0", (commands := []).append)
    reconnected = []
    dev.add_connect_listener(lambda: reconnected.append(dev.connected))
    watch = inbox(client(broker, "watch"), "s/cam0")
    dev.connect()
    dev.drop()
    assert not dev.connected
    assert [m.payload for m in watch] == [b"online 1", b"offline"]
    assert broker.retained("s/cam0") == b"offline"
    dev.reconnect()
    assert broker.retained("s/cam0") == b"online 2"
    client(broker, "op").publish("cmd/cam0", b"go")
    assert [m.payload for m in commands] == [b"go"]
    assert reconnected == [True, True]
    assert dev.stats()["connects"] == 2 and dev.stats()["disconnects"] == 1


def test_a_clean_close_fires_no_will(broker):
    dev = LoopbackTransport(broker, "cam0")
    dev.set_presence("s/cam0", lambda: b"online", b"offline")
    dev.connect().close()
    assert broker.retained("s/cam0") == b"online"


def test_a_second_connection_with_the_same_id_takes_the_session_over(broker):
    first = LoopbackTransport(broker, "cam0")
    first.set_presence("s/cam0", lambda: b"online", b"offline")
    got = inbox(first.connect(), "x")
    watch = inbox(client(broker, "watch"), "s/cam0")
    LoopbackTransport(broker, "cam0").connect()
    assert not first.connected and [m.payload for m in watch] == [b"online", b"offline"]
    client(broker, "pub").publish("x", b"1")
    assert got == []


def test_offline_publishes_qos0_dropped_qos1_queued_and_sent_on_reconnect(broker):
    dev = LoopbackTransport(broker, "cam0", meter=WireMeter(max_events=100)).connect()
    got = inbox(client(broker, "watch"), "d/#")
    dev.drop()
    assert dev.publish("d/scores", b"s", qos=0) == 0
    dev.publish("d/feature", b"f", qos=1, events=[7])
    assert got == [] and dev.meter.packets == 0
    dev.reconnect()
    assert [m.topic for m in got] == ["d/feature"]
    assert dev.meter.snapshot()[0] == {7: publish_packet_size("d/feature", 1, 1)}
    assert dev.stats() == {"connects": 2, "disconnects": 1, "sent": 1, "dropped_offline": 1, "queued_offline": 1,
                           "refused_publishes": 0, "withheld_refused": 0, "failed_publishes": 0}


def test_subscribing_before_connect_takes_effect_on_connect(broker):
    client(broker, "pub").publish("r/t", b"kept", retain=True)
    sub = LoopbackTransport(broker, "sub")
    got = inbox(sub, "r/#")
    assert got == []
    sub.connect()
    assert [m.payload for m in got] == [b"kept"]


@pytest.mark.parametrize("bad", ["a/#/b", "a/b#", "a+/b", "", "$share/g", "$share//a", "$share/g+/a"])
def test_malformed_filters_are_refused(broker, bad):
    with pytest.raises(ValueError, match="topic filter"):
        client(broker, "sub").subscribe(bad, lambda m: None)


def test_publishing_to_a_wildcard_is_refused(broker):
    with pytest.raises(ValueError):
        client(broker, "pub").publish("a/+", b"")


def test_a_full_inbox_drops_its_oldest_message_not_the_newest_nor_a_call(broker):
    """Overload: what the service serves is the freshest; its own calls always run."""
    from fogsplit.core.service import Service
    from fogsplit.core.topics import Topics

    service = Service(LoopbackTransport(broker, "svc"), Topics("inbox"), "svc", inbox=3)
    handled: list[bytes] = []
    service.route("in/#", lambda msg: handled.append(msg.payload))
    service.transport.connect()
    calls: list[str] = []
    service.submit(calls.append, "first call")
    pub = client(broker, "pub")
    for i in range(5):                        # the service is not started: everything queues
        pub.publish("in/x", str(i).encode())
    service.start()
    service.drain()
    service.stop()
    assert calls == ["first call"] and handled == [b"3", b"4"] and service.inbox_dropped == 3
