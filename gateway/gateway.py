"""The gateway (fog node) of one cell: assemble, fuse, exit early, ask, run, forward."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from fogsplit.core.assembly import Assembler, Event
from fogsplit.core.cache import CacheSettings
from fogsplit.core.commands import parse_thresholds
from fogsplit.core.errors import FrameError
from fogsplit.core.frames import GONE, REQUEST, to_slot, encode_events_frame, encode_forward_frame
from fogsplit.core.fusion import fuse
from fogsplit.core.manifest import Bundle, expect_frames
from fogsplit.core.transport import Message, Transport
from fogsplit.core.results import EXIT_TIERS, make_result, parse_result
from fogsplit.core.roster import Roster, decode_device_frame, parse_status
from fogsplit.core.runner import ShardRunner
from fogsplit.core.service import Service, status_payload
from fogsplit.core.topics import Topics, device_of

from fogsplit.gateway.caching import GatewayCache, vote_logits
from fogsplit.gateway.stages import edge_stage, local_stage


@dataclass(frozen=True)
class GatewaySettings:
    deadline_ms: float = 250.0          # wait for the cell's scores
    feature_deadline_ms: float = 500.0  # wait for requested features
    stats_period_s: float = 5.0
    threads: int = 1
    local_threshold: float | None = None   # None: the bundle's calibrated exit thresholds
    edge_threshold: float | None = None

    cache: CacheSettings | None = None       # None: no semantic cache

    def __post_init__(self) -> None:
        if self.cache is not None and not isinstance(self.cache, CacheSettings):
            raise ValueError(f"cache must be CacheSettings or None, got {type(self.cache).__name__}")
        for name in ("local_threshold", "edge_threshold"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        for name in ("deadline_ms", "feature_deadline_ms", "stats_period_s"):
            if not 0 < getattr(self, name) <= 600_000:
                raise ValueError(f"{name} must be positive and at most 600000, got {getattr(self, name)}")
        if not 1 <= self.threads <= 64:
            raise ValueError(f"threads must be 1..64, got {self.threads}")


@dataclass
class GatewayStats:
    """The snapshot published on ``.../gateway/{gw}/stats``."""

    gateway: str
    cell: str
    model: str
    uptime_s: float = 0.0
    events: int = 0
    exits: dict[str, int] = field(default_factory=lambda: dict.fromkeys(EXIT_TIERS, 0))
    degraded: int = 0
    requests: int = 0
    refused: int = 0
    open_events: int = 0
    online_devices: list[str] = field(default_factory=list)
    bytes_out: int = 0
    shard_runs: int = 0
    cache: dict = field(default_factory=dict)


class Gateway(Service):
    def __init__(self, transport: Transport, topics: Topics, bundle: Bundle, *, cell: str,
                 gateway: str = "gw0", settings: GatewaySettings | None = None) -> None:
        super().__init__(transport, topics, f"{cell}/{gateway}")
        self.settings = settings or GatewaySettings()
        self.manifest = m = bundle.manifest
        self.cell, self.gateway = cell, gateway
        self.sensors = m.sensor_names
        overrides = {"local": self.settings.local_threshold, "edge": self.settings.edge_threshold}
        self.thresholds = {**m.thresholds, **{k: v for k, v in overrides.items() if v is not None}}
        self.runner = ShardRunner(bundle.shard_path(m.tier_shard("gateway")), threads=self.settings.threads)
        self.expect = expect_frames(m)
        self.roster = Roster(m.model_id)
        self.assembler = Assembler(self.sensors, self.settings.deadline_ms / 1000.0)
        self.stats = GatewayStats(gateway=gateway, cell=cell, model=m.model_id)
        self.started = time.monotonic()
        cache = self.settings.cache
        self.cache = GatewayCache(m, cache) if cache is not None and cache.enabled else None
        if self.cache is not None:
            self.route(topics.result(cell), self.on_result)
        self.route(topics.scores(cell, "+"), self.on_scores)
        self.route(topics.feature(cell, "+"), self.on_feature)
        self.route(topics.device_status(cell, "+"), self.on_device_status)
        self.route(topics.cmd(cell, "+"), self.on_command)
        self.every(self.settings.stats_period_s, self.publish_stats)

    def start(self) -> "Gateway":
        self.transport.publish(self.topics.gateway_status(self.cell, self.gateway),
                               status_payload("online", model=self.manifest.model_id), retain=True)
        self.log.info("%s: online, model %s, sensors %s, thresholds %s", self.name, self.manifest.model_id,
                      ",".join(self.sensors), self.thresholds)
        return super().start()

    # -- inputs ---------------------------------------------------------------------------
    def on_scores(self, msg: Message) -> None:
        got = decode_device_frame(msg.payload, msg.topic, self.expect, self.roster)
        frame, device, event = got.frame, got.device, got.event
        ev = self.assembler.add(event, device, frame.tensor, got.captured, time.monotonic())
        opened = self.assembler.open.get(event)
        if frame.feature is not None and opened is not None:
            opened.features[device] = frame.feature
        if self.cache is not None and opened is not None and opened.stage == "scores":
            opened.votes[device] = frame.vote
        if ev is not None:
            self.decide_local(ev)

    def on_feature(self, msg: Message) -> None:
        got = decode_device_frame(msg.payload, msg.topic, self.expect, self.roster)
        frame, device, event = got.frame, got.device, got.event
        if frame.kind == GONE:
            for ev in list(self.assembler.open.values()):
                if ev.stage == "features" and to_slot(ev.event) in frame.events:
                    ev.waiting_for = ev.waiting_for - {device}
                    self._maybe_run_edge(ev)
            return
        ev = self.assembler.open.get(event)
        if ev is None:
            return
        ev.features[device] = frame.tensor
        if ev.stage == "features":
            ev.waiting_for = ev.waiting_for - {device}
            self._maybe_run_edge(ev)

    def on_device_status(self, msg: Message) -> None:
        device = device_of(msg.topic)
        status = parse_status(msg.payload, device, msg.topic)
        if device not in self.sensors:
            return
        self.roster.update(device, status)
        if status.state == "online" and status.model not in (None, self.manifest.model_id):
            self.assembler.online.discard(device)
            raise FrameError("model", f"{device!r} came online with model {status.model!r}, this gateway runs "
                                      f"{self.manifest.model_id!r}; its frames are refused", device=device,
                             topic=msg.topic)
        if status.state == "online":
            self.assembler.online.add(device)
        else:
            self.assembler.online.discard(device)
        self.log.info("%s: device %s is %s; waiting for %s", self.name, device, status.state,
                      sorted(self.assembler.expected()))

    def on_command(self, msg: Message) -> None:
        values = parse_thresholds(msg.payload, msg.topic)
        values.pop("device_cache", None)          # the devices' to apply
        if "cache" in values and self.cache is None:
            raise FrameError("cmd", "thresholds: this gateway runs no cache, so 'cache' cannot be set",
                             topic=msg.topic)
        if "cache" in values:
            self.cache.cache.set_threshold(values.pop("cache"))
        self.thresholds.update(values)
        self.log.info("%s: exit thresholds now %s, cache threshold %s", self.name, self.thresholds,
                      self.cache.cache.threshold if self.cache is not None else None)

    def on_result(self, msg: Message) -> None:
        """The cell's results (the cloud's among them): fill the cache with answers to held forwards."""
        result = parse_result(msg.payload, msg.topic)
        self.cache.on_result(result.event, result.label, result.exit, result.model, time.monotonic())

    # -- timers ---------------------------------------------------------------------------
    def next_timer(self) -> float | None:
        return self.assembler.next_deadline()

    def on_timer(self, now: float) -> None:
        for ev in self.assembler.expired(now):
            if ev.stage == "scores":
                self.decide_local(ev)
            else:
                self.run_edge(ev)

    # -- stages ---------------------------------------------------------------------------
    def decide_local(self, ev: Event) -> None:
        self.stats.events += 1
        decision = local_stage(ev.parts, self.sensors, self.manifest.local_fusion, self.thresholds["local"])
        ev.local_logits = decision.logits
        if decision.exits:
            self.answer(ev, decision.logits, "local")
            return
        if self.cache is not None and self._answer_from_device_votes(ev, len(ev.parts)):
            return
        missing = frozenset(ev.parts) - set(ev.features)
        ev.stage = "features"
        ev.waiting_for = missing
        ev.deadline = time.monotonic() + self.settings.feature_deadline_ms / 1000.0
        if missing:
            self.stats.requests += 1
            payload = encode_events_frame(REQUEST, model=self.manifest.model_id, events=[ev.event],
                                          devices=tuple(sorted(missing)), sensors=self.expect.sensors)
            self.transport.publish(self.topics.request(self.cell), payload, qos=0, events=[ev.event])
        else:
            self.run_edge(ev)

    def _maybe_run_edge(self, ev: Event) -> None:
        if not ev.waiting_for:
            self.run_edge(ev)

    def run_edge(self, ev: Event) -> None:
        features = {d: f for d, f in ev.features.items() if d in ev.parts}
        if not features:
            self.log.warning("%s: event %d got no features in time; answering from the local exit",
                             self.name, ev.event)
            self.stats.degraded += 1
            self.answer(ev, ev.local_logits, "local", degraded=True)
            return
        fused = fuse(features, self.sensors, self.manifest.edge_fusion)
        now = time.monotonic()
        if self.cache is not None:
            vote = self.cache.lookup(fused, now)
            if vote.hit:
                self.answer(ev, vote_logits(vote.label, float(vote.distribution[vote.label]), self.manifest.num_classes),
                            "cache", devices=sorted(features))
                return
        decision, edge_feature = edge_stage(self.runner, fused, self.thresholds["edge"])
        self.stats.shard_runs += 1
        if decision.exits:
            if self.cache is not None:
                self.cache.learn(fused, int(np.argmax(decision.logits)), "edge", self.manifest.model_id, now)
            self.answer(ev, decision.logits, "edge", devices=sorted(features))
            return
        if self.cache is not None:
            self.cache.hold(ev.event, fused, now)
        frame = encode_forward_frame(model=self.manifest.model_id, event=ev.event, captured=ev.captured,
                                     devices=tuple(sorted(features)), sensors=self.expect.sensors,
                                     tensor=edge_feature, codec=self.manifest.codecs["forward"])
        self.transport.publish(self.topics.forward(self.cell), frame, events=[ev.event])
        self.stats.exits["cloud"] += 1
        self.assembler.finish(ev.event)

    def _answer_from_device_votes(self, ev: Event, expected: int) -> bool:
        """Answer ``ev`` from the devices' caches if a quorum of ``expected`` devices agree."""
        label = self.cache.devices_agree(ev.votes, expected)
        if label is None:
            return False
        share = sum(v == label for v in ev.votes.values()) / max(expected, 1)
        self.answer(ev, vote_logits(label, share, self.manifest.num_classes), "cache")
        return True

    def answer(self, ev: Event, logits: np.ndarray, tier: str, *, devices: list[str] | None = None,
               degraded: bool = False) -> None:
        result = make_result(logits, event=ev.event, exit=tier, classes=self.manifest.classes,
                             devices=devices or ev.devices, captured=ev.captured,
                             model=self.manifest.model_id, degraded=degraded)
        self.transport.publish(self.topics.result(self.cell), result.to_json())
        self.stats.exits[tier] += 1
        self.assembler.finish(ev.event)

    # -- monitoring -----------------------------------------------------------------------
    def snapshot(self) -> GatewayStats:
        s = self.stats
        s.uptime_s = round(time.monotonic() - self.started, 1)
        s.refused = self.refused
        s.open_events = len(self.assembler.open)
        s.online_devices = sorted(self.assembler.expected())
        s.bytes_out = sum(self.transport.meter.snapshot()[1].values()) if hasattr(self.transport, "meter") else 0
        s.cache = self.cache.snapshot() if self.cache is not None else {}
        return GatewayStats(**asdict(s))

    def publish_stats(self) -> None:
        self.transport.publish(self.topics.gateway_stats(self.cell, self.gateway),
                               json.dumps(asdict(self.snapshot())).encode(), qos=0, retain=True)

    def on_stop(self) -> None:
        self.transport.publish(self.topics.gateway_status(self.cell, self.gateway), status_payload("offline"),
                               retain=True)
        self.log.info("%s: offline; %s", self.name, asdict(self.snapshot()))
