"""Device agents, a gateway and a cloud worker wired together through the in-memory broker:
the services map the logic's actions to the right topics, with no MQTT broker at all.
(tests/test_integration.py runs the same path over Mosquitto and rumqttd.)"""
from __future__ import annotations

import json
import math
import threading
import time

import pytest

from fogsplit.cloud.worker import CloudWorker
from fogsplit.core.loopback import LoopbackBroker, LoopbackTransport
from fogsplit.core.manifest import load_bundle
from fogsplit.core.mqtt import wait_until
from fogsplit.core.results import Result
from fogsplit.core.settings import DeviceSettings, GatewaySettings
from fogsplit.core.topics import Topics
from fogsplit.device.agent import DeviceAgent
from fogsplit.device.sources import ReplaySource
from fogsplit.gateway.gateway import Gateway

RATE = 50.0

pytestmark = pytest.mark.slow      # the bundle it streams through is trained


@pytest.mark.parametrize("policy, local", [("request", None), ("request", 0.0), ("eager", 0.0)])
def test_every_event_is_answered_once_through_the_in_memory_broker(bundle_dir, trusted_keys, small_data, policy, local):
    bundle = load_bundle(bundle_dir, trusted_keys=trusted_keys)
    broker, topics, cell = LoopbackBroker(), Topics("wired"), "c0"
    test = small_data.test()
    n = 20
    results: list[Result] = []
    statuses: dict[str, str] = {}
    lock = threading.Lock()
    app = LoopbackTransport(broker, "app")
    app.subscribe(topics.result(cell), lambda m: (lock.acquire(), results.append(Result.from_json(m.payload)),
                                                  lock.release()))
    app.subscribe(topics.device_status(cell, "+"),
                  lambda m: statuses.__setitem__(m.topic.split("/")[-2], json.loads(m.payload)["state"]))
    app.connect()
    start = math.ceil((time.time() + 0.5) * RATE)
    services = [CloudWorker(LoopbackTransport(broker, "cloud"), topics, bundle),
                Gateway(LoopbackTransport(broker, "gw"), topics, bundle, cell=cell,
                        settings=GatewaySettings(local_threshold=local, deadline_ms=500, feature_deadline_ms=500))]
    services += [DeviceAgent(LoopbackTransport(broker, s), topics, bundle, cell=cell, device=s,
                             source=ReplaySource(test.sensors[s], rate=RATE, start_slot=start, count=n),
                             settings=DeviceSettings(policy=policy, rate=RATE))
                 for s in bundle.manifest.sensor_names]
    try:
        for service in services:
            service.transport.connect()
            service.start()
        assert set(statuses.values()) == {"online"} and len(statuses) == len(bundle.manifest.sensor_names)
        assert wait_until(lambda: len(results) >= n, timeout=20)
        time.sleep(0.2)
        with lock:
            events = sorted(r.event for r in results)
        assert events == list(range(start, start + n))
        exits = {r.exit for r in results}
        assert exits <= {"local", "edge", "cloud"} and (local is None or "local" not in exits)
        gateway = services[1].snapshot()
        assert gateway.requests == (n - gateway.exits["local"] if policy == "request" else 0)
    finally:
        for service in reversed(services):
            service.stop()
    assert set(statuses.values()) == {"offline"}     # a clean stop says so


def test_an_overloaded_gateway_sheds_stale_frames_unread_and_the_spools_replay_their_events(
        bundle_dir, trusted_keys, small_data):
    """Every frame waits "too long" (shed_after_ms of a microsecond): each is dropped unread and
    counted; with the bound lifted the devices' replays are answered, late, once."""
    bundle = load_bundle(bundle_dir, trusted_keys=trusted_keys)
    broker, topics, cell = LoopbackBroker(), Topics("shed"), "c0"
    results: list[Result] = []
    app = LoopbackTransport(broker, "app")
    app.subscribe(topics.result(cell), lambda m: results.append(Result.from_json(m.payload)))
    app.connect()
    n, start = 5, math.ceil((time.time() + 0.5) * RATE)
    gateway = Gateway(LoopbackTransport(broker, "gw"), topics, bundle, cell=cell,
                      settings=GatewaySettings(shed_after_ms=0.001, deadline_ms=100))
    devices = [DeviceAgent(LoopbackTransport(broker, s), topics, bundle, cell=cell, device=s,
                           source=ReplaySource(small_data.test().sensors[s], rate=RATE, start_slot=start, count=n),
                           settings=DeviceSettings(rate=RATE, reoffer_s=0.5))
               for s in bundle.manifest.sensor_names]
    services = [CloudWorker(LoopbackTransport(broker, "cloud"), topics, bundle), gateway, *devices]
    try:
        for service in services:
            service.transport.connect()
            service.start()
        assert wait_until(lambda: gateway.snapshot().shed >= n * len(devices), timeout=10)
        assert results == [] and gateway.snapshot().events == 0
        gateway.settings = GatewaySettings(deadline_ms=100)    # the overload is over
        assert wait_until(lambda: len({r.event for r in results}) >= n, timeout=20)
        time.sleep(0.5)
        assert sorted(r.event for r in results) == list(range(start, start + n))
        assert all(r.late for r in results)
    finally:
        for service in reversed(services):
            service.stop()
