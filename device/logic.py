"""The device agent as a plain object: a capture, a request or a result in, frames out.

The device shard turns a capture into class scores (published at once) and a feature (kept a
while for the gateway's request, or sent with the scores under the ``eager`` policy); the
``raw`` policy sends the sample itself to the cloud-only baseline. No MQTT, no threads: the
service in device/agent.py owns the capture loop and maps the returned actions to topics.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from fogsplit.core.actions import Action, Send, refusing
from fogsplit.core.clock import Clock
from fogsplit.core.commands import parse_thresholds
from fogsplit.core.codecs import encode_tensor
from fogsplit.core.frames import FEATURE, GONE, RAW, SCORES, decode_frame, encode_events_frame, encode_late_frame, \
    encode_lost_frame, encode_slot_frame, unwrap_slot
from fogsplit.core.manifest import Manifest, expect_frames, raw_codec
from fogsplit.core.metrics import Window
from fogsplit.core.results import parse_result
from fogsplit.core.runner import ShardRunner
from fogsplit.core.settings import DeviceSettings
from fogsplit.core.transport import Message

from fogsplit.device.caching import DeviceCache
from fogsplit.device.sources import Capture
from fogsplit.device.spool import Spool

log = logging.getLogger(__name__)


def run_device_shard(runner: ShardRunner, sample: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One sample through the device shard: (exit logits [classes], feature)."""
    out = runner.run(x=np.asarray(sample, dtype=np.float32)[None])
    return out["scores"][0], out["feature"][0]


class FeatureStore:
    """Features kept for the gateway's request. Bounds: ``max_items`` (the oldest goes first) and
    ``ttl_s``; a request for a feature no longer held is answered with a ``gone`` notice."""

    def __init__(self, ttl_s: float, max_items: int) -> None:
        self.ttl_s = ttl_s
        self.max_items = max_items
        self._items: OrderedDict[int, tuple[float, np.ndarray]] = OrderedDict()
        self.latest = 0
        self.evicted = 0

    def put(self, event: int, feature: np.ndarray, now: float) -> None:
        self._items[event] = (now, feature)
        self.latest = max(self.latest, event)
        self.evict(now)

    def get(self, event: int, now: float) -> np.ndarray | None:
        self.evict(now)
        item = self._items.get(event)
        return None if item is None else item[1]

    def evict(self, now: float) -> None:
        while self._items:
            stored, _ = next(iter(self._items.values()))
            if len(self._items) <= self.max_items and now - stored <= self.ttl_s:
                break
            self._items.popitem(last=False)
            self.evicted += 1

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class DeviceStats:
    """The snapshot published on ``.../device/{dev}/stats`` (fields: docs/monitoring.md)."""

    device: str
    cell: str
    model: str
    policy: str
    time: float = 0.0
    processed: int = 0
    dropped_captures: int = 0     # latest-wins: a capture replaced before the shard could take it
    skipped_slots: int = 0        # the source fell behind its schedule and skipped ahead
    features_held: int = 0
    features_evicted: int = 0
    requests: int = 0
    features_sent: int = 0
    gone: int = 0
    refused: int = 0
    inbox_dropped: int = 0
    spool: dict = field(default_factory=dict)   # held, bytes, acked, replayed, dropped_full, expired
    keep: int = 1                 # a busy gateway asked for 1 event in ``keep`` live (docs/reliability.md)
    held_back: int = 0            # events spooled but not published live, as a busy gateway asked
    shard_ms: dict[str, float | None] = field(default_factory=dict)   # p50, p99 over the newest runs
    rss_mb: float | None = None
    cpu_s: float | None = None            # process CPU seconds so far
    cpu_percent: float | None = None      # of one core, since the last snapshot
    transport: dict | None = None


REPLAY_BATCH = 64     # events replayed per offer tick: a reconnect drains the spool without a burst
KEEP_FOR_S = 2.0      # a busy gateway's ``keep`` lapses unless an ack renews it (acks come every 50 ms)


class DeviceLogic:
    def __init__(self, manifest: Manifest, runner: ShardRunner | None, *, cell: str, device: str,
                 settings: DeviceSettings, clock: Clock, spool: Spool | None = None) -> None:
        if settings.policy != "raw" and runner is None:
            raise ValueError(f"policy {settings.policy!r} runs the device shard: give its runner")
        self.manifest = manifest
        self.sensor = manifest.sensor(device)
        self.cell, self.device, self.settings, self.clock = cell, device, settings, clock
        self.name = f"{cell}/{device}"
        self.runner = runner
        self.codecs = manifest.codecs
        self.expect = expect_frames(manifest)
        self.store = FeatureStore(settings.feature_ttl_s, settings.keep_features)
        cache = settings.cache
        self.cache = DeviceCache(manifest, cache) if cache is not None and cache.enabled and settings.policy != "raw" \
            else None
        self.stats = DeviceStats(device=device, cell=cell, model=manifest.model_id, policy=settings.policy)
        self.shard_window = Window()
        self.spool = spool if settings.delivery == "reliable" and settings.policy != "raw" else None
        self.keep, self.keep_until = 1, 0.0

    def _send(self, kind: str, payload: bytes, events: list[int]) -> Send:
        return Send(self.cell, self.device, kind, payload, tuple(events))

    def on_capture(self, capture: Capture) -> list[Action]:
        self.stats.processed += 1
        model, event = self.manifest.model_id, capture.event
        if self.settings.policy == "raw":
            frame = encode_slot_frame(RAW, model=model, event=event, tensor=np.asarray(capture.sample),
                                      codec=raw_codec(self.sensor))
            return [self._send("raw", frame, [event])]
        started = self.clock.monotonic()
        scores, feature = run_device_shard(self.runner, capture.sample)
        now = self.clock.monotonic()
        self.shard_window.add((now - started) * 1000.0)
        eager = self.settings.policy == "eager"
        vote = self.cache.vote(feature, scores, now) if self.cache is not None else None
        frame = encode_slot_frame(SCORES, model=model, event=event, tensor=scores, codec=self.codecs["scores"],
                                  feature=feature if eager else None, feature_codec=self.codecs["feature"],
                                  vote=vote)
        held_back = self._holds_back(event)
        if not eager and not held_back:
            self.store.put(event, feature, now)
        if self.spool is not None:
            dropped = self.spool.put(event, capture.captured, model, encode_tensor(scores, self.codecs["scores"]),
                                     encode_tensor(feature, self.codecs["feature"]), vote, self.clock.time())
            if dropped:
                log.warning("%s: spool full (%d bytes): dropped the frames of the %d oldest events (first %d); "
                            "lost notices go in their place", self.name, self.spool.max_bytes, len(dropped),
                            dropped[0])
        if held_back:
            self.stats.held_back += 1
            return []
        return [self._send("scores", frame, [event])]

    def _holds_back(self, event: int) -> bool:
        """A busy gateway asked for the events ``e % keep == 0`` only (the same on every device):
        the others stay in the spool, replayed once it has caught up. Only with a spool: a lean
        device publishes everything and the gateway sheds what it cannot take."""
        if self.keep > 1 and self.clock.time() >= self.keep_until:
            self.keep = 1
            log.info("%s: no busy ack from the gateway for %.0fs: publishing every event live again", self.name,
                     KEEP_FOR_S)
        return self.spool is not None and self.keep > 1 and event % self.keep != 0

    @refusing
    def on_ack(self, msg: Message) -> list[Action]:
        """The gateway answered these events for good: they leave the spool."""
        frame = decode_frame(msg.payload, "ack", self.expect, topic=msg.topic)
        if self.spool is not None:
            now = self.clock.time()
            self.spool.ack(frame.events, now, busy=frame.busy)
            keep = frame.keep if frame.busy else 1
            if (keep > 1) != (self.keep > 1):        # a line when thinning starts and when it ends
                log.info("%s: the gateway %s", self.name, f"is behind: publishing 1 event in {keep} live, spooling "
                         "the others" if keep > 1 else "caught up: publishing every event live")
            self.keep, self.keep_until = keep, now + KEEP_FOR_S
        return []

    def replay(self) -> list[Action]:
        """Replay what the spool holds past its re-offer time, as late frames in capture order;
        drop what is older than the spool's age bound."""
        if self.spool is None:
            return []
        now = self.clock.time()
        expired = self.spool.expire(now)
        if expired:
            log.warning("%s: %d events not acked within %.0fs dropped from the spool (first %d); lost notices "
                        "go in their place", self.name, len(expired), self.spool.max_age_s, expired[0])
        return [self._send("late", encode_lost_frame(model=h.model, event=h.event, captured=h.captured,
                                                     reason=h.reason) if h.reason is not None else
                           encode_late_frame(model=h.model, event=h.event, captured=h.captured, scores=h.scores,
                                             feature=h.feature, vote=h.vote), [h.event])
                for h in self.spool.due(now, REPLAY_BATCH)]

    @refusing
    def on_request(self, msg: Message) -> list[Action]:
        frame = decode_frame(msg.payload, "request", self.expect, topic=msg.topic)
        if self.device not in frame.devices:
            return []
        self.stats.requests += 1
        now = self.clock.monotonic()
        actions: list[Action] = []
        gone = []
        for slot in frame.events:
            event = unwrap_slot(slot, self.store.latest)
            feature = self.store.get(event, now)
            if feature is None:
                gone.append(event)
                continue
            payload = encode_slot_frame(FEATURE, model=self.manifest.model_id, event=event, tensor=feature,
                                        codec=self.codecs["feature"])
            actions.append(self._send("feature", payload, [event]))
            self.stats.features_sent += 1
        if gone:
            self.stats.gone += len(gone)
            log.info("%s: %d requested features already dropped (first event %d)", self.name, len(gone), gone[0])
            actions.append(self._send("feature", encode_events_frame(GONE, model=self.manifest.model_id, events=gone),
                                      gone))
        return actions

    @refusing
    def on_result(self, msg: Message) -> list[Action]:
        """The cell's answer to an event whose feature is still held here: teach the cache."""
        if self.cache is None:
            return []
        result = parse_result(msg.payload, msg.topic)
        now = self.clock.monotonic()
        held = self.store.get(result.event, now)
        if held is not None:
            self.cache.learn(held, result.label, result.exit, result.model, now)
        return []

    @refusing
    def on_command(self, msg: Message) -> list[Action]:
        """``device_cache`` of a thresholds command sets this device's cache threshold; the other
        keys are the gateway's."""
        values = parse_thresholds(msg.payload, msg.topic)
        if "device_cache" in values and self.cache is not None:
            self.cache.cache.set_threshold(values["device_cache"])
            log.info("%s: cache threshold now %s", self.name, self.cache.cache.threshold)
        return []

    def snapshot(self) -> DeviceStats:
        """The counters as they are now; the service adds what only it knows (process, inbox)."""
        spool = asdict(self.spool.stats) if self.spool is not None else {}
        return replace(self.stats, time=round(self.clock.time(), 3), keep=self.keep, features_held=len(self.store),
                       features_evicted=self.store.evicted, shard_ms=self.shard_window.percentiles(50, 99),
                       spool=spool)
