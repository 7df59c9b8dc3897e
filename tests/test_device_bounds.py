"""A device whose shard is slower than its capture rate: its backlog stays at a few captures, it
publishes the newest capture's scores, and it reports what it dropped in its stats."""
from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

from fogsplit.core.manifest import load_bundle
from fogsplit.core.mqtt import MqttTransport, wait_until
from fogsplit.core.settings import DeviceSettings
from fogsplit.core.topics import Topics
from fogsplit.device.agent import DeviceAgent
from fogsplit.device.sources import ReplaySource

pytestmark = pytest.mark.slow

SHARD_S = 0.05      # the "shard" takes 50 ms ...
RATE = 100.0        # ... of the 10 ms between two captures


class SlowRunner:
    def __init__(self, runner) -> None:
        self.runner = runner

    def run(self, **inputs):
        time.sleep(SHARD_S)
        return self.runner.run(**inputs)


def test_a_slow_shard_keeps_a_short_backlog_and_reports_the_rest_dropped(broker, bundle_dir, trusted_keys):
    bundle = load_bundle(bundle_dir, trusted_keys=trusted_keys)
    topics = Topics(f"slow{time.monotonic_ns() % 10**6}")
    sensor = bundle.manifest.sensor_names[0]
    samples = np.zeros((8, *bundle.manifest.sensor(sensor).shape), np.uint8)
    source = ReplaySource(samples, rate=RATE, count=int(RATE * 1.5))
    agent = DeviceAgent(MqttTransport(broker, f"slow-{topics.fleet}"), topics, bundle, cell="c0", device=sensor,
                        source=source, settings=DeviceSettings(rate=RATE, stats_period_s=0.3))
    agent.logic.runner = SlowRunner(agent.logic.runner)
    stats, scores = [], []
    watcher = MqttTransport(broker, f"watch-{topics.fleet}")
    watcher.subscribe(topics.device_stats("c0", sensor), lambda m: stats.append(json.loads(m.payload)))
    watcher.subscribe(topics.scores("c0", sensor), lambda m: scores.append(m.payload))
    watcher.connect()
    backlog, waiting = [], []
    sampling = threading.Event()

    def sample_backlog() -> None:
        while not sampling.wait(0.005):
            backlog.append(agent._inbox.qsize())
            waiting.append(len(agent.backlog))

    sampler = threading.Thread(target=sample_backlog, daemon=True)
    try:
        agent.transport.connect()
        agent.start()
        sampler.start()
        assert wait_until(lambda: not agent._loops[0].is_alive(), timeout=30)
        assert wait_until(lambda: len(agent.backlog) == 0, timeout=10)   # the last few are run
        agent.drain()
        sampling.set()
        snapshot = agent.snapshot()
        captured = int(RATE * 1.5)
        assert snapshot.dropped_captures > captured / 2          # most captures could not be run
        assert snapshot.processed + snapshot.dropped_captures == captured
        assert max(backlog) <= 2 and max(waiting) <= agent.settings.capture_backlog and snapshot.inbox_dropped == 0  # at most the wake-up and one message
        assert wait_until(lambda: any(s["dropped_captures"] > 0 for s in stats), timeout=5), stats
        assert wait_until(lambda: len(scores) == snapshot.processed, timeout=5)
    finally:
        sampling.set()
        agent.stop()
        agent.transport.close()
        watcher.close()
