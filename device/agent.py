"""The device agent service: the capture loop, the device logic, and MQTT around them.

Runs on a Pi-class board with onnxruntime, numpy, paho-mqtt and msgpack only.

Bound on captures: a short backlog (``capture_backlog`` captures, 16 by default: 0.4 s at 40
captures/s, enough for a garbage-collection pause of a busy process), the oldest dropped first. A shard that is slower than the capture rate never builds a queue behind it:
once the backlog is full each new capture pushes out the oldest waiting one, which is counted
(``dropped_captures`` in the device's stats). Memory stays flat, what goes out is always the
newest, and a short stall (the scheduler, a GC pause, a busy board) is absorbed without loss.
"""
from __future__ import annotations

import json
import threading
from collections import deque
from dataclasses import asdict

from fogsplit.core.clock import SYSTEM_CLOCK, Clock
from fogsplit.core.manifest import Bundle
from fogsplit.core.metrics import ProcessProbe
from fogsplit.core.models import ModelSet, WatchedRunner
from fogsplit.core.runner import ShardRunner
from fogsplit.core.rollout import Trust
from fogsplit.core.rollout_link import RolloutLink
from fogsplit.core.service import Service, status_payload
from fogsplit.core.settings import DeviceSettings, RolloutSettings
from fogsplit.core.errors import FrameError
from fogsplit.core.topics import Topics
from fogsplit.core.untrusted import json_object
from fogsplit.core.transport import Transport

from fogsplit.device.logic import DeviceLogic, DeviceStats, FeatureStore, run_device_shard
from fogsplit.device.sources import Capture, Source
from fogsplit.device.spool import Spool

REPLAY_PERIOD_S = 0.2

__all__ = ["CaptureBacklog", "DeviceAgent", "DeviceStats", "FeatureStore", "run_device_shard"]


class CaptureBacklog:
    """Captures waiting for the shard: at most ``depth``; a new one pushes out the oldest
    (counted in ``dropped``). ``put`` says when the consumer must be woken."""

    def __init__(self, depth: int) -> None:
        if depth < 1:
            raise ValueError(f"a capture backlog holds at least one capture, got {depth}")
        self._lock = threading.Lock()
        self._captures: deque[Capture] = deque()
        self._depth = depth
        self._wake_pending = False
        self.dropped = 0

    def put(self, capture: Capture) -> bool:
        """Hold ``capture``; True when the consumer must be woken (no wake-up is pending)."""
        with self._lock:
            if len(self._captures) >= self._depth:
                self._captures.popleft()
                self.dropped += 1
            self._captures.append(capture)
            wake, self._wake_pending = not self._wake_pending, True
            return wake

    def wake_failed(self) -> None:
        """The wake-up could not be delivered: let the next :meth:`put` try again."""
        with self._lock:
            self._wake_pending = False

    def take(self) -> tuple[Capture | None, bool]:
        """The oldest waiting capture, and whether more wait behind it (then the caller stays
        responsible for waking the consumer again)."""
        with self._lock:
            capture = self._captures.popleft() if self._captures else None
            more = bool(self._captures)
            self._wake_pending = more
            return capture, more

    def __len__(self) -> int:
        return len(self._captures)


class DeviceAgent(Service):
    def __init__(self, transport: Transport, topics: Topics, bundle: Bundle, *, cell: str, device: str,
                 source: Source, settings: DeviceSettings | None = None, clock: Clock = SYSTEM_CLOCK,
                 rollout: RolloutSettings | None = None, trust: Trust = Trust()) -> None:
        self.settings = settings = settings or DeviceSettings()
        super().__init__(transport, topics, f"{cell}/{device}", inbox=settings.inbox, clock=clock)
        m = bundle.manifest
        self.cell, self.device, self.source = cell, device, source
        self.spool = Spool(settings.spool, max_bytes=settings.spool_max_bytes, max_age_s=settings.spool_max_age_s,
                           reoffer_s=settings.reoffer_s) \
            if settings.delivery == "reliable" and settings.policy != "raw" else None
        self.logic = self._build(bundle)
        self.models = ModelSet(m.model_id, self.logic)
        self.backlog = CaptureBacklog(settings.capture_backlog)
        self.probe = ProcessProbe()
        self.rate = float(source.rate)
        self._announce(publish=False)
        self.route(topics.request(cell), self._on_request)
        # A gateway that (re)starts may have lost the broker's retained statuses: it hears ours again.
        self.route(topics.gateway_status(cell, "+"), self._on_gateway_status)
        if self.spool is not None:
            self.route(topics.ack(cell), self._on_ack)
            self.every(REPLAY_PERIOD_S, self._replay)
            if self.spool.resumed:
                self.log.info("%s: the spool %s holds %d events not yet acked: replaying them", self.name,
                              settings.spool, self.spool.resumed)
        if self.logic.cache is not None:
            self.route(topics.result(cell), self._on_result)
            self.route(topics.cmd(cell, "thresholds"), self._on_command)
        self.rollout = None if rollout is None or rollout.store is None else RolloutLink(
            self, tier="device", name=device, cell=cell, running=m.model_id, settings=rollout, trust=trust,
            clock=clock, shards=[] if settings.policy == "raw" else [m.device_shard(device).name],
            prepare=lambda b: self.models.add(b.manifest.model_id, self._build(b)), switch=self.models.switch,
            forget=self.models.forget)
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
            if self.backlog.put(capture) and not self.submit(self._process_next):
                self.backlog.wake_failed()

    def _process_next(self) -> None:
        capture, more = self.backlog.take()
        if more and not self.submit(self._process_next):
            self.backlog.wake_failed()
        if capture is None:
            return
        logic = self.models.logic_at(capture.event / self.rate)
        if logic is not self.logic:
            self.logic = logic
            self._announce()
        self.apply(logic.on_capture(capture))
        if self.rollout is not None and logic.runner is not None:
            self.rollout.observe(logic.manifest.model_id, 1, failure=logic.runner.take_failure())

    # -- model switching (docs/rollout.md) ---------------------------------------------------
    def _build(self, bundle: Bundle) -> DeviceLogic:
        m, s = bundle.manifest, self.settings
        runner = None if s.policy == "raw" else WatchedRunner(
            ShardRunner(bundle.shard_path(m.device_shard(self.device)), threads=s.threads))
        return DeviceLogic(m, runner, cell=self.cell, device=self.device, settings=s, clock=self.clock,
                           spool=self.spool)

    def _announce(self, *, publish: bool = True) -> None:
        """The status names the model this device's captures now run; a switch republishes it."""
        identity = {"model": self.logic.manifest.model_id, "policy": self.settings.policy, "rate": self.rate}
        topic = self.topics.device_status(self.cell, self.device)
        online = lambda: status_payload("online", **identity)  # noqa: E731
        self._status_online = online
        self.presence("device_status", topic, online, status_payload("offline", **identity))
        if publish:
            self.send("device_status", topic, online())
            self.log.info("%s: captures now run model %s", self.name, identity["model"])

    def _on_ack(self, msg):
        return (self.models.by_tag(msg.payload) or self.logic).on_ack(msg)

    def _replay(self) -> None:
        if self.transport.connected:
            self.apply(self.logic.replay())

    def _on_gateway_status(self, msg):
        """A gateway that just came online (not a retained status) hears this device's status."""
        try:
            online = not msg.retain and json_object(msg.payload, "status", "a gateway status").get("state") == "online"
        except FrameError:
            online = False
        if online:
            self.send("device_status", self.topics.device_status(self.cell, self.device), self._status_online())
        return []

    def _on_request(self, msg):
        return (self.models.by_tag(msg.payload) or self.logic).on_request(msg)

    def _on_result(self, msg):
        for logic in [lg for lg in self.models.logics.values() if lg is not self.logic]:
            logic.on_result(msg)
        return self.logic.on_result(msg)

    def _on_command(self, msg):
        for logic in [lg for lg in self.models.logics.values() if lg is not self.logic]:
            logic.on_command(msg)
        return self.logic.on_command(msg)

    def snapshot(self) -> DeviceStats:
        stats = self.logic.snapshot()
        stats.dropped_captures = self.backlog.dropped
        stats.skipped_slots = getattr(self.source, "skipped", 0)
        stats.refused = self.refused
        stats.inbox_dropped = self.inbox_dropped
        stats.transport = self.transport.stats()
        process = self.probe.sample()
        stats.rss_mb, stats.cpu_s, stats.cpu_percent = process.rss_mb, process.cpu_s, process.cpu_percent
        return stats

    def publish_stats(self) -> None:
        self.send("device_stats", self.topics.device_stats(self.cell, self.device),
                  json.dumps(asdict(self.snapshot())).encode())

    def on_stop(self) -> None:
        stop = getattr(self.source, "stop", None)
        if stop:
            stop()
        if self.spool is not None:
            self.spool.close()
        self.log.info("%s: stopping; %s", self.name, json.dumps(asdict(self.snapshot())))
