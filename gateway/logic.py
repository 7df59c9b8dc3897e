"""The gateway of one cell as a plain object: messages and the clock in, actions out.

No MQTT, no threads, no sleeping: ``on_scores``, ``on_feature``, ``on_status``, ``on_command``,
``on_result`` and ``on_timer(now)`` each return the actions to publish (core/actions.py), and
the service in gateway/gateway.py maps them to topics. An event goes:

scores of the cell's online devices (or its deadline)
  -> fuse, local exit?                                -> Answer (local)
  -> the devices' cache votes agree?                  -> Answer (cache)
  -> RequestFeatures from the devices that lack one   (feature deadline)
  -> fuse the features, gateway cache hit?            -> Answer (cache)
  -> gateway shard, edge exit?                        -> Answer (edge)
     (or, when the bundle has fog nodes: FogSlice to each node, then the ensemble of the
     nodes that answered by the fog deadline, edge exit? -> Answer (edge, naming the nodes))
  -> Forward to the cloud
A request nobody answers in time answers from the local exit, marked degraded.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np

from fogsplit.core.actions import Action, Answer, Forward, RequestFeatures, refusing
from fogsplit.core.assembly import Assembler, Event
from fogsplit.core.clock import Clock
from fogsplit.core.commands import parse_thresholds
from fogsplit.core.errors import FrameError
from fogsplit.core.exits import entropy_exit
from fogsplit.core.frames import GONE, REQUEST, encode_events_frame, encode_forward_frame, to_slot
from fogsplit.core.fusion import fuse, with_local
from fogsplit.core.manifest import Manifest, expect_frames
from fogsplit.core.metrics import Rate, Window, ages, ratio
from fogsplit.core.results import EXIT_TIERS, make_result, parse_result
from fogsplit.core.roster import Roster, decode_device_frame, parse_status
from fogsplit.core.runner import ShardRunner
from fogsplit.core.settings import GatewaySettings
from fogsplit.core.topics import device_of
from fogsplit.core.transport import Message

from fogsplit.gateway.caching import GatewayCache, vote_logits
from fogsplit.gateway.fog import FogGather
from fogsplit.gateway.stages import Decision, edge_stage, local_stage

log = logging.getLogger(__name__)


@dataclass
class GatewayStats:
    """The snapshot published on ``.../gateway/{gw}/stats`` (fields: docs/monitoring.md)."""

    gateway: str
    cell: str
    model: str
    time: float = 0.0
    uptime_s: float = 0.0
    events: int = 0
    exits: dict[str, int] = field(default_factory=lambda: dict.fromkeys(EXIT_TIERS, 0))
    degraded: int = 0
    requests: int = 0
    refused: int = 0
    open_events: int = 0
    online_devices: list[str] = field(default_factory=list)
    rejoined: int = 0
    bytes_out: int = 0
    shard_runs: int = 0
    inbox_dropped: int = 0
    events_per_s: float = 0.0                 # since the last snapshot
    latency_ms: dict[str, dict[str, float | None]] = field(default_factory=dict)   # per exit tier: p50 p95 p99
    cache_hit_rate: float | None = None       # answered by a cache / events that went past the local exit
    bytes_per_event: float | None = None      # bytes this gateway published / events
    last_seen_s: dict[str, float | None] = field(default_factory=dict)   # per device: seconds since its last word
    thresholds: dict[str, float] = field(default_factory=dict)
    transport: dict = field(default_factory=dict)
    cache: dict = field(default_factory=dict)
    fog: dict = field(default_factory=dict)   # bundles with fog nodes: online, answered, missed per node


LATENCY_PERCENTILES = (50, 95, 99)


class GatewayLogic:
    def __init__(self, manifest: Manifest, runner: ShardRunner, *, cell: str, gateway: str,
                 settings: GatewaySettings, clock: Clock) -> None:
        self.manifest = m = manifest
        self.runner = runner
        self.cell, self.gateway, self.settings, self.clock = cell, gateway, settings, clock
        self.name = f"{cell}/{gateway}"
        self.sensors = m.sensor_names
        overrides = {"local": settings.local_threshold, "edge": settings.edge_threshold}
        self.thresholds = {**m.thresholds, **{k: v for k, v in overrides.items() if v is not None}}
        self.expect = expect_frames(m)
        self.roster = Roster(m.model_id, default_rate=settings.capture_rate)
        self.assembler = Assembler(self.sensors, settings.deadline_ms / 1000.0, max_open=settings.max_open)
        self.cache = GatewayCache(m, settings.cache, hold_s=settings.hold_s, max_held=settings.max_held) \
            if settings.cache is not None and settings.cache.enabled else None
        self.stats = GatewayStats(gateway=gateway, cell=cell, model=m.model_id)
        self.started = clock.monotonic()
        self.latency = {tier: Window() for tier in EXIT_TIERS}
        self.last_seen: dict[str, float] = {}
        self.rate = Rate(0, self.started)
        self.fog = FogGather(m) if m.fog is not None else None
        self.owns: Callable[[float], bool] = lambda captured: True   # a rollout narrows it (docs/rollout.md)

    # -- inputs ---------------------------------------------------------------------------
    @refusing
    def on_scores(self, msg: Message) -> list[Action]:
        got = self._device_frame(msg)
        frame, device, event = got.frame, got.device, got.event
        ev = self.assembler.add(event, device, frame.tensor, got.captured, self.clock.monotonic())
        opened = self.assembler.open.get(event)
        if opened is not None:
            if frame.feature is not None:
                opened.features[device] = frame.feature
            if self.cache is not None and opened.stage == "scores":
                opened.votes[device] = frame.vote
        return self._decide_local(ev) if ev is not None else []

    @refusing
    def on_feature(self, msg: Message) -> list[Action]:
        got = self._device_frame(msg)
        frame, device = got.frame, got.device
        if frame.kind == GONE:
            actions: list[Action] = []
            for ev in list(self.assembler.open.values()):
                if ev.stage == "features" and to_slot(ev.event) in frame.events:
                    ev.waiting_for = ev.waiting_for - {device}
                    actions += self._maybe_run_edge(ev)
            return actions
        ev = self.assembler.open.get(got.event)
        if ev is None:
            return []
        ev.features[device] = frame.tensor
        if ev.stage != "features":
            return []
        ev.waiting_for = ev.waiting_for - {device}
        return self._maybe_run_edge(ev)

    @refusing
    def on_status(self, msg: Message) -> list[Action]:
        device = device_of(msg.topic)
        status = parse_status(msg.payload, device, msg.topic)
        if device not in self.sensors:
            return []
        self.roster.update(device, status)
        if status.state == "online":
            self.last_seen[device] = self.clock.monotonic()
        if status.state == "online" and status.model not in (None, self.manifest.model_id):
            self.assembler.online.discard(device)
            raise FrameError("model", f"{device!r} came online with model {status.model!r}, this gateway runs "
                                      f"{self.manifest.model_id!r}; its frames are refused", device=device,
                             topic=msg.topic)
        if status.state == "online":
            self.assembler.online.add(device)
        else:
            self.assembler.online.discard(device)
        log.info("%s: device %s is %s; waiting for %s", self.name, device, status.state,
                 sorted(self.assembler.expected()))
        return self._stop_waiting_for(device) if status.state == "offline" else []

    @refusing
    def on_command(self, msg: Message) -> list[Action]:
        values = parse_thresholds(msg.payload, msg.topic)
        values.pop("device_cache", None)          # the devices' to apply
        if "cache" in values:
            if self.cache is None:
                raise FrameError("cmd", "thresholds: this gateway runs no cache, so 'cache' cannot be set",
                                 topic=msg.topic)
            self.cache.cache.set_threshold(values.pop("cache"))
        self.thresholds.update(values)
        log.info("%s: exit thresholds now %s, cache threshold %s", self.name, self.thresholds,
                 self.cache.cache.threshold if self.cache is not None else None)
        return []

    @refusing
    def on_result(self, msg: Message) -> list[Action]:
        """The cell's results (the cloud's among them): fill the cache with answers to held forwards."""
        if self.cache is not None:
            result = parse_result(msg.payload, msg.topic)
            self.cache.on_result(result.event, result.label, result.exit, result.model, self.clock.monotonic())
            if result.exit == "cloud" and isinstance(result.latency_ms, (int, float)):
                self.latency["cloud"].add(result.latency_ms)
        return []

    def next_deadline(self) -> float | None:
        return self.assembler.next_deadline()

    def on_timer(self, now: float) -> list[Action]:
        actions: list[Action] = []
        for ev in self.assembler.expired(now):
            actions += self._decide_local(ev) if ev.stage == "scores" else \
                self._fog_decide(ev) if ev.stage == "fog" else self._run_edge(ev)
        return actions

    def snapshot(self) -> GatewayStats:
        """The counters as they are now, and the rates since the last snapshot; the service adds
        what only it knows (refused, inbox, bytes, transport)."""
        s, now = self.stats, self.clock.monotonic()
        exits = dict(s.exits)
        past_local = s.events - exits["local"] + s.degraded
        return replace(
            s, time=round(self.clock.time(), 3), uptime_s=round(now - self.started, 1), exits=exits,
            open_events=len(self.assembler.open), online_devices=sorted(self.assembler.expected()),
            events_per_s=self.rate.per_second(s.events, now),
            latency_ms={tier: w.percentiles(*LATENCY_PERCENTILES) for tier, w in self.latency.items()},
            cache_hit_rate=ratio(exits["cache"], past_local) if self.cache is not None else None,
            last_seen_s=ages(self.last_seen, now, self.sensors), thresholds=dict(self.thresholds),
            cache=self.cache.snapshot() if self.cache is not None else {},
            fog=self.fog.snapshot() if self.fog is not None else {})

    # -- stages ---------------------------------------------------------------------------
    def _device_frame(self, msg: Message):
        got = decode_device_frame(msg.payload, msg.topic, self.expect, self.roster, self.clock.time())
        if got.captured is not None and not self.owns(got.captured):
            raise FrameError("model", f"event {got.event} belongs to another model than {self.manifest.model_id} "
                                      "(captured on the other side of a switch, docs/rollout.md)",
                             device=got.device, event=got.event, topic=msg.topic)
        self.last_seen[got.device] = self.clock.monotonic()
        if self.roster.saw_frame(got.device):
            self.stats.rejoined += 1
            self.assembler.online.add(got.device)
            log.info("%s: device %s sent a frame while marked offline: online again", self.name, got.device)
        return got

    def _stop_waiting_for(self, device: str) -> list[Action]:
        """A device went offline: the open events that waited only for it go on at once."""
        actions: list[Action] = []
        for ev in list(self.assembler.open.values()):
            if ev.stage == "scores" and ev.parts and self.assembler.expected() <= set(ev.parts):
                actions += self._decide_local(ev)
            elif ev.stage == "features" and device in ev.waiting_for:
                ev.waiting_for = ev.waiting_for - {device}
                actions += self._maybe_run_edge(ev)
        return actions

    def _decide_local(self, ev: Event) -> list[Action]:
        self.stats.events += 1
        decision = local_stage(ev.parts, self.sensors, self.manifest.local_fusion, self.thresholds["local"],
                               self.manifest.fusion_weights)
        ev.local_logits = decision.logits
        if decision.exits:
            return self._answer(ev, decision.logits, "local")
        if self.cache is not None:
            label = self.cache.devices_agree(ev.votes, len(ev.parts))
            if label is not None:
                share = sum(v == label for v in ev.votes.values()) / max(len(ev.parts), 1)
                return self._answer(ev, vote_logits(label, share, self.manifest.num_classes), "cache")
        missing = frozenset(ev.parts) - set(ev.features)
        ev.stage = "features"
        ev.waiting_for = missing
        ev.deadline = self.clock.monotonic() + self.settings.feature_deadline_ms / 1000.0
        if not missing:
            return self._run_edge(ev)
        self.stats.requests += 1
        devices = tuple(sorted(missing))
        payload = encode_events_frame(REQUEST, model=self.manifest.model_id, events=[ev.event], devices=devices,
                                      sensors=self.expect.sensors)
        return [RequestFeatures(self.cell, (ev.event,), devices, payload)]

    def _maybe_run_edge(self, ev: Event) -> list[Action]:
        return [] if ev.waiting_for else self._run_edge(ev)

    def _run_edge(self, ev: Event) -> list[Action]:
        features = {d: f for d, f in ev.features.items() if d in ev.parts}
        if not features:
            log.warning("%s: event %d got no features in time; answering from the local exit", self.name, ev.event)
            self.stats.degraded += 1
            return self._answer(ev, ev.local_logits, "local", degraded=True)
        fused = fuse(features, self.sensors, self.manifest.edge_fusion)
        now = self.clock.monotonic()
        devices = sorted(features)
        if self.cache is not None:
            vote = self.cache.lookup(fused, now)
            if vote.hit:
                share = float(vote.distribution[vote.label])
                return self._answer(ev, vote_logits(vote.label, share, self.manifest.num_classes), "cache",
                                    devices=devices)
        if self.fog is not None:
            return self._ask_fog(ev, fused, devices)
        decision, edge_feature = edge_stage(self.runner, fused, self.thresholds["edge"])
        self.stats.shard_runs += 1
        return self._edge_outcome(ev, fused, devices, decision, edge_feature)

    def _edge_outcome(self, ev: Event, fused: np.ndarray, devices: list[str], decision: Decision,
                      edge_feature: np.ndarray, *, nodes: list[str] | None = None,
                      degraded: bool = False) -> list[Action]:
        now = self.clock.monotonic()
        if decision.exits:
            if self.cache is not None:
                self.cache.learn(fused, int(np.argmax(decision.logits)), "edge", self.manifest.model_id, now)
            return self._answer(ev, decision.logits, "edge", devices=devices, nodes=nodes, degraded=degraded)
        if self.cache is not None:
            self.cache.hold(ev.event, fused, now)
        payload = encode_forward_frame(model=self.manifest.model_id, event=ev.event, captured=ev.captured,
                                       devices=tuple(devices), sensors=self.expect.sensors, tensor=edge_feature,
                                       codec=self.manifest.codecs["forward"])
        self.stats.exits["cloud"] += 1
        self.assembler.finish(ev.event)
        return [Forward(self.cell, ev.event, payload)]

    # -- fog nodes (docs/eddl.md) ------------------------------------------------------------
    @refusing
    def on_fog_answer(self, msg: Message) -> list[Action]:
        event = self.fog.on_answer(msg) if self.fog is not None else None
        ev = self.assembler.open.get(event) if event is not None else None
        if ev is None or ev.stage != "fog" or not self.fog.ready(event):
            return []
        return self._fog_decide(ev)

    @refusing
    def on_fog_status(self, msg: Message) -> list[Action]:
        if self.fog is None:
            return []
        freed = self.fog.on_status(msg)
        log.info("%s: fog node %s is %s; online nodes %s", self.name, device_of(msg.topic),
                 "offline" if device_of(msg.topic) not in self.fog.online else "online", sorted(self.fog.online))
        return [a for event in freed if (ev := self.assembler.open.get(event)) is not None
                for a in self._fog_decide(ev)]

    def _ask_fog(self, ev: Event, fused: np.ndarray, devices: list[str]) -> list[Action]:
        ev.stage = "fog"
        ev.deadline = self.clock.monotonic() + self.settings.fog_deadline_ms / 1000.0
        slices = self.fog.ask(self.cell, ev.event, fused, devices)
        return slices + (self._fog_decide(ev) if self.fog.ready(ev.event) else [])

    def _fog_decide(self, ev: Event) -> list[Action]:
        """The ensemble of the nodes that answered, with the local exit's evidence; none: the
        gateway's own shard, degraded."""
        got = self.fog.finish(ev.event)
        if not got.complete:
            self.stats.degraded += 1
            log.warning("%s: event %d: fog nodes %s answered, %s did not", self.name, ev.event, got.nodes,
                        sorted(set(self.fog.nodes) - set(got.nodes)))
        if got.logits is None:
            decision, edge_feature = edge_stage(self.runner, got.fused, self.thresholds["edge"])
            self.stats.shard_runs += 1
        else:
            logits = got.logits if ev.local_logits is None else with_local(got.logits, ev.local_logits)
            decision, edge_feature = Decision(logits, entropy_exit(logits, self.thresholds["edge"])), got.edge_feature
        return self._edge_outcome(ev, got.fused, got.devices, decision, edge_feature, nodes=got.nodes,
                                  degraded=not got.complete)

    def _answer(self, ev: Event, logits: np.ndarray, tier: str, *, devices: list[str] | None = None,
                degraded: bool = False, nodes: list[str] | None = None) -> list[Action]:
        result = make_result(logits, event=ev.event, exit=tier, classes=self.manifest.classes,
                             devices=devices or ev.devices, captured=ev.captured, model=self.manifest.model_id,
                             now=self.clock.time(), degraded=degraded, nodes=nodes)
        self.stats.exits[tier] += 1
        self.latency[tier].add(result.latency_ms)
        self.assembler.finish(ev.event)
        return [Answer(self.cell, result)]
