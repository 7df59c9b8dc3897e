"""The test harness: start every tier on its own MQTT connection, stream a test set through
them, and summarise what came back. Used by the demo, the benchmarks and the tests."""
from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import asdict, dataclass, field

import msgspec
import numpy as np

from fogsplit.cloud.worker import CloudWorker, RawOffload
from fogsplit.core.dataset import Dataset
from fogsplit.core.manifest import Bundle
from fogsplit.core.mqtt import Message, MqttTransport, wait_until
from fogsplit.core.wire import WireMeter
from fogsplit.core.results import EXIT_TIERS, Result
from fogsplit.core.runner import ShardRunner
from fogsplit.core.settings import DeviceCacheSettings, DeviceSettings, GatewaySettings
from fogsplit.core.service import status_payload
from fogsplit.core.topics import Topics
from fogsplit.device.agent import DeviceAgent
from fogsplit.device.sources import ReplaySource
from fogsplit.gateway.gateway import Gateway

log = logging.getLogger(__name__)


class ResultCollector:
    """An application: subscribes to a cell's results and notes when each arrived."""

    def __init__(self, url: str, topics: Topics, cell: str, client_id: str = "collector") -> None:
        self._lock = threading.Lock()
        self.results: dict[int, list[tuple[Result, float]]] = {}
        self.transport = MqttTransport(url, client_id)
        self.transport.subscribe(topics.result(cell), self._on_result)
        self.transport.connect()

    def _on_result(self, msg: Message) -> None:
        received = time.time()
        result = Result.from_json(msg.payload)
        with self._lock:
            self.results.setdefault(result.event, []).append((result, received))

    def count(self, events: set[int]) -> int:
        with self._lock:
            return len(events & set(self.results))

    def close(self) -> None:
        self.transport.close()


@dataclass
class Outcome:
    """What one pass of the test set through the tiers produced."""

    events: dict[int, int]                        # event id -> label
    results: dict[int, list[tuple[Result, float]]]
    bytes_by_event: dict[int, float]
    bytes_by_leaf: dict[str, int] = field(default_factory=dict)
    gateway: dict = field(default_factory=dict)   # the gateway's last stats snapshot
    devices: dict = field(default_factory=dict)   # per device: captures it dropped, slots it skipped


def stream_test_set(url: str, bundle: Bundle, test: Dataset, *, policy: str = "request",
                    fleet: str = "demo", cell: str = "cell0", rate: float = 25.0,
                    missing: tuple[str, ...] = (), gateway_settings=None, settle_s: float = 5.0,
                    device_cache=None, cloud_link=None, delivery: str = "reliable") -> Outcome:
    """Start a cloud worker, a gateway and one agent per sensor, replay ``test`` through them.

    ``policy`` is the devices' (``request``, ``eager``, or ``raw`` for the cloud-only baseline);
    ``delivery`` the cell's (``reliable``: spools and acks; ``lean``: neither, docs/reliability.md);
    devices in ``missing`` are never started, as if dead. ``device_cache`` (CacheSettings) gives
    every device its own semantic cache; ``cloud_link`` wraps the cloud worker's transport (the
    cache benchmark emulates a WAN with it).
    """
    topics = Topics(fleet)
    meter = WireMeter(max_events=1_000_000)
    run = f"{policy}{int(time.time() * 1000) % 100000}"
    transports: list[MqttTransport] = []

    def connect(client_id: str) -> MqttTransport:
        t = MqttTransport(url, f"{client_id}-{run}", meter=meter)
        transports.append(t)
        return t

    collector = ResultCollector(url, topics, cell, f"collector-{run}")
    services = []
    if policy == "raw":
        services.append(RawOffload(connect("raw"), topics, bundle))
    else:
        cloud_transport = connect("cloud0")
        services.append(CloudWorker(cloud_link(cloud_transport) if cloud_link else cloud_transport, topics, bundle))
        gateway_settings = msgspec.structs.replace(gateway_settings or GatewaySettings(), delivery=delivery)
        gateway = Gateway(connect("gw0"), topics, bundle, cell=cell, settings=gateway_settings)
        services.append(gateway)
    n = len(test)
    sources = []
    for sensor in bundle.manifest.sensor_names:
        if sensor in missing:
            continue
        source = ReplaySource(test.sensors[sensor], rate=rate, start_slot=None, count=n)
        sources.append(source)
        settings = DeviceSettings(policy=policy, rate=rate, delivery=delivery, cache=device_cache and DeviceCacheSettings(
            **msgspec.structs.asdict(device_cache)))
        services.append(DeviceAgent(connect(sensor), topics, bundle, cell=cell, device=sensor, source=source,
                                    settings=settings))
    if missing:
        for sensor in missing:
            collector.transport.publish(topics.device_status(cell, sensor), status_payload("offline"), retain=True)
    for service in services:
        service.transport.connect()
    # The first capture is due 0.5 s after everything is connected, however long connecting
    # took: a source that starts more than a second late skips ahead (device/sources.py).
    start_slot = math.ceil((time.time() + 0.5) * rate)
    for source in sources:
        source.start_slot = start_slot
    for service in services:
        service.start()
    events = {start_slot + i: int(test.y[i]) for i in range(n)}
    try:
        wanted = set(events)
        wait_until(lambda: collector.count(wanted) == n, timeout=n / rate + 1.5 + settle_s + 30, interval=0.05)
        time.sleep(0.3)  # a duplicate would arrive now
        gateway_stats = asdict(gateway.snapshot()) if policy != "raw" else {}
        device_losses = {s.device: {"dropped_captures": s.backlog.dropped, "skipped_slots": s.source.skipped}
                         for s in services if isinstance(s, DeviceAgent)}
    finally:
        for service in services:
            service.stop()
        for t in transports:
            t.close()
        collector.close()
    by_event, by_leaf = meter.snapshot()
    return Outcome(events=events, results=dict(collector.results), bytes_by_event=by_event, bytes_by_leaf=by_leaf,
                   gateway=gateway_stats, devices=device_losses)


def percentiles(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    p = np.percentile(values, [50, 95, 99])
    return {"p50": round(float(p[0]), 2), "p95": round(float(p[1]), 2), "p99": round(float(p[2]), 2)}


def summarize(outcome: Outcome) -> dict:
    """Accuracy, exits, bytes and latency of one pass."""
    n = len(outcome.events)
    answered = {e: r for e, r in outcome.results.items() if e in outcome.events}
    first = {e: rs[0] for e, rs in answered.items()}
    correct = {e: r.label == outcome.events[e] for e, (r, _) in first.items()}
    by_tier = {t: [e for e, (r, _) in first.items() if r.exit == t] for t in EXIT_TIERS}
    latency = {t: percentiles([(recv - r.captured) * 1000 for e, (r, recv) in first.items() if r.exit == t])
               for t in EXIT_TIERS}
    total_bytes = sum(b for e, b in outcome.bytes_by_event.items() if e in outcome.events)
    return {
        "events": n,
        "results": sum(len(rs) for rs in answered.values()),
        "lost": n - len(answered),
        "duplicates": sum(len(rs) - 1 for rs in answered.values()),
        "accuracy": {"overall": round(sum(correct.values()) / n, 4) if n else None,
                     **{t: round(float(np.mean([correct[e] for e in es])), 4) if es else None
                        for t, es in by_tier.items()}},
        "exit_fraction": {t: round(len(es) / n, 4) if n else 0.0 for t, es in by_tier.items()},
        "bytes_per_event": round(total_bytes / n, 1) if n else 0.0,
        "latency_ms": latency,
    }


def single_device_accuracy(bundle: Bundle, test: Dataset) -> dict[str, float]:
    """Each device's own exit on its own, computed with its onnxruntime shard."""
    out = {}
    for sensor in bundle.manifest.sensor_names:
        runner = ShardRunner(bundle.shard_path(bundle.manifest.device_shard(sensor)), threads=2)
        scores = runner.run(x=test.sensors[sensor].astype(np.float32))["scores"]
        out[sensor] = round(float((scores.argmax(1) == test.y).mean()), 4)
    return out
