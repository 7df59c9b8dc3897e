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
  -> Forward to the cloud; its answer comes back here  -> Answer (cloud)
     (no answer by the cloud deadline: forward again, ``cloud_tries`` in all, then
     Answer (edge, degraded))
A request nobody answers in time answers from the local exit, marked degraded.

Exactly one answer per event (docs/reliability.md): every answer is journaled before it is
published, and a frame or a cloud answer for an event the journal holds is not answered
again. In the reliable delivery mode every answered event is acked to the devices (batched:
``take_acks``), which hold it in their spools until then; a frame replayed from a spool (a
``late`` frame: full event id, capture time, scores and feature) opens its event again if it
was never answered, and its answer says how late it came.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np

from fogsplit.core.actions import Action, Answer, Forward, RequestFeatures, Send, refusing
from fogsplit.core.assembly import Assembler, Event
from fogsplit.core.clock import Clock
from fogsplit.core.commands import parse_thresholds
from fogsplit.core.errors import FrameError
from fogsplit.core.exits import entropy_exit
from fogsplit.core.frames import GONE, LOST, MAX_ACKS, REQUEST, decode_frame, encode_ack_frame, encode_events_frame, \
    encode_forward_frame, to_slot
from fogsplit.core.fusion import fuse, with_local
from fogsplit.core.manifest import Manifest, expect_frames
from fogsplit.core.metrics import Rate, Throttled, Window, ages, ratio
from fogsplit.core.results import EXIT_TIERS, Result, make_result, parse_result
from fogsplit.core.roster import Roster, decode_device_frame, parse_status
from fogsplit.core.runner import ShardRunner
from fogsplit.core.settings import GatewaySettings
from fogsplit.core.topics import device_of
from fogsplit.core.transport import Message

from fogsplit.gateway.admission import Admission
from fogsplit.gateway.caching import GatewayCache, vote_logits
from fogsplit.gateway.fog import FogGather
from fogsplit.gateway.journal import Journal
from fogsplit.gateway.stages import Decision, edge_stage, local_stage

MEMORY_JOURNAL_ROWS = 65_536   # a journal without a file keeps at most this many answers
FINISHED_IN_MEMORY = 8192      # answered ids the assembler remembers (the journal has them all)

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
    forwarded: int = 0                        # events handed to the cloud (each answered as "cloud" or degraded)
    reforwarded: int = 0                      # forwards sent again: no answer by the cloud deadline
    cloud_timeouts: int = 0                   # events answered degraded after cloud_tries forwards
    late: int = 0                             # events opened by a frame replayed from a device's spool
    reacked: int = 0                          # frames of events already answered: acked again, not answered
    duplicate_answers: int = 0                # cloud answers to events already answered (a re-forward's)
    acks_sent: int = 0
    shed: int = 0                             # frames shed: they waited past shed_after_ms in the inbox, or came
                                              # shed_after_ms behind the stream (overload; the spools replay them)
    admission: dict = field(default_factory=dict)   # overload control (gateway/admission.py): keep, busy_s, ...
    lost_notices: int = 0                     # events a device's spool dropped, answered as "lost"
    journal: dict = field(default_factory=dict)
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
                 settings: GatewaySettings, clock: Clock, journal: Journal | None = None) -> None:
        self.manifest = m = manifest
        self.runner = runner
        self.cell, self.gateway, self.settings, self.clock = cell, gateway, settings, clock
        self.name = f"{cell}/{gateway}"
        self.sensors = m.sensor_names
        overrides = {"local": settings.local_threshold, "edge": settings.edge_threshold}
        self.thresholds = {**m.thresholds, **{k: v for k, v in overrides.items() if v is not None}}
        self.expect = expect_frames(m)
        self.roster = Roster(m.model_id, default_rate=settings.capture_rate)
        # The journal knows every answered event; the assembler's memory of them is a fast path,
        # kept small so that the gateway's memory is flat from its first minutes (bench soak).
        self.assembler = Assembler(self.sensors, settings.deadline_ms / 1000.0, max_open=settings.max_open,
                                   remember=FINISHED_IN_MEMORY)
        self.cache = GatewayCache(m, settings.cache, hold_s=settings.hold_s, max_held=settings.max_held) \
            if settings.cache is not None and settings.cache.enabled else None
        self.stats = GatewayStats(gateway=gateway, cell=cell, model=m.model_id)
        self.started = clock.monotonic()
        self.started_wall = clock.time()
        self.latency = {tier: Window() for tier in EXIT_TIERS}
        self.last_seen: dict[str, float] = {}
        self.rate = Rate(0, self.started)
        self.fog = FogGather(m) if m.fog is not None else None
        self.owns: Callable[[float], bool] = lambda captured: True   # a rollout narrows it (docs/rollout.md)
        self.journal = journal if journal is not None else Journal(
            None, window_s=settings.replay_window_s, max_rows=min(settings.journal_max, MEMORY_JOURNAL_ROWS))
        self.reliable = settings.delivery == "reliable"
        self._acks: list[int] = []
        self.journal_latest: int | None = None     # the last event answered (a busy ack names it)
        # A live frame of a new event this far behind the stream (its lag, gateway/admission.py),
        # or this long after its capture whatever the device's clock, is shed: the spools replay it.
        self.shed_s = settings.shed_after_ms / 1000.0
        self.stale_s = self.shed_s + settings.max_skew_s
        self.admission = Admission(target_s=self.shed_s / 4, now=clock.monotonic())
        self._thinning = (clock.monotonic(), 0)    # since when the devices thin their stream, shed then
        self.throttled = Throttled(log, clock.monotonic)

    # -- inputs ---------------------------------------------------------------------------
    @refusing
    def on_scores(self, msg: Message) -> list[Action]:
        got = self._device_frame(msg)
        return self._take_part(got.event, got.device, got.captured, got.frame.tensor, got.frame.feature,
                               got.frame.vote, late=False)

    @refusing
    def on_late(self, msg: Message) -> list[Action]:
        """A frame replayed from a device's spool: full id and capture time, scores and feature."""
        device = device_of(msg.topic)
        if device not in self.sensors:
            raise FrameError("device", f"unknown device {device!r}: the model has {list(self.sensors)}",
                             device=device, topic=msg.topic)
        frame = decode_frame(msg.payload, "late", self.expect, topic=msg.topic, device=device)
        self._check_time(frame.captured, device, frame.event, msg.topic, notice=frame.kind == LOST)
        self._heard(device)
        if frame.kind == LOST:
            return self._lost(frame.event, frame.captured, device, frame.reason)
        return self._take_part(frame.event, device, frame.captured, frame.tensor, frame.feature, frame.vote,
                               late=True)

    def _lost(self, event: int, captured: float, device: str, reason: str) -> list[Action]:
        """A device dropped an event's frames: unless the event is answered, or open (another
        device's frames will answer it), the application gets an explicit lost result."""
        if self.assembler.open.get(event) is not None:
            return []
        if self._answered(event):
            self._ack(event)
            return []
        now = self.clock.time()
        self.stats.lost_notices += 1
        self.throttled.warning("lost", "%s: event %d is lost: %s %s", self.name, event, device, reason)
        result = Result(event=event, label=-1, cls="", confidence=0.0, exit="lost", devices=[device],
                        captured=captured, latency_ms=round((now - captured) * 1000.0, 3), model=self.manifest.model_id,
                        degraded=True, late=True, late_s=round(max(0.0, now - captured), 3),
                        reason=f"{device}: {reason}")
        return self._publish(result, None)

    def _take_part(self, event: int, device: str, captured: float, scores: np.ndarray,
                   feature: np.ndarray | None, vote: int | None, *, late: bool) -> list[Action]:
        opened = self.assembler.open.get(event)
        if opened is None and self._answered(event, journal=late or captured < self.started_wall):
            self.stats.reacked += 1
            self._ack(event)
            return []
        if not late:
            age = self.clock.time() - captured
            lag = self.admission.lag(device, age, self.clock.monotonic())
            if opened is None and (lag > self.shed_s or age > self.stale_s):
                self.stats.shed += 1      # behind the stream (the broker or the socket held it): the spool replays it
                return []
            self.admission.took()
        ev = self.assembler.add(event, device, scores, captured, self.clock.monotonic())
        opened = self.assembler.open.get(event)
        if opened is None or opened.stage != "scores":
            return []
        if late and opened.late_s is None and len(opened.parts) == 1:
            opened.late_s = max(0.0, self.clock.time() - captured)
            self.stats.late += 1
        if feature is not None:
            opened.features[device] = feature
        if self.cache is not None:
            opened.votes[device] = vote
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
        was_waited_for = device in self.assembler.online
        if status.state == "online":
            self.assembler.online.add(device)
        else:
            self.assembler.online.discard(device)
        if was_waited_for != (status.state == "online"):      # a repeated status is not news
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
    def on_cloud_result(self, msg: Message) -> list[Action]:
        """A cloud worker's answer to an event this gateway forwarded and still waits on. Any
        other (a re-forward answered twice, an answer to the gateway's previous run, a forged
        one) is dropped and counted: the event is, or will be, answered by its own path."""
        result = parse_result(msg.payload, msg.topic)
        now = self.clock.monotonic()
        if self.cache is not None:
            self.cache.on_result(result.event, result.label, result.exit, result.model, now)
        ev = self.assembler.open.get(result.event)
        if ev is None or ev.stage != "cloud" or result.model != self.manifest.model_id:
            self.stats.duplicate_answers += 1
            return []
        answer = replace(result, exit="cloud", devices=list(ev.answered_by), captured=ev.captured,
                         latency_ms=round((self.clock.time() - ev.captured) * 1000.0, 3), degraded=False,
                         nodes=ev.nodes, late=ev.late_s is not None, late_s=ev.late_s, reason=None)
        return self._publish(answer, ev)

    def next_deadline(self) -> float | None:
        return self.assembler.next_deadline()

    def on_timer(self, now: float) -> list[Action]:
        actions: list[Action] = []
        for ev in self.assembler.expired(now):
            actions += self._decide_local(ev) if ev.stage == "scores" else \
                self._fog_decide(ev) if ev.stage == "fog" else \
                self._cloud_overdue(ev) if ev.stage == "cloud" else self._run_edge(ev)
        return actions

    def take_acks(self, *, shed: int = 0) -> list[Action]:
        """The acks gathered since the last call, as frames for the cell's ack topic. ``shed``:
        frames the service shed since the last call. A busy gateway (it shed frames, or is
        behind the stream) asks the devices to hold their replays and to publish live only 1
        event in ``keep`` (gateway/admission.py); a busy ack goes out even with nothing to ack."""
        acks, self._acks = self._acks, []
        self.admission.shed(shed)        # the frames this logic shed for their lag count as lagging frames
        was = self.admission.keep
        offered = sum(self.roster.devices[d].rate or 0.0 for d in self.assembler.expected() if d in self.roster.devices)
        keep = self.admission.update(self.clock.monotonic(), offered or None)
        busy = self.admission.busy
        if keep != was and 1 in (keep, was):
            self._log_thinning(was, keep)
        if busy and not acks and self.reliable:
            acks = [self.journal_latest] if self.journal_latest is not None else []
        out: list[Action] = []
        for start in range(0, len(acks), MAX_ACKS):
            chunk = acks[start:start + MAX_ACKS]
            out.append(Send(self.cell, "", "ack", encode_ack_frame(model=self.manifest.model_id, events=chunk,
                                                                   busy=busy, keep=keep), tuple(chunk)))
        self.stats.acks_sent += len(acks)
        return out

    def _log_thinning(self, was: int, keep: int) -> None:
        """One line when the gateway starts asking the devices to thin their stream, one when it stops."""
        now = self.clock.monotonic()
        if was == 1:
            self._thinning = (now, self.stats.shed)
            log.warning("%s: behind the stream (lag up to %.0f ms): the devices publish 1 event in %d live, the "
                        "others are replayed late from their spools", self.name, self.admission.stats.lag_ms, keep)
        else:
            since, shed = self._thinning
            log.info("%s: caught up after %.1fs of thinning (%d frames shed meanwhile): every event live again",
                     self.name, now - since, self.stats.shed - shed)

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
            admission=self.admission.snapshot(),
            fog=self.fog.snapshot() if self.fog is not None else {},
            journal={"rows": self.journal.rows, "pruned": self.journal.pruned, "file": str(self.journal.path)
                     if self.journal.path is not None else None})

    # -- stages ---------------------------------------------------------------------------
    def _device_frame(self, msg: Message):
        got = decode_device_frame(msg.payload, msg.topic, self.expect, self.roster, self.clock.time())
        if got.captured is not None:
            self._check_time(got.captured, got.device, got.event, msg.topic)
        self._heard(got.device)
        return got

    def _check_time(self, captured: float, device: str, event: int, topic: str, *, notice: bool = False) -> None:
        """Refuse a capture time from the future (beyond the clock-skew bound), from another
        model's side of a switch, or (but for a lost notice) older than the replay window."""
        now = self.clock.time()
        if captured > now + self.settings.max_skew_s:
            raise FrameError("time", f"captured {captured - now:.1f}s in the future (clocks may differ by "
                                     f"max_skew_s = {self.settings.max_skew_s}s)", device=device, event=event,
                             topic=topic)
        if captured < now - self.settings.replay_window_s and not notice:
            raise FrameError("time", f"captured {now - captured:.0f}s ago, beyond the replay window "
                                     f"({self.settings.replay_window_s:.0f}s)", device=device, event=event,
                             topic=topic)
        if not self.owns(captured):
            raise FrameError("model", f"event {event} belongs to another model than {self.manifest.model_id} "
                                      "(captured on the other side of a switch, docs/rollout.md)",
                             device=device, event=event, topic=topic)

    def _heard(self, device: str) -> None:
        """A valid frame is proof of life."""
        self.last_seen[device] = self.clock.monotonic()
        if self.roster.saw_frame(device):
            self.stats.rejoined += 1
            self.assembler.online.add(device)
            log.info("%s: device %s sent a frame while marked offline: online again", self.name, device)

    def _answered(self, event: int, *, journal: bool = True) -> bool:
        """Answered by this logic (in memory), or, with ``journal``, by any run of this gateway.
        A live frame of an event captured since this logic started needs no journal lookup: a
        query a frame on the hot path, for events only a previous run could have answered."""
        return self.assembler.is_finished(event) or (journal and self.journal.has(event))

    def _ack(self, event: int) -> None:
        if self.reliable:
            self._acks.append(event)

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
            self.throttled.warning("features", "%s: event %d got no features in time; answering from the local exit",
                                   self.name, ev.event)
            self.stats.degraded += 1
            return self._answer(ev, ev.local_logits, "local", degraded=True, reason="no feature came in time")
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
        self.stats.forwarded += 1
        ev.stage, ev.forward, ev.tries = "cloud", payload, 1
        ev.edge_logits, ev.answered_by, ev.nodes = decision.logits, devices, nodes
        ev.deadline = now + self.settings.cloud_deadline_ms / 1000.0
        return [Forward(self.cell, ev.event, payload)]

    def _cloud_overdue(self, ev: Event) -> list[Action]:
        """No cloud answer by the deadline: forward again (the deadline doubling), or after
        ``cloud_tries`` forwards answer from the edge exit, degraded."""
        if ev.tries < self.settings.cloud_tries:
            ev.deadline = self.clock.monotonic() + self.settings.cloud_deadline_ms / 1000.0 * 2 ** ev.tries
            ev.tries += 1
            self.stats.reforwarded += 1
            return [Forward(self.cell, ev.event, ev.forward)]
        self.stats.cloud_timeouts += 1
        self.stats.degraded += 1
        self.throttled.warning("cloud", "%s: event %d: no cloud answer after %d forwards; answering from the edge "
                               "exit", self.name, ev.event, ev.tries)
        return self._answer(ev, ev.edge_logits, "edge", devices=ev.answered_by, nodes=ev.nodes, degraded=True,
                            reason=f"the cloud did not answer {ev.tries} forwards")

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
            self.throttled.warning("fog", "%s: event %d: fog nodes %s answered, %s did not", self.name, ev.event,
                                   got.nodes, sorted(set(self.fog.nodes) - set(got.nodes)))
        if got.logits is None:
            decision, edge_feature = edge_stage(self.runner, got.fused, self.thresholds["edge"])
            self.stats.shard_runs += 1
        else:
            logits = got.logits if ev.local_logits is None else with_local(got.logits, ev.local_logits)
            decision, edge_feature = Decision(logits, entropy_exit(logits, self.thresholds["edge"])), got.edge_feature
        return self._edge_outcome(ev, got.fused, got.devices, decision, edge_feature, nodes=got.nodes,
                                  degraded=not got.complete)

    def _answer(self, ev: Event, logits: np.ndarray, tier: str, *, devices: list[str] | None = None,
                degraded: bool = False, nodes: list[str] | None = None, reason: str | None = None) -> list[Action]:
        result = make_result(logits, event=ev.event, exit=tier, classes=self.manifest.classes,
                             devices=devices or ev.devices, captured=ev.captured, model=self.manifest.model_id,
                             now=self.clock.time(), degraded=degraded, nodes=nodes, late_s=ev.late_s, reason=reason)
        return self._publish(result, ev)

    def _publish(self, result: Result, ev: Event | None) -> list[Action]:
        """Journal the event's one result, ack it to the devices, and publish it."""
        if not self.journal.record(result, result.to_json()):
            self.stats.duplicate_answers += 1
            self.assembler.finish(result.event)
            return []
        if result.exit in self.latency:
            self.stats.exits[result.exit] += 1
            self.latency[result.exit].add(result.latency_ms)
        self.assembler.finish(result.event)
        self._ack(result.event)
        self.journal_latest = result.event
        return [Answer(self.cell, result)]
