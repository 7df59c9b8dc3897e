"""The device agent: sensor -> device shard -> scores now, feature when the gateway asks.

Runs on a Pi-class board with onnxruntime, numpy, paho-mqtt and msgpack only.
"""
from __future__ import annotations

import time
from collections import OrderedDict

import numpy as np

from fogsplit.core.frames import FEATURE, GONE, RAW, SCORES, decode_frame, encode_events_frame, encode_slot_frame, \
    unwrap_slot
from fogsplit.core.cache import CacheSettings
from fogsplit.core.commands import parse_thresholds
from fogsplit.core.manifest import Bundle, expect_frames, raw_codec
from fogsplit.core.transport import Message, Transport
from fogsplit.core.results import parse_result
from fogsplit.core.runner import ShardRunner
from fogsplit.core.service import Service, status_payload
from fogsplit.core.topics import Topics

from fogsplit.device.caching import DeviceCache
from fogsplit.device.sources import Capture, Source

POLICIES = ("request", "eager", "raw")


def run_device_shard(runner: ShardRunner, sample: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One sample through the device shard: (exit logits [classes], feature)."""
    out = runner.run(x=np.asarray(sample, dtype=np.float32)[None])
    return out["scores"][0], out["feature"][0]


class FeatureStore:
    """Features kept for the gateway's request, bounded in time and count."""

    def __init__(self, ttl_s: float, max_items: int) -> None:
        self.ttl_s = ttl_s
        self.max_items = max_items
        self._items: OrderedDict[int, tuple[float, np.ndarray]] = OrderedDict()
        self.latest = 0

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
            event, (stored, _) = next(iter(self._items.items()))
            if len(self._items) <= self.max_items and now - stored <= self.ttl_s:
                break
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


class DeviceAgent(Service):
    def __init__(self, transport: Transport, topics: Topics, bundle: Bundle, *, cell: str, device: str,
                 source: Source, policy: str = "request", feature_ttl_s: float = 10.0,
                 keep_features: int = 1024, threads: int = 1, cache: CacheSettings | None = None) -> None:
        super().__init__(transport, topics, f"{cell}/{device}")
        if policy not in POLICIES:
            raise ValueError(f"policy {policy!r} is not one of {POLICIES}")
        self.manifest = bundle.manifest
        self.sensor = self.manifest.sensor(device)
        self.cell, self.device, self.policy, self.source = cell, device, policy, source
        self.codecs = self.manifest.codecs
        self.runner = None if policy == "raw" else ShardRunner(
            bundle.shard_path(self.manifest.device_shard(device)), threads=threads)
        self.rate = float(source.rate)
        self.store = FeatureStore(feature_ttl_s, keep_features)
        self.expect = expect_frames(self.manifest)
        self.captured = 0
        self.cache = DeviceCache(self.manifest, cache) if cache is not None and cache.enabled and policy != "raw" \
            else None
        self.route(topics.request(cell), self.on_request)
        if self.cache is not None:
            self.route(topics.result(cell), self.on_result)
            self.route(topics.cmd(cell, "thresholds"), self.on_command)
        self.spawn("capture", self._capture_loop)

    def start(self) -> "DeviceAgent":
        self.transport.publish(self.topics.device_status(self.cell, self.device),
                               status_payload("online", model=self.manifest.model_id, policy=self.policy,
                                              rate=self.rate), retain=True)
        self.log.info("%s: online, model %s, policy %s, %g captures/s", self.name, self.manifest.model_id,
                      self.policy, self.rate)
        super().start()
        return self

    def _capture_loop(self) -> None:
        for capture in self.source.captures():
            self.submit(self.on_capture, capture)

    def on_capture(self, capture: Capture) -> None:
        self.captured += 1
        model, event = self.manifest.model_id, capture.event
        if self.policy == "raw":
            frame = encode_slot_frame(RAW, model=model, event=event, tensor=np.asarray(capture.sample),
                                      codec=raw_codec(self.sensor))
            self.transport.publish(self.topics.raw(self.cell, self.device), frame, qos=0, events=[event])
            return
        scores, feature = run_device_shard(self.runner, capture.sample)
        eager = self.policy == "eager"
        vote = self.cache.vote(feature, scores, time.monotonic()) if self.cache is not None else None
        frame = encode_slot_frame(SCORES, model=model, event=event, tensor=scores, codec=self.codecs["scores"],
                                  feature=feature if eager else None, feature_codec=self.codecs["feature"],
                                  vote=vote)
        self.transport.publish(self.topics.scores(self.cell, self.device), frame, qos=0, events=[event])
        if not eager:
            self.store.put(event, feature, time.monotonic())

    def on_result(self, msg: Message) -> None:
        """The cell's answer to an event whose feature is still held here: teach the cache."""
        result = parse_result(msg.payload, msg.topic)
        now = time.monotonic()
        held = self.store.get(result.event, now)
        if held is not None:
            self.cache.learn(held, result.label, result.exit, result.model, now)

    def on_command(self, msg: Message) -> None:
        """``device_cache`` of a thresholds command sets this device's cache threshold; the
        other keys are the gateway's."""
        values = parse_thresholds(msg.payload, msg.topic)
        if "device_cache" in values:
            self.cache.cache.set_threshold(values["device_cache"])
            self.log.info("%s: cache threshold now %s", self.name, self.cache.cache.threshold)

    def on_request(self, msg: Message) -> None:
        frame = decode_frame(msg.payload, "request", self.expect, topic=msg.topic)
        if self.device not in frame.devices:
            return
        gone = []
        now = time.monotonic()
        for slot in frame.events:
            event = unwrap_slot(slot, self.store.latest)
            feature = self.store.get(event, now)
            if feature is None:
                gone.append(event)
            else:
                payload = encode_slot_frame(FEATURE, model=self.manifest.model_id, event=event, tensor=feature,
                                            codec=self.codecs["feature"])
                self.transport.publish(self.topics.feature(self.cell, self.device), payload, qos=0, events=[event])
        if gone:
            self.log.info("%s: %d requested features already dropped (first event %d)", self.name, len(gone), gone[0])
            payload = encode_events_frame(GONE, model=self.manifest.model_id, events=gone)
            self.transport.publish(self.topics.feature(self.cell, self.device), payload, qos=0, events=gone)

    def on_stop(self) -> None:
        stop = getattr(self.source, "stop", None)
        if stop:
            stop()
        self.transport.publish(self.topics.device_status(self.cell, self.device), status_payload("offline"),
                               retain=True)
        self.log.info("%s: offline after %d captures", self.name, self.captured)
