"""Stats snapshots of every tier, the watch dashboard, and a running gateway's discovery and
stats on a real broker (docs/monitoring.md)."""
from __future__ import annotations

import json
import time
from dataclasses import asdict

import numpy as np
import pytest

from fakes import CELL, RATE, SENSORS, TOPICS, ScriptedRunner, confident, manifest, scores, status, UNSURE
from fogsplit.cloud.logic import CloudLogic
from fogsplit.core.clock import FakeClock
from fogsplit.core.codecs import CodecSpec
from fogsplit.core.frames import encode_forward_frame
from fogsplit.core.metrics import ProcessProbe, Rate, Window, nearest_rank
from fogsplit.core.settings import DeviceSettings, GatewaySettings
from fogsplit.core.transport import Message
from fogsplit.device.logic import DeviceLogic
from fogsplit.device.sources import Capture
from fogsplit.gateway.logic import GatewayLogic


# -- the helpers -------------------------------------------------------------------------------

def test_a_window_keeps_the_newest_samples_and_gives_nearest_rank_percentiles():
    window = Window(size=100)
    for value in range(1000):
        window.add(float(value))
    window.add(float("nan"))                                  # not a measurement: ignored
    assert len(window) == 100
    assert window.percentiles(50, 99) == {"p50": 949.0, "p99": 998.0}
    assert Window().percentiles(50) == {"p50": None}
    assert nearest_rank([1.0, 2.0, 3.0, 4.0], 50) == 2.0
    with pytest.raises(ValueError, match="percentile"):
        nearest_rank([1.0], 0)
    with pytest.raises(ValueError, match="at least one"):
        Window(size=0)


def test_a_rate_is_per_second_since_the_last_reading():
    rate = Rate(0, 10.0)
    assert rate.per_second(50, 15.0) == 10.0
    assert rate.per_second(50, 20.0) == 0.0
    assert rate.per_second(60, 20.0) == 0.0                   # no time passed: no rate, no division


def test_the_process_probe_reads_memory_and_cpu():
    probe = ProcessProbe()
    first = probe.sample()
    sum(i * i for i in range(200_000))
    second = probe.sample()
    assert first.rss_mb > 1 and first.cpu_percent is None
    assert second.cpu_s >= first.cpu_s and second.cpu_percent >= 0


# -- the tiers' snapshots ----------------------------------------------------------------------

class TimedRunner(ScriptedRunner):
    """A shard that takes ``seconds`` of the fake clock per run."""

    def __init__(self, clock: FakeClock, seconds: list[float], **outputs) -> None:
        super().__init__(**outputs)
        self.clock, self.seconds = clock, list(seconds)

    def run(self, **inputs):
        self.clock.advance(self.seconds.pop(0))
        return super().run(**inputs)


def test_device_stats_carry_the_shard_latency_percentiles():
    clock = FakeClock()
    runner = TimedRunner(clock, [0.002] * 98 + [0.010, 0.050], scores=confident(1),
                         feature=np.zeros((2, 2, 2), np.float32))
    logic = DeviceLogic(manifest(), runner, cell=CELL, device="cam1", settings=DeviceSettings(), clock=clock)
    for event in range(100):
        logic.on_capture(Capture(event=event, captured=event / RATE, sample=np.zeros((1, 8, 8), np.float32)))
    stats = logic.snapshot()
    assert stats.processed == 100 and stats.time == round(clock.time(), 3)
    assert stats.shard_ms == {"p50": pytest.approx(2.0), "p99": pytest.approx(10.0)}
    assert json.loads(json.dumps(asdict(stats)))["shard_ms"]["p99"] == pytest.approx(10.0)


def gateway(**settings):
    clock = FakeClock()
    runner = ScriptedRunner(logits=confident(2), edge_feature=np.arange(4, dtype=np.float32))
    logic = GatewayLogic(manifest(), runner, cell=CELL, gateway="gw0",
                         settings=GatewaySettings(deadline_ms=200, feature_deadline_ms=400, **settings), clock=clock)
    return logic, clock


def test_gateway_stats_give_rates_latency_per_exit_last_seen_and_thresholds():
    logic, clock = gateway(local_threshold=0.3)
    for device in ("cam0", "cam1"):
        logic.on_status(status(device))
    logic.on_status(status("cam2", "offline"))
    first = round(clock.time() * RATE)
    clock.advance(0.005)
    for i in range(4):                      # one event every 100 ms, its scores 5 ms after its capture
        for device in ("cam0", "cam1"):
            logic.on_scores(scores(device, first + i, confident(1) if i < 3 else UNSURE))
        clock.advance(0.1 if i < 3 else 0.42)
    logic.on_timer(clock.monotonic())       # the fourth: unsure, its features never come: degraded
    clock.advance(0.6)
    stats = logic.snapshot()
    assert stats.events == 4 and stats.exits["local"] == 4 and stats.degraded == 1
    assert stats.events_per_s == pytest.approx(4 / 1.325, abs=1e-3)
    assert stats.latency_ms["local"] == {"p50": pytest.approx(5.0), "p95": pytest.approx(425.0),
                                         "p99": pytest.approx(425.0)}
    assert stats.latency_ms["edge"] == {"p50": None, "p95": None, "p99": None}
    assert stats.last_seen_s == {"cam0": pytest.approx(1.0), "cam1": pytest.approx(1.0), "cam2": None}
    assert stats.thresholds == {"local": 0.3, "edge": 0.5} and stats.cache_hit_rate is None
    assert stats.online_devices == ["cam0", "cam1"] and stats.open_events == 0
    clock.advance(2.0)
    assert logic.snapshot().events_per_s == 0.0                # nothing since the last snapshot
    body = json.loads(json.dumps(asdict(stats)))
    assert body["time"] > 0 and body["latency_ms"]["cache"]["p95"] is None


def test_gateway_latency_is_answer_time_minus_capture_time_per_tier():
    logic, clock = gateway()
    for device in SENSORS:
        logic.on_status(status(device))
    event = round(clock.time() * RATE)
    clock.advance(0.012)
    for device in SENSORS:
        logic.on_scores(scores(device, event, UNSURE, feature=np.ones((2, 2, 2), np.float32)))
    stats = logic.snapshot()
    assert stats.exits["edge"] == 1 and stats.latency_ms["edge"]["p50"] == pytest.approx(12.0)


def test_cloud_stats_count_answers_and_their_latency():
    clock = FakeClock()
    logic = CloudLogic(manifest(), ScriptedRunner(logits=confident(2)), clock=clock)
    for i, lag in enumerate((0.1, 0.2, 0.3)):
        payload = encode_forward_frame(model="m1", event=40 + i, captured=clock.time() - lag, devices=("cam0",),
                                       sensors=SENSORS, tensor=np.zeros(4, np.float32), codec=CodecSpec("fp32"))
        logic.on_forward(Message(TOPICS.forward(CELL), payload))
    logic.on_forward(Message(TOPICS.forward(CELL), b"\x00"))       # refused: not counted as answered
    clock.advance(3.0)
    stats = logic.snapshot("cloud0")
    assert (stats.worker, stats.answered, stats.events_per_s) == ("cloud0", 3, 1.0)
    assert stats.latency_ms == {"p50": pytest.approx(200.0, abs=0.01), "p99": pytest.approx(300.0, abs=0.01)}
    assert stats.time == round(clock.time(), 3)


# -- the dashboard -----------------------------------------------------------------------------

def feed_fleet(state, now: float = 100.0) -> None:
    root = TOPICS.root
    gw_stats = {"events": 40, "events_per_s": 12.5, "exits": {"local": 30, "edge": 8, "cloud": 1, "cache": 1},
                "latency_ms": {"local": {"p50": 7.5, "p95": 9.0, "p99": 11.25}}, "online_devices": ["cam0", "cam1"],
                "time": 1.0}
    messages = [
        (f"{root}/cell/{CELL}/gateway/gw0/status", {"state": "online"}),
        (f"{root}/cell/{CELL}/gateway/gw0/stats", gw_stats),
        (f"{root}/cell/{CELL}/device/cam0/status", {"state": "online"}),
        (f"{root}/cell/{CELL}/device/cam0/stats", {"processed": 120, "dropped_captures": 3,
                                                   "shard_ms": {"p50": 1.234, "p99": 2.0}, "rss_mb": 61.5,
                                                   "cpu_percent": 14.0}),
        (f"{root}/cell/{CELL}/device/cam1/status", {"state": "online"}),
        (f"{root}/cell/{CELL}/device/cam2/status", {"state": "offline"}),
        (f"{root}/cloud/cloud0/status", {"state": "online"}),
        (f"{root}/cloud/cloud0/stats", {"answered": 1, "events_per_s": 0.1, "latency_ms": {"p50": 40.0, "p99": 41.0},
                                        "refused": 0}),
        (f"{root}/error", {"by": f"{CELL}/gw0", "rule": "model", "topic": f"{root}/cell/{CELL}/device/cam2/scores"}),
    ]
    for topic, body in messages:
        state.feed(topic, json.dumps(body).encode(), now)


def test_the_dashboard_renders_cells_devices_and_workers_from_messages():
    from fogsplit.watch import WatchState, render_text
    state = WatchState(TOPICS)
    feed_fleet(state)
    screen = render_text(state, now=100.0)
    row = [c.strip() for c in next(line for line in screen.splitlines() if "gw0" in line).split("│")[1:-1]]
    assert row == ["c0", "gw0", "online", "12.5", "30", "8", "1", "1", "7.5", "11.2", "2/3", "1"]
    cam0 = [c.strip() for c in next(line for line in screen.splitlines() if "cam0" in line).split("│")[1:-1]]
    assert cam0 == ["c0", "cam0", "online", "120", "3", "1.23", "61.5", "14.0"]
    cam2 = [c.strip() for c in next(line for line in screen.splitlines() if "cam2" in line).split("│")[1:-1]]
    assert cam2[:3] == ["c0", "cam2", "offline"] and cam2[3:] == ["-"] * 5
    assert "cloud0" in screen and "errors in the last minute: 1" in screen


def test_the_dashboard_forgets_errors_after_a_minute_and_counts_bad_messages():
    from fogsplit.watch import WatchState, render_text
    state = WatchState(TOPICS)
    feed_fleet(state, now=100.0)
    state.feed(f"{TOPICS.root}/cell/{CELL}/gateway/gw0/stats", b"\xff not json", 120.0)
    state.feed(f"{TOPICS.root}/cell/{CELL}/device/cam0/stats", b"[1, 2]", 120.0)
    state.feed("elsewhere/cell/c0/gateway/gw0/status", b'{"state": "offline"}', 120.0)   # another fleet
    screen = render_text(state, now=161.0)
    assert "errors in the last minute: 0" in screen
    assert "unreadable messages: 2" in screen and "online" in screen
    assert state.gateways[(CELL, "gw0")].stats["events_per_s"] == 12.5     # the last good snapshot stays


# -- on a real broker --------------------------------------------------------------------------

@pytest.mark.slow
def test_a_running_gateway_retains_its_discovery_and_publishes_stats_with_a_time(mosquitto, bundle_dir, trusted_keys,
                                                                                  live_gateway, capsys):
    from test_discovery import validate
    from fogsplit.cli import main
    from fogsplit.core.manifest import load_bundle
    from fogsplit.core.mqtt import MqttTransport, wait_until
    bundle = load_bundle(bundle_dir, shards=["gateway"], trusted_keys=trusted_keys)
    live = live_gateway(mosquitto, bundle, name="mon", cell="c0",
                        settings=GatewaySettings(stats_period_s=0.2, discovery_prefix="homeassistant"))
    topics, sensors = live.topics, bundle.manifest.sensor_names
    stats = []
    live.watcher.subscribe(topics.gateway_stats("c0", "gw0"), lambda m: stats.append((m.retain, json.loads(m.payload))))
    assert wait_until(lambda: len(stats) >= 2, timeout=10)
    assert all(not retained and body["time"] > 0 and "events_per_s" in body and "latency_ms" in body
               for retained, body in stats)

    configs = []                                                 # a late subscriber: only retained ones reach it
    ha = MqttTransport(mosquitto, "mon-ha")
    ha.subscribe(f"homeassistant/+/fogsplit_{topics.fleet}_c0/+/config", configs.append)
    ha.connect()
    try:
        expected = 5 + 3 * len(sensors)
        assert wait_until(lambda: len(configs) >= expected, timeout=10), len(configs)
        assert all(m.retain for m in configs)
        components = [validate(m)[0] for m in configs]
        assert components.count("binary_sensor") == len(sensors)
    finally:
        for m in configs:                                        # leave nothing retained behind on the broker
            ha.publish(m.topic, b"", qos=1, retain=True)
        ha.close()

    assert main(["watch", "--broker", mosquitto, "--fleet", topics.fleet, "--seconds", "0.5"]) == 0
    screen = capsys.readouterr().out
    row = [c.strip() for c in next(line for line in screen.splitlines() if "gw0" in line).split("│")[1:-1]]
    assert row[:3] == ["c0", "gw0", "online"]
