"""The device agent service: the capture loop, the device logic, and MQTT around them.

Runs on a Pi-class board with onnxruntime, numpy, paho-mqtt and msgpack only.

Bound on captures: one slot, latest wins. The capture loop never queues work behind a shard
that is slower than the capture rate: a capture that arrives while the previous one still
waits is replaced, and the replaced one is counted (``dropped_captures`` in the device's stats).
Memory stays flat and the scores that go out are always of the newest capture.
"""
from __future__ import annotations

import json
import threading
from dataclasses import asdict

from fogsplit.core.clock import SYSTEM_CLOCK, Clock
from fogsplit.core.manifest import Bundle
from fogsplit.core.runner import ShardRunner
from fogsplit.core.service import Service, status_payload
from fogsplit.core.settings import DeviceSettings
from fogsplit.core.topics import Topics
from fogsplit.core.transport import Transport

from fogsplit.device.logic import DeviceLogic, DeviceStats, FeatureStore, run_device_shard
from fogsplit.device.sources import Capture, Source

__all__ = ["CaptureSlot", "DeviceAgent", "DeviceStats", "FeatureStore", "run_device_shard"]


class CaptureSlot:
    """The one capture waiting for the shard; a newer capture replaces it (and is counted)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._capture: Capture | None = None
        self._wake_pending = False
        self.dropped = 0

    def put(self, capture: Capture) -> bool:
        """Hold ``capture``; True when the consumer must be woken (no wake-up is pending)."""
        with self._lock:
            if self._capture is not None:
                self.dropped += 1
            self._capture = capture
            wake, self._wake_pending = not self._wake_pending, True
            return wake

    def wake_failed(self) -> None:
        """The wake-up could not be delivered: let the next :meth:`put` try again."""
        with self._lock:
            self._wake_pending = False

    def take(self) -> Capture | None:
        with self._lock:
            capture, self._capture, self._wake_pending = self._capture, None, False
            return capture


class DeviceAgent(Service):
    def __init__(self, transport: Transport, topics: Topics, bundle: Bundle, *, cell: str, device: str,
                 source: Source, settings: DeviceSettings | None = None, clock: Clock = SYSTEM_CLOCK) -> None:
        self.settings = settings = settings or DeviceSettings()
        super().__init__(transport, topics, f"{cell}/{device}", inbox=settings.inbox, clock=clock)
        m = bundle.manifest
        self.cell, self.device, self.source = cell, device, source
        runner = None if settings.policy == "raw" else ShardRunner(bundle.shard_path(m.device_shard(device)),
                                                                   threads=settings.threads)
        self.logic = DeviceLogic(m, runner, cell=cell, device=device, settings=settings, clock=clock)
        self.slot = CaptureSlot()
        self.rate = float(source.rate)
        identity = {"model": m.model_id, "policy": settings.policy, "rate": self.rate}
        self.presence("device_status", topics.device_status(cell, device),
                      lambda: status_payload("online", **identity), status_payload("offline", **identity))
        self.route(topics.request(cell), self.logic.on_request)
        if self.logic.cache is not None:
            self.route(topics.result(cell), self.logic.on_result)
            self.route(topics.cmd(cell, "thresholds"), self.logic.on_command)
        self.every(settings.stats_period_s, self.publish_stats)
        self.spawn("capture", self._capture_loop)

    @property
    def manifest(self):
        return self.logic.manifest

    @property
    def cache(self):
        return self.logic.cache

    def start(self) -> "DeviceAgent":
        self.log.info("%s: serving model %s, policy %s, %g captures/s", self.name, self.manifest.model_id,
                      self.settings.policy, self.rate)
        return super().start()

    def _capture_loop(self) -> None:
        for capture in self.source.captures():
            if self.slot.put(capture) and not self.submit(self._process_latest):
                self.slot.wake_failed()

    def _process_latest(self) -> None:
        capture = self.slot.take()
        if capture is not None:
            self.apply(self.logic.on_capture(capture))

    def snapshot(self) -> DeviceStats:
        stats = self.logic.snapshot()
        stats.dropped_captures = self.slot.dropped
        stats.skipped_slots = getattr(self.source, "skipped", 0)
        stats.refused = self.refused
        stats.inbox_dropped = self.inbox_dropped
        stats.transport = self.transport.stats()
        return stats

    def publish_stats(self) -> None:
        self.send("device_stats", self.topics.device_stats(self.cell, self.device),
                  json.dumps(asdict(self.snapshot())).encode())

    def on_stop(self) -> None:
        stop = getattr(self.source, "stop", None)
        if stop:
            stop()
        self.log.info("%s: stopping; %s", self.name, json.dumps(asdict(self.snapshot())))
