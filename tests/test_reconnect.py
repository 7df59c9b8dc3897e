"""Sessions that survive: on both brokers, a device whose connection is cut comes back online
by itself and is served again, and a broker restarted with an empty retained store followed by
a gateway restart resumes answering without anyone touching the devices."""
from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

from fogsplit.bench.embedded import EmbeddedBroker, free_port
from fogsplit.cloud.worker import CloudWorker
from fogsplit.core.manifest import load_bundle
from fogsplit.core.mqtt import MqttTransport, wait_until
from fogsplit.core.results import Result
from fogsplit.core.settings import DeviceSettings, GatewaySettings
from fogsplit.core.topics import Topics
from fogsplit.device.agent import DeviceAgent
from fogsplit.device.sources import ReplaySource
from fogsplit.gateway.gateway import Gateway
from fogsplit.bench.proxy import TcpProxy

pytestmark = pytest.mark.slow

CELL = "c0"
RATE = 10.0


@pytest.fixture(scope="module")
def bundle(bundle_dir, trusted_keys):
    return load_bundle(bundle_dir, trusted_keys=trusted_keys)


class Stack:
    """A cloud worker, a gateway and one agent per sensor, each on its own connection; an
    application that records results and statuses. Everything is stopped by :meth:`close`."""

    def __init__(self, bundle, url: str, *, device_url: str | None = None) -> None:
        self.bundle, self.url = bundle, url
        self.topics = Topics(f"rc{time.monotonic_ns() % 10**7}")
        self.lock = threading.Lock()
        self.results: list[Result] = []
        self.status: dict[str, str] = {}
        self.app = MqttTransport(url, f"app-{self.topics.fleet}")
        self.app.subscribe(self.topics.result(CELL), self._on_result)
        self.app.subscribe(self.topics.device_status(CELL, "+"), self._on_status)
        self.app.connect()
        self.cloud = self._start(CloudWorker(MqttTransport(url, f"cloud-{self.topics.fleet}"), self.topics, bundle))
        self.gateway = self.start_gateway()
        test = np.zeros((4, *bundle.manifest.sensors[0].shape), np.float32)
        self.devices = [self._start(DeviceAgent(
            MqttTransport(device_url or url, f"{s}-{self.topics.fleet}"), self.topics, bundle, cell=CELL, device=s,
            source=ReplaySource(test + i, rate=RATE, loop=True), settings=DeviceSettings(rate=RATE)))
            for i, s in enumerate(bundle.manifest.sensor_names)]

    def start_gateway(self) -> Gateway:
        transport = MqttTransport(self.url, f"gw-{self.topics.fleet}-{time.monotonic_ns()}")
        return self._start(Gateway(transport, self.topics, self.bundle, cell=CELL,
                                   settings=GatewaySettings(deadline_ms=300, feature_deadline_ms=300)))

    @staticmethod
    def _start(service):
        service.transport.connect()
        return service.start()

    def _on_result(self, msg) -> None:
        with self.lock:
            self.results.append(Result.from_json(msg.payload))

    def _on_status(self, msg) -> None:
        with self.lock:
            self.status[msg.topic.rsplit("/", 2)[-2]] = json.loads(msg.payload)["state"]

    def answered_with_everyone_after(self, captured: float) -> list[Result]:
        everyone = self.bundle.manifest.sensor_names
        with self.lock:
            return [r for r in self.results if r.captured > captured and r.devices == everyone]

    def close(self) -> None:
        for service in (*self.devices, self.gateway, self.cloud):
            service.stop(timeout=2)
            service.transport.close()
        self.app.close()


@pytest.mark.parametrize("kind", ["mosquitto", "rumqttd"])
def test_a_restarted_broker_without_retained_messages_and_a_restarted_gateway_resume_on_their_own(bundle, kind):
    port = free_port()
    broker = EmbeddedBroker(port=port, kind=kind).start()
    stack = Stack(bundle, broker.url)
    try:
        assert wait_until(lambda: stack.answered_with_everyone_after(0), timeout=20)
        broker.kill()                            # retained statuses gone with it: no persistence
        broker = EmbeddedBroker(port=port, kind=kind).start()
        back = time.time()
        # Every tier reconnects by itself; each device's birth message restores its retained status.
        everyone = set(bundle.manifest.sensor_names)
        assert wait_until(lambda: all(d.transport.connected for d in stack.devices), timeout=15)
        stack.gateway.stop(timeout=2)
        stack.gateway.transport.close()
        stack.gateway = stack.start_gateway()    # learns the devices from the retained births alone
        restarted = time.time()
        assert wait_until(lambda: len(stack.answered_with_everyone_after(restarted)) >= 5, timeout=20), \
            (stack.status, stack.gateway.snapshot())
        assert {d for d, s in stack.status.items() if s == "online"} >= everyone
        assert stack.gateway.refused == 0 and back < restarted
    finally:
        stack.close()
        broker.stop()


def test_a_device_cut_off_comes_back_online_and_is_served_again(broker, bundle):
    """A Wi-Fi blip on one camera: the broker fires its will, the agent reconnects by itself, its
    birth message makes it ``online`` again and the gateway takes its frames again."""
    with TcpProxy(broker) as proxy:
        stack = Stack(bundle, broker, device_url=proxy.url)
        try:
            everyone = set(bundle.manifest.sensor_names)
            assert wait_until(lambda: stack.answered_with_everyone_after(0), timeout=20)
            assert wait_until(lambda: {d for d, s in stack.status.items() if s == "online"} == everyone, timeout=10)
            assert proxy.cut() == len(everyone)
            cut = time.time()
            # The will marks the cameras offline; the births bring them back.
            assert wait_until(lambda: all(d.transport.stats()["connects"] >= 2 for d in stack.devices), timeout=15)
            assert wait_until(lambda: {d for d, s in stack.status.items() if s == "online"} == everyone, timeout=10)
            assert wait_until(lambda: len(stack.answered_with_everyone_after(cut + 0.5)) >= 5, timeout=20)
            assert stack.gateway.refused == 0
        finally:
            stack.close()


def test_a_spoofed_offline_status_does_not_lock_a_device_out(broker, bundle):
    stack = Stack(bundle, broker)
    try:
        assert wait_until(lambda: stack.answered_with_everyone_after(0), timeout=20)
        device = bundle.manifest.sensor_names[0]
        stack.app.publish(stack.topics.device_status(CELL, device), b'{"state": "offline"}')
        spoofed = time.time()
        assert wait_until(lambda: len(stack.answered_with_everyone_after(spoofed + 0.5)) >= 5, timeout=20)
        assert stack.gateway.snapshot().rejoined >= 1
    finally:
        stack.close()
