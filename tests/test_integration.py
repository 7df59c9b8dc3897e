"""The whole path over real brokers (Mosquitto started by the fixture, and the embedded one)."""
from __future__ import annotations

import json
import time

import msgpack
import numpy as np
import pytest

from fogsplit.bench.harness import stream_test_set, summarize
from fogsplit.core.frames import SCORES, encode_slot_frame
from fogsplit.gateway.gateway import GatewaySettings
from fogsplit.core.manifest import load_bundle
from fogsplit.core.mqtt import wait_until
from fogsplit.core.service import status_payload

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bundle(bundle_dir, trusted_keys):
    return load_bundle(bundle_dir, trusted_keys=trusted_keys)


@pytest.fixture(scope="module")
def test_set(small_data):
    return small_data.test().subset(np.arange(60))


def test_every_event_gets_exactly_one_result(broker, bundle, test_set):
    outcome = stream_test_set(broker, bundle, test_set, rate=40, fleet=f"it{time.monotonic_ns() % 10**6}")
    report = summarize(outcome)
    assert report["events"] == 60
    assert report["lost"] == 0 and report["duplicates"] == 0
    assert report["accuracy"]["overall"] >= 0.35  # eight epochs on 600 events: well above 1/6 chance
    assert sum(report["exit_fraction"].values()) == pytest.approx(1.0, abs=1e-3)
    assert report["bytes_per_event"] > 0


def test_a_dead_device_does_not_block_its_events(broker, bundle, test_set):
    settings = GatewaySettings(deadline_ms=150)
    outcome = stream_test_set(broker, bundle, test_set.subset(np.arange(20)), rate=40, missing=("cam2",),
                              gateway_settings=settings, fleet=f"dead{time.monotonic_ns() % 10**6}")
    report = summarize(outcome)
    assert report["lost"] == 0 and report["duplicates"] == 0
    for results in outcome.results.values():
        assert "cam2" not in results[0][0].devices


def test_raw_offload_answers_from_the_cloud(broker, bundle, test_set):
    outcome = stream_test_set(broker, bundle, test_set.subset(np.arange(20)), policy="raw", rate=40,
                              fleet=f"raw{time.monotonic_ns() % 10**6}")
    report = summarize(outcome)
    assert report["lost"] == 0 and report["exit_fraction"]["cloud"] == 1.0
    assert report["bytes_per_event"] >= 6 * 3 * 32 * 32  # six raw uint8 views at least


def _other_model(model_id: str) -> str:
    """A model id whose frame tag differs from ``model_id``'s (tags are 7 bits: 1 in 128 collide)."""
    from fogsplit.core.frames import frame_tag
    return next(f"another-model-{i}" for i in range(256) if frame_tag(f"another-model-{i}") != frame_tag(model_id))


def test_bad_frames_are_refused_on_the_error_topic_and_serving_goes_on(broker, bundle, request, live_gateway):
    """Send each kind of bad frame to a live gateway; each is reported, then a good event still works."""
    live = live_gateway(broker, bundle, name="bad", cell="c1", settings=GatewaySettings(deadline_ms=100))
    topics, cell, watcher, errors, results = live.topics, live.cell, live.watcher, live.errors, live.results
    m = bundle.manifest
    rate = 20.0
    for sensor in m.sensor_names:
        watcher.publish(topics.device_status(cell, sensor),
                        status_payload("online", model=m.model_id, rate=rate), retain=True)
    time.sleep(0.3)
    now_event = round(time.time() * rate)
    good = dict(model=m.model_id, codec=m.codecs["scores"])
    scores = np.zeros(m.num_classes, np.float32)
    body = msgpack.unpackb(encode_slot_frame(SCORES, event=1, tensor=scores, **good))
    bad = {
        "msgpack": b"\x93not msgpack at all",
        # just over fogsplit's cap; a broker's own packet limit may be lower, so only where it passes
        **({"size": b"\x00" * ((1 << 20) + 16)} if "mosquitto" in request.node.name else {}),
        "layout": msgpack.packb({"v": 1, "k": "s", "e": 2}),
        "payload": msgpack.packb([body[0], 3, b"\x00"]),   # NaN and the like: tests/test_frames.py
        "event": msgpack.packb([body[0], -4, body[2]]),
        "model": encode_slot_frame(SCORES, event=5, tensor=scores, **{**good, "model": _other_model(m.model_id)}),
        "device": encode_slot_frame(SCORES, event=6, tensor=scores, **good),
    }
    for rule, payload in bad.items():
        device = "cam99" if rule == "device" else "cam0"
        watcher.publish(topics.scores(cell, device), payload)
    # A device that came online with another model: its status is refused, then its frames.
    watcher.publish(topics.device_status(cell, "cam1"), status_payload("online", model="older", rate=rate))
    # rumqttd keeps no order between topics: let the status land before the frame it governs.
    assert wait_until(lambda: any(str(e["topic"]).endswith("cam1/status") for e in errors), timeout=10), errors
    watcher.publish(topics.scores(cell, "cam1"), encode_slot_frame(SCORES, event=7, tensor=scores, **good))
    want = sorted([*bad, "model", "model"])
    assert wait_until(lambda: len(errors) >= len(want), timeout=10), errors
    assert sorted(e["rule"] for e in errors) == want
    assert all(e["detail"] and e["by"] == f"{cell}/gw0" for e in errors)
    watcher.publish(topics.device_status(cell, "cam1"), status_payload("online", model=m.model_id, rate=rate))
    time.sleep(0.3)
    # Serving goes on: a well-formed event from every device is answered once.
    logits = np.array([8.0] + [0.0] * (m.num_classes - 1), np.float32)
    for sensor in m.sensor_names:
        watcher.publish(topics.scores(cell, sensor), encode_slot_frame(SCORES, event=now_event, tensor=logits, **good))
    assert wait_until(lambda: len(results) >= 1, timeout=10)
    time.sleep(0.3)
    assert [r.event for r in results] == [now_event] and results[0].label == 0
    assert abs(results[0].captured - now_event / rate) < 1e-6


def test_gateway_thresholds_change_by_command(broker, bundle, live_gateway):
    live = live_gateway(broker, bundle, name="cmd", cell="c2")
    topics, gateway, watcher, errors = live.topics, live.gateway, live.watcher, live.errors
    watcher.publish(topics.cmd("c2", "thresholds"), json.dumps({"local": 0.05, "edge": 0.5}).encode())
    watcher.publish(topics.cmd("c2", "thresholds"), json.dumps({"local": 7}).encode())
    watcher.publish(topics.cmd("c2", "reboot"), b"{}")
    assert wait_until(lambda: gateway.thresholds == {"local": 0.05, "edge": 0.5} and len(errors) == 2, timeout=10)
    assert {e["rule"] for e in errors} == {"cmd"}
