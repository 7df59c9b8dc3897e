"""Real frames and mutations of them: the input side of ``fogsplit bench fuzz`` and tests/test_fuzz.py.

Seeds are real payloads, each with the topic it travels on: built with the encoders of
core/frames.py from a bundle's own shards (:func:`bundle_seeds`: real scores and features
from the device shards, a real edge feature from the gateway shard, statuses and commands as
the tiers write them, results from :func:`~fogsplit.core.results.make_result`), or captured
off a running stack (:func:`classify` names a captured topic's kind).

Two generators turn seeds into hostile frames, for every input topic (scores, feature,
request, forward, result, status, cmd; raw and the fog topics on request):

- :class:`Mutator`: a seeded ``random.Random`` mutator for throughput (some 20,000 frames/s on
  one core): bit flips, interesting bytes, truncation, extension, insertion, deletion,
  splicing, msgpack-structure mutations (wrong types, wrong lengths, huge ints, NaN and inf
  floats, nested containers, ext types, wrong tags, slots far in the future or past, event
  ids and capture times out of range, tensors of the wrong length or of NaN), JSON mutations
  (wrong types, missing and unknown keys, NaN, huge numbers, deep nesting, bad UTF-8), hand-made
  msgpack headers (containers that claim gigabytes, deep nesting), fully random bytes, and
  topics naming another device, an unknown one or another command.
- :func:`hypothesis_frames`: a Hypothesis strategy of the same frames, each field drawn right
  or wrong, for property tests and for the part of the benchmark that Hypothesis drives.

Nothing here talks to a broker: a frame is a :class:`Fuzzed` (kind, topic, payload, mutation).
"""
from __future__ import annotations

import json
import math
import random
import re
import struct
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import msgpack
import numpy as np

from fogsplit.core import frames
from fogsplit.core.codecs import CodecSpec, encode_tensor, payload_bytes
from fogsplit.core.frames import (FEATURE, FOG_ANSWER, FOG_SLICE, GONE, MAX_EVENT_ID, MAX_EVENTS_PER_REQUEST,
                                  MAX_FRAME_BYTES, RAW, REQUEST, SCORES, SLOT_MOD, encode_events_frame,
                                  encode_fog_frame, encode_forward_frame, encode_slot_frame, frame_tag, to_slot)
from fogsplit.core.topics import TOPICS, Topics

# Input kinds: the topic kinds a tier takes from the wire ("status" is a device's status), the
# seven of the data path and the control topics of reliable delivery (docs/reliability.md),
# which exist once core/topics.py names them. Raw and the fog topics are fuzzed on request.
INPUT_KINDS = ("scores", "feature", "request", "forward", "result", "status", "cmd",
               "late", "ack", "cloud_result", "replay", "gateway_status")
OPTIONAL_KINDS = ("raw", "fog_slice", "fog_answer", "fog_status")
ALL_KINDS = INPUT_KINDS + OPTIONAL_KINDS
TOPIC_KIND = {"status": "device_status"}          # our kind -> the kind of core/topics.py TOPICS
MSGPACK_KINDS = ("scores", "feature", "request", "forward", "raw", "fog_slice", "fog_answer", "late", "ack")
JSON_KINDS = ("result", "status", "cmd", "fog_status", "cloud_result", "replay", "gateway_status")
DEVICE_TOPIC_KINDS = ("scores", "feature", "status", "raw", "late")
NODE_TOPIC_KINDS = ("fog_slice", "fog_answer", "fog_status", "gateway_status")


@dataclass(frozen=True, slots=True)
class Seed:
    """A real payload and the topic it travels on; ``kind`` is one of :data:`ALL_KINDS`."""

    kind: str
    topic: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class Fuzzed:
    """A generated frame: its kind (the topic's), topic, payload and the mutation that made it."""

    kind: str
    topic: str
    payload: bytes
    mutation: str

    def describe(self) -> dict:
        return {"kind": self.kind, "topic": self.topic, "mutation": self.mutation, "bytes": len(self.payload),
                "hex": self.payload.hex()}


@dataclass(frozen=True)
class Context:
    """What the generators need to aim: the fleet's topics, the cell, the model and its sensors,
    the capture rate (to compute the slot of "now") and the encoded tensor sizes."""

    topics: Topics
    cell: str
    model: str
    sensors: tuple[str, ...]
    rate: float = 10.0
    classes: int = 2
    tensor_bytes: dict[str, int] = field(default_factory=dict)    # per kind: scores, feature, forward, raw
    fog_nodes: tuple[str, ...] = ()

    @property
    def tag(self) -> int:
        return frame_tag(self.model)

    def slot_now(self, now: float | None = None) -> int:
        return to_slot(round((time.time() if now is None else now) * self.rate))

    def topic(self, kind: str, *, device: str | None = None, setting: str = "thresholds",
              node: str | None = None) -> str:
        t, cell = self.topics, self.cell
        if kind == "scores":
            return t.scores(cell, device or self.sensors[0])
        if kind == "feature":
            return t.feature(cell, device or self.sensors[0])
        if kind == "raw":
            return t.raw(cell, device or self.sensors[0])
        if kind == "status":
            return t.device_status(cell, device or self.sensors[0])
        if kind == "request":
            return t.request(cell)
        if kind == "forward":
            return t.forward(cell)
        if kind == "result":
            return t.result(cell)
        if kind == "cmd":
            return t.cmd(cell, setting)
        if kind == "late":
            return t.topic("late", cell=cell, device=device or self.sensors[0])
        if kind in ("ack", "cloud_result", "replay"):
            return t.topic(kind, cell=cell)
        if kind == "gateway_status":
            return t.gateway_status(cell, node or "gw0")
        node = node or (self.fog_nodes[0] if self.fog_nodes else "node0")
        return {"fog_slice": t.fog_slice, "fog_answer": t.fog_answer, "fog_status": t.fog_status}[kind](cell, node)


def context_of(manifest, topics: Topics, cell: str, *, rate: float = 10.0) -> Context:
    """The :class:`Context` of a bundle's manifest."""
    codecs = manifest.codecs
    sizes = {"scores": payload_bytes(codecs["scores"], manifest.num_classes),
             "feature": payload_bytes(codecs["feature"], int(np.prod(manifest.feature_shape))),
             "forward": payload_bytes(codecs["forward"], int(np.prod(manifest.forward_shape))),
             "raw": int(np.prod(manifest.sensors[0].shape)) * (1 if manifest.sensors[0].dtype == "uint8" else 4)}
    nodes = tuple(n.name for n in manifest.fog.nodes) if manifest.fog is not None else ()
    return Context(topics, cell, manifest.model_id, tuple(manifest.sensor_names), rate, manifest.num_classes,
                   {k: v for k, v in sizes.items() if v is not None}, nodes)


# -- seeds ---------------------------------------------------------------------------------------

def _status(state: str, model: str, rate: float, policy: str = "request") -> bytes:
    return json.dumps({"state": state, "time": time.time(), "model": model, "policy": policy, "rate": rate}).encode()


def bundle_seeds(bundle, topics: Topics, cell: str, *, rate: float = 10.0, now: float | None = None,
                 events: int = 2, seed: int = 0, runners: dict | None = None) -> list[Seed]:
    """Real frames of every kind for ``bundle`` (a :class:`~fogsplit.core.manifest.Bundle`), made by
    its own shards on random samples, for events around ``now`` (default: the clock now).

    ``runners`` maps shard names to runners with ``run(**inputs)`` (default: onnxruntime on the
    bundle's files); a tier's seeds need only the shards of the tiers below it."""
    from fogsplit.core.fusion import fuse
    from fogsplit.core.manifest import raw_codec
    from fogsplit.core.results import make_result
    from fogsplit.core.runner import ShardRunner

    m = bundle.manifest
    ctx = context_of(m, topics, cell, rate=rate)
    rng = np.random.default_rng(seed)
    now = time.time() if now is None else now
    first = round(now * rate)
    runners = dict(runners or {})

    def runner(shard) -> object:
        if shard.name not in runners:
            runners[shard.name] = ShardRunner(bundle.shard_path(shard))
        return runners[shard.name]

    out: list[Seed] = []
    codecs = m.codecs
    per_event: list[dict[str, np.ndarray]] = []
    for i in range(events):
        event = first + i
        features: dict[str, np.ndarray] = {}
        for sensor in m.sensors:
            shape = tuple(sensor.shape)
            sample = rng.integers(0, 256, shape).astype(np.float32) if sensor.dtype == "uint8" else \
                rng.standard_normal(shape).astype(np.float32)
            got = runner(m.device_shard(sensor.name)).run(x=sample[None])
            scores, feature = got["scores"][0], got["feature"][0]
            features[sensor.name] = feature
            d = sensor.name
            if _has_topic("late") and hasattr(frames, "encode_late_frame"):
                enc_scores = encode_tensor(scores, codecs["scores"])
                enc_feature = encode_tensor(feature, codecs["feature"])
                out += [Seed("late", ctx.topic("late", device=d),
                             frames.encode_late_frame(model=m.model_id, event=event - 600, captured=(event - 600) / rate,
                                                      scores=enc_scores, feature=enc_feature)),
                        Seed("late", ctx.topic("late", device=d),
                             frames.encode_late_frame(model=m.model_id, event=event, captured=event / rate,
                                                      scores=enc_scores, feature=None, vote=0))]
            out += [
                Seed("scores", ctx.topic("scores", device=d),
                     encode_slot_frame(SCORES, model=m.model_id, event=event, tensor=scores, codec=codecs["scores"])),
                Seed("scores", ctx.topic("scores", device=d),
                     encode_slot_frame(SCORES, model=m.model_id, event=event, tensor=scores, codec=codecs["scores"],
                                       feature=feature, feature_codec=codecs["feature"])),
                Seed("scores", ctx.topic("scores", device=d),
                     encode_slot_frame(SCORES, model=m.model_id, event=event, tensor=scores, codec=codecs["scores"],
                                       vote=int(np.argmax(scores)))),
                Seed("feature", ctx.topic("feature", device=d),
                     encode_slot_frame(FEATURE, model=m.model_id, event=event, tensor=feature,
                                       codec=codecs["feature"])),
                Seed("feature", ctx.topic("feature", device=d),
                     encode_events_frame(GONE, model=m.model_id, events=[event, event - 1])),
                Seed("raw", ctx.topic("raw", device=d),
                     encode_slot_frame(RAW, model=m.model_id, event=event, tensor=sample, codec=raw_codec(sensor))),
            ]
        per_event.append(features)
        if _has_topic("ack") and hasattr(frames, "encode_ack_frame"):
            out.append(Seed("ack", ctx.topic("ack"), frames.encode_ack_frame(model=m.model_id, events=[event])))
            out.append(Seed("ack", ctx.topic("ack"), frames.encode_ack_frame(model=m.model_id,
                                                                             events=[event - 3, event - 1, event])))
        out.append(Seed("request", ctx.topic("request"),
                        encode_events_frame(REQUEST, model=m.model_id, events=[event], devices=ctx.sensors,
                                            sensors=ctx.sensors)))
        out.append(Seed("request", ctx.topic("request"),
                        encode_events_frame(REQUEST, model=m.model_id, events=[event, event - 1],
                                            devices=ctx.sensors[:1], sensors=ctx.sensors)))
    gateway = m.tier_shard("gateway")
    cloud = m.tier_shard("cloud")
    for i, features in enumerate(per_event):
        event = first + i
        fused = fuse(features, list(ctx.sensors), m.edge_fusion)
        edge = runner(gateway).run(fused=fused[None])
        edge_feature, edge_logits = edge["edge_feature"][0], edge["logits"][0]
        out.append(Seed("forward", ctx.topic("forward"),
                        encode_forward_frame(model=m.model_id, event=event, captured=event / rate,
                                             devices=ctx.sensors, sensors=ctx.sensors, tensor=edge_feature,
                                             codec=codecs["forward"])))
        logits = runner(cloud).run(edge_feature=edge_feature[None])["logits"][0]
        for exit_, lg in (("cloud", logits), ("edge", edge_logits), ("local", edge_logits)):
            result = make_result(lg, event=event, exit=exit_, classes=m.classes, devices=list(ctx.sensors),
                                 captured=event / rate, model=m.model_id, now=now + 0.05)
            out.append(Seed("result", ctx.topic("result"), result.to_json()))
            if exit_ == "cloud" and _has_topic("cloud_result"):
                out.append(Seed("cloud_result", ctx.topic("cloud_result"), result.to_json()))
        if m.fog is not None:
            for node in m.fog.nodes:
                width = len(node.channels)
                slice_ = fused[list(node.channels)] if fused.shape[0] > max(node.channels) else fused[:width]
                out.append(Seed("fog_slice", ctx.topic("fog_slice", node=node.name),
                                encode_fog_frame(FOG_SLICE, model=m.model_id, event=event, tensor=slice_,
                                                 codec=m.fog.slice_codec)))
                answer = np.zeros(tuple(m.shard(node.shard).outputs["feature"][1:]), np.float32)
                out.append(Seed("fog_answer", ctx.topic("fog_answer", node=node.name),
                                encode_fog_frame(FOG_ANSWER, model=m.model_id, event=event, tensor=answer,
                                                 codec=m.fog.answer_codec, logits=edge_logits)))
    for d in ctx.sensors:
        out.append(Seed("status", ctx.topic("status", device=d), _status("online", m.model_id, rate)))
        out.append(Seed("status", ctx.topic("status", device=d), _status("offline", m.model_id, rate)))
    out += command_seeds(ctx, m.thresholds)
    out += control_seeds(ctx, now)
    for node in ctx.fog_nodes:
        out.append(Seed("fog_status", ctx.topic("fog_status", node=node),
                        json.dumps({"state": "online", "time": now, "model": m.model_id}).encode()))
    return out


def command_seeds(ctx: Context, thresholds: dict[str, float]) -> list[Seed]:
    """Valid ``thresholds`` commands: the bundle's own values (so that a flood of them changes
    nothing), and each key alone."""
    base = {k: float(v) for k, v in thresholds.items() if k in ("local", "edge")}
    bodies = [base, {"device_cache": 0.3}, {"cache": 0.2}, {"local": base.get("local", 0.5)}]
    return [Seed("cmd", ctx.topic("cmd"), json.dumps(b).encode()) for b in bodies]


def control_seeds(ctx: Context, now: float) -> list[Seed]:
    """A replay request of an application and a gateway's status, where the topics exist."""
    out = []
    if _has_topic("replay"):
        for since in (now - 5.0, now - 3600.0, 0.0):
            out.append(Seed("replay", ctx.topic("replay"), json.dumps({"client": "app1", "since": since}).encode()))
    out.append(Seed("gateway_status", ctx.topic("gateway_status"),
                    json.dumps({"state": "online", "time": now, "model": ctx.model}).encode()))
    out.append(Seed("gateway_status", ctx.topic("gateway_status"),
                    json.dumps({"state": "offline", "time": now, "model": ctx.model}).encode()))
    return out


def _has_topic(kind: str) -> bool:
    return kind in TOPICS


_PATTERNS: list[tuple[str, re.Pattern]] = []


def classify(topic: str, topics: Topics) -> str | None:
    """The kind (one of :data:`ALL_KINDS`) of a topic of ``topics``' fleet, or None for others
    (stats, statuses of gateways and workers, rollouts...)."""
    root = topics.root + "/"
    if not topic.startswith(root):
        return None
    rest = topic[len(root):]
    if not _PATTERNS:
        wanted = {TOPIC_KIND.get(k, k): k for k in ALL_KINDS}
        for name, spec in TOPICS.items():
            if name in wanted:
                regex = re.sub(r"\\\{[a-z]+\\\}", "[^/]+", re.escape(spec.pattern))
                _PATTERNS.append((wanted[name], re.compile(f"^{regex}$")))
    return next((kind for kind, regex in _PATTERNS if regex.match(rest)), None)


# -- the seeded mutator --------------------------------------------------------------------------

INTERESTING_BYTES = (0x00, 0x01, 0x7F, 0x80, 0xFF, 0xC0, 0xC1, 0xC2, 0xC3, 0xC4, 0xC7, 0xCA, 0xCB, 0xCC, 0xCD,
                     0xCE, 0xCF, 0xD0, 0xD3, 0xD4, 0xD9, 0xDC, 0xDD, 0xDE, 0xDF, 0x90, 0x9F, 0x80, 0x8F, 0xA0, 0xBF,
                     0xE0, 0x20, 0x5B, 0x7B, 0x22)
INTERESTING_INTS = (0, 1, -1, 2, 127, 128, 255, 256, -128, -129, 32767, 32768, 65535, 65536, -32768, 2**31 - 1,
                    2**31, 2**32 - 1, 2**32, -2**31, 2**53, 2**63 - 1, 2**63, 2**64 - 1, -2**63, MAX_EVENTS_PER_REQUEST,
                    MAX_EVENTS_PER_REQUEST + 1)
INTERESTING_FLOATS = (math.nan, math.inf, -math.inf, -0.0, 0.0, 1e308, -1e308, 5e-324, 1.7976931348623157e308,
                      -1.0, 1e-300, 3.4028235e38, 1e6, 1e18)
NAN_PATTERNS = (b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f", b"\x00\x00\x80\xff", b"\x00\x7e", b"\x00\x7c",
                b"\xff\xff\xff\x7f")
# Hand-made msgpack that no encoder writes: containers claiming far more than is there, huge
# strings and bins, ext types, maps with non-string keys, the reserved byte.
CRAFTED_MSGPACK = (
    b"\xdd\xff\xff\xff\xff", b"\xdc\xff\xff", b"\xde\xff\xff", b"\xdf\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff",
    b"\xc5\xff\xff", b"\xdb\xff\xff\xff\xff", b"\xc9\xff\xff\xff\xff\x01", b"\xc1", b"\x93\xc1\xc1\xc1",
    b"\x81\x01\x02", b"\x81\x90\x00", b"\x81\x80\x00", b"\xd6\xff\x00\x00\x00\x00", b"\xd7\xff" + b"\xff" * 8,
    b"\xc7\x0c\xff" + b"\xff" * 12, b"\xd4\x05\x00", b"\x92\xd4\x01\x00\xc0", b"\xcb" + struct.pack(">d", math.nan),
    b"\x93\xcf\xff\xff\xff\xff\xff\xff\xff\xff\x00\xc4\x00", b"\x93\xd3\x80\x00\x00\x00\x00\x00\x00\x00\x00\xc4\x00",
)
JSON_TEXTS = (
    b"", b"null", b"[]", b"{}", b"0", b"-1", b"NaN", b"Infinity", b'"online"', b"{\"state\":", b"\xef\xbb\xbf{}",
    b"\xff\xfe{\x00}\x00", b"{\"state\": \"online\"}", b"{\"state\": \"offline\"}", b"{\"state\": null}",
    b"{\"state\": [\"online\"]}", b"{\"a\": 1, \"a\": 2}", b"1" * 5000, b"[" * 100 + b"]" * 100,
)


def _names(ctx: Context) -> list[str]:
    return list(ctx.sensors) + ["cam99", "gw0", "x" * 64, "", "cam0 ", "CAM0", "\u00e9", "cam0$", ".", ".."]


class Mutator:
    """Seeded mutations of ``seeds``: :meth:`frames` yields frames without end, each from a seed of
    the kind drawn from ``kinds`` (default: every kind that has seeds)."""

    def __init__(self, seeds: Iterable[Seed], ctx: Context, *, seed: int = 0, kinds: Iterable[str] | None = None,
                 max_bytes: int = 4096, oversize_every: int = 0, spoof: bool = True,
                 clock: Callable[[], float] = time.time) -> None:
        self.ctx = ctx
        self.rng = random.Random(seed)
        self.by_kind: dict[str, list[Seed]] = {}
        for s in seeds:
            self.by_kind.setdefault(s.kind, []).append(s)
        self.kinds = [k for k in (kinds or ALL_KINDS) if k in self.by_kind]
        if not self.kinds:
            raise ValueError(f"no seeds of the kinds {list(kinds or ALL_KINDS)}")
        self.max_bytes = max_bytes
        self.oversize_every = oversize_every
        self.spoof = spoof
        self.clock = clock
        self.count = 0
        self.decoded: dict[bytes, object] = {}
        # family -> weight; the families are the methods below
        self.families = [("bytes", 30), ("structure", 40), ("random", 8), ("crafted", 4), ("topic", 8),
                         ("valid", 10)]
        self._total = sum(w for _, w in self.families)

    def frames(self) -> Iterator[Fuzzed]:
        while True:
            yield self.next()

    def take(self, n: int) -> list[Fuzzed]:
        return [self.next() for _ in range(n)]

    def next(self, kind: str | None = None) -> Fuzzed:
        rng = self.rng
        self.count += 1
        kind = kind or rng.choice(self.kinds)
        seed = rng.choice(self.by_kind[kind])
        if self.oversize_every and self.count % self.oversize_every == 0:
            return Fuzzed(kind, seed.topic, seed.payload + bytes(MAX_FRAME_BYTES + 1 - len(seed.payload)), "oversize")
        pick = rng.random() * self._total
        for family, weight in self.families:
            pick -= weight
            if pick < 0:
                break
        topic = seed.topic
        if family == "bytes":
            payload, how = self._bytes(seed.payload)
        elif family == "structure":
            payload, how = self._structure(kind, seed.payload)
        elif family == "random":
            payload, how = self._random(), "random"
        elif family == "crafted":
            payload, how = self._crafted(kind)
        elif family == "topic":
            topic, how = self._topic(kind, seed.topic)
            payload = seed.payload if rng.random() < 0.5 else self._structure(kind, seed.payload)[0]
        else:
            payload, how = self._valid(kind, seed.payload)
        if not self.spoof and kind in DEVICE_TOPIC_KINDS and topic.split("/")[-2] in self.ctx.sensors:
            topic = self._rename(topic, "fuzz" + str(rng.randrange(10)))
        if family != "crafted":             # crafted frames are as long as they must be
            payload = payload[: max(self.max_bytes, len(seed.payload) * 2)]
        return Fuzzed(kind, topic, payload, f"{family}:{how}")

    # -- byte level -------------------------------------------------------------------------
    def _bytes(self, data: bytes) -> tuple[bytes, str]:
        rng = self.rng
        b = bytearray(data)
        op = rng.randrange(9)
        if not b and op < 7:
            op = 7
        if op == 0:
            for _ in range(rng.choice((1, 1, 1, 2, 4, 8))):
                i = rng.randrange(len(b))
                b[i] ^= 1 << rng.randrange(8)
            return bytes(b), "bitflip"
        if op == 1:
            for _ in range(rng.choice((1, 1, 2, 3))):
                b[rng.randrange(len(b))] = rng.choice(INTERESTING_BYTES)
            return bytes(b), "interesting-byte"
        if op == 2:
            return bytes(b[: rng.randrange(len(b))]), "truncate"
        if op == 3:
            return bytes(b[: rng.randrange(min(len(b), 4) + 1)]), "truncate-head"
        if op == 4:
            i, n = rng.randrange(len(b)), rng.choice((1, 2, 4, 8, 32))
            del b[i:i + n]
            return bytes(b), "delete"
        if op == 5:
            i, j = sorted((rng.randrange(len(b)), rng.randrange(len(b))))
            return bytes(b[:j] + b[i:j] + b[j:]), "duplicate"
        if op == 6:
            other = self.rng.choice(self.rng.choice(list(self.by_kind.values()))).payload
            return bytes(b[: rng.randrange(len(b) + 1)] + other[rng.randrange(len(other) + 1):]), "splice"
        if op == 7:
            extra = rng.choice((self._rand_bytes(rng.choice((1, 2, 8, 64, 512))), bytes(rng.choice((1, 16, 256))),
                                bytes(b[-8:]) * rng.choice((2, 16)), msgpack.packb(self._value(2))))
            return bytes(b) + extra, "extend"
        i = rng.randrange(len(b) + 1)
        return bytes(b[:i]) + self._rand_bytes(rng.choice((1, 2, 4, 16))) + bytes(b[i:]), "insert"

    def _rand_bytes(self, n: int) -> bytes:
        return self.rng.getrandbits(8 * n).to_bytes(n, "little") if n else b""

    def _random(self) -> bytes:
        rng = self.rng
        n = rng.choice((0, 1, 2, 3, 4, 5, 8, 13, 16, 32, 64, 100, 256, 1000, self.max_bytes))
        body = self._rand_bytes(n)
        if n and rng.random() < 0.5:           # a msgpack array header, so the decoder goes further
            body = bytes([0x90 | rng.randrange(16)]) + body[1:]
        if n > 1 and rng.random() < 0.3:       # ... and the real tag
            body = body[:1] + bytes([self.ctx.tag]) + body[2:]
        return body

    def _crafted(self, kind: str) -> tuple[bytes, str]:
        rng = self.rng
        if kind in JSON_KINDS:
            op = rng.randrange(4)
            if op == 0:
                return rng.choice(JSON_TEXTS), "json-text"
            if op == 1:
                depth = rng.choice((64, 1000, 10_000, 100_000))
                return b"[" * depth + b"]" * depth, f"json-deep-{depth}"
            if op == 2:
                depth = rng.choice((1000, 100_000))
                return b'{"a":' * depth + b"1" + b"}" * depth, f"json-deep-map-{depth}"
            return b'{"state": "online", "rate": ' + b"9" * rng.choice((400, 4299, 4301)) + b"}", "json-long-number"
        op = rng.randrange(3)
        if op == 0:
            return rng.choice(CRAFTED_MSGPACK), "msgpack-header"
        if op == 1:
            depth = rng.choice((8, 100, 1000, 100_000))
            return b"\x91" * depth + b"\xc0", f"msgpack-deep-{depth}"
        depth = rng.choice((100, 10_000))
        return b"\x93" + bytes([self.ctx.tag]) + b"\x81\xa1a" * depth + b"\xc0", f"msgpack-deep-map-{depth}"

    # -- topics -----------------------------------------------------------------------------
    @staticmethod
    def _rename(topic: str, name: str, level: int = -2) -> str:
        parts = topic.split("/")
        parts[level] = name
        return "/".join(parts)

    def _topic(self, kind: str, topic: str) -> tuple[str, str]:
        rng = self.rng
        if kind in DEVICE_TOPIC_KINDS or kind in NODE_TOPIC_KINDS:
            name = rng.choice(_names(self.ctx))
            return self._rename(topic, name or "-"), "device-name"
        if kind == "cmd":
            return self._rename(topic, rng.choice(("threshold", "THRESHOLDS", "reboot", "x" * 64, "-")), -1), \
                "cmd-setting"
        return topic, "same-topic"

    # -- structure --------------------------------------------------------------------------
    def _decoded(self, payload: bytes, kind: str) -> object:
        if payload not in self.decoded:
            try:
                self.decoded[payload] = json.loads(payload) if kind in JSON_KINDS else \
                    msgpack.unpackb(payload, raw=False, strict_map_key=False)
            except Exception:
                self.decoded[payload] = None
            if len(self.decoded) > 4096:
                self.decoded.clear()
        return self.decoded[payload]

    def _value(self, depth: int = 0) -> object:
        """A value of a random type, biased towards those that break checks."""
        rng = self.rng
        op = rng.randrange(12 if depth < 3 else 8)
        if op == 0:
            return rng.choice(INTERESTING_INTS)
        if op == 1:
            return rng.choice(INTERESTING_FLOATS)
        if op == 2:
            return rng.choice((None, True, False))
        if op == 3:
            return rng.choice(("", "online", "offline", "thresholds", "\u0000", "x" * 300, "\ud7ff", self.ctx.model))
        if op == 4:
            return self._rand_bytes(rng.choice((0, 1, 3, 64)))
        if op == 5:
            return rng.randrange(-2**63, 2**64)
        if op == 6:
            return rng.uniform(-1e6, 1e6)
        if op == 7:
            return msgpack.ExtType(rng.randrange(128), self._rand_bytes(rng.choice((0, 1, 4, 8))))
        if op in (8, 9):
            return [self._value(depth + 1) for _ in range(rng.choice((0, 1, 2, 3, 5)))]
        if op == 10:
            return {rng.choice(("state", "model", "rate", "event", "a", "")): self._value(depth + 1)
                    for _ in range(rng.choice((0, 1, 2)))}
        node: object = rng.choice((0, None, "x"))
        for _ in range(rng.choice((10, 50, 200))):
            node = [node]
        return node

    def _tensor(self, kind: str, old: object) -> tuple[bytes, str]:
        rng = self.rng
        n = self.ctx.tensor_bytes.get(kind) or (len(old) if isinstance(old, bytes) else 8)
        op = rng.randrange(6)
        if op == 0:
            return self._rand_bytes(n), "tensor-random"
        if op == 1:
            return self._rand_bytes(max(0, n + rng.choice((-1, 1, -n, n, 3)))), "tensor-length"
        if op == 2:
            pat = rng.choice(NAN_PATTERNS)
            return (pat * (n // len(pat) + 1))[:n], "tensor-nan"
        if op == 3:
            base = bytearray(old if isinstance(old, bytes) and old else bytes(n))
            pat = rng.choice(NAN_PATTERNS)
            i = rng.randrange(max(1, len(base) - len(pat) + 1))
            base[i:i + len(pat)] = pat
            return bytes(base[: max(n, 1)]), "tensor-one-nan"
        if op == 4:
            return b"", "tensor-empty"
        return bytes([rng.choice((0x00, 0x7F, 0x80, 0xFF))]) * n, "tensor-extreme"

    def _structure(self, kind: str, payload: bytes) -> tuple[bytes, str]:
        body = self._decoded(payload, kind)
        if body is None:
            return self._bytes(payload)
        if kind in JSON_KINDS:
            return self._json(body)
        body = _copy(body)
        rng = self.rng
        if not isinstance(body, list) or not body:
            return msgpack.packb(self._value()), "not-an-array"
        op = rng.randrange(10)
        how = ""
        if op == 0:                                    # the tag
            body[0] = rng.choice((rng.randrange(128), self.ctx.tag ^ 1, self._value(), -1, 128, 255))
            how = "tag"
        elif op == 1 and kind in ("scores", "feature", "raw") and len(body) > 1 and isinstance(body[1], int):
            body[1] = self._slot(body[1])                # the slot: far in the future or the past
            how = "slot"
        elif op == 1 and kind in ("forward", "fog_slice", "fog_answer", "late", "ack") and len(body) > 1:
            body[1] = rng.choice((MAX_EVENT_ID, MAX_EVENT_ID + 1, 2**64 - 1, -1, 0, body[1] + 10**9,
                                  max(0, body[1] - 10**9), float(body[1]), True))
            how = "event-id"
        elif op == 1 and isinstance(body[1] if len(body) > 1 else None, list):   # request / gone slots
            body[1] = rng.choice(([], [self._slot(0)] * (MAX_EVENTS_PER_REQUEST + 1), [65536], [-1],
                                  [self._slot(s) for s in range(rng.randrange(1, 64))], ["0"], [None], [1.0],
                                  [True], [[0]], list(range(MAX_EVENTS_PER_REQUEST))))
            how = "slots"
        elif op == 2 and kind in ("forward", "late") and len(body) > 2:
            now = self.clock()
            body[2] = rng.choice((now + 3600.0, now + 1e9, 0.0, -1.0, math.nan, math.inf, 1e308, int(now),
                                  now - 86400 * 365, 5e-324))
            how = "captured"
        elif op == 2 and kind in ("request", "forward") and len(body) > (2 if kind == "request" else 3):
            i = 2 if kind == "request" else 3
            n = len(self.ctx.sensors)
            body[i] = rng.choice((0, -1, 1 << n, (1 << n) - 1, 2**64 - 1, True, 1.0, None, [1]))
            how = "mask"
        elif op == 3 and kind in ("scores", "feature", "raw", "forward", "fog_slice", "fog_answer", "late"):
            tensors = [j for j in range(1, len(body)) if isinstance(body[j], bytes)]
            if not tensors:
                return msgpack.packb(body + [self._rand_bytes(8)]), "tensor-append"
            i = rng.choice(tensors)
            size_kind = kind if kind != "late" else ("scores" if i == 3 else "feature")
            body[i], how = self._tensor(size_kind, body[i])
        elif op == 4 and kind == "ack" and len(body) > 2:     # offsets from the first id
            body[2] = rng.choice(([], [0], [-1], [2**63], [MAX_EVENT_ID], [1] * 4097, ["1"], [True], [1.5],
                                  list(range(1, rng.choice((2, 100, 4096)))), None, {}))
            how = "ack-offsets"
        elif op == 4 and kind == "late" and len(body) > 4:    # vote, or no feature
            body = body[:5] + [rng.choice((0, -1, self.ctx.classes, True, None, 2**64 - 1))]
            if rng.random() < 0.5:
                body[4] = None
            how = "late-tail"
        elif op == 4 and kind == "scores":             # vote / feature tail
            tail = rng.choice(([rng.choice((self.ctx.classes, -1, 255, 2**64 - 1, True, 0.5, None, "1"))],
                               [self._rand_bytes(self.ctx.tensor_bytes.get("feature", 8)), 0],
                               [0, self._rand_bytes(self.ctx.tensor_bytes.get("feature", 8))],
                               [self._rand_bytes(3), self._rand_bytes(3), 0], [0, 0]))
            body = body[:3] + tail
            how = "scores-tail"
        elif op == 5:                                  # wrong length
            if rng.random() < 0.5 and len(body) > 1:
                del body[rng.randrange(1, len(body))]
                how = "drop-field"
            else:
                body.insert(rng.randrange(1, len(body) + 1), self._value())
                how = "add-field"
        elif op == 6:
            body = body + [self._value() for _ in range(rng.choice((1, 5, 100, 1100)))]
            how = "long-array"
        elif op == 7:
            body = rng.choice(({"tag": body[0], "body": body[1:]}, tuple(body)[:1], [body], body[0]))
            how = "wrapped"
        else:
            i = rng.randrange(len(body))
            body[i] = self._value()
            how = f"field{i}-type"
        try:
            return msgpack.packb(body, use_bin_type=True), how or "field"
        except (OverflowError, TypeError, ValueError):
            return self._bytes(payload)

    def _slot(self, slot: int) -> int:
        rng = self.rng
        now = self.ctx.slot_now(self.clock())
        delta = rng.choice((1, 2, 10, 50, 600, 3000, 32767, 32768, -1, -10, -600, -3000, -32767, 65535))
        return rng.choice(((now + delta) % SLOT_MOD, (slot + delta) % SLOT_MOD, 0, SLOT_MOD - 1))

    def _json(self, body: object) -> tuple[bytes, str]:
        rng = self.rng
        body = _copy(body)
        op = rng.randrange(8)
        if not isinstance(body, dict) or op == 0:
            body, how = self._value(), "json-body-type"
        elif op in (1, 2, 3):
            key = rng.choice(list(body) or ["state"])
            body[key] = self._json_value()
            how = f"json-{key}"
        elif op == 4 and body:
            del body[rng.choice(list(body))]
            how = "json-drop-key"
        elif op == 5:
            body[rng.choice(("x", "", "state ", "class", "event", "local", "edge", "cache", "device_cache",
                             "\u0000"))] = self._json_value()
            how = "json-add-key"
        elif op == 6:
            for key in list(body):
                if rng.random() < 0.5:
                    body[key] = self._json_value()
            how = "json-many"
        else:
            text = json.dumps(body).encode()
            return self._bytes(text)[0], "json-bytes"
        try:
            return json.dumps(body, allow_nan=True, default=_json_default).encode(), how
        except (TypeError, ValueError, RecursionError):
            return b"{}", "json-unencodable"

    def _json_value(self) -> object:
        rng = self.rng
        op = rng.randrange(8)
        if op == 0:
            return rng.choice((math.nan, math.inf, -math.inf, 1e308, -0.0, 5e-324, 0.5, 2.0, -1.0, 1e6))
        if op == 1:
            return rng.choice((10**400, -10**400, 2**63, 2**64, -2**63 - 1, 0, 1, -1, 10**6))
        if op == 2:
            return rng.choice((None, True, False))
        if op == 3:
            return rng.choice(("", "online", "offline", "cloud", "edge", "local", "cache", "1", "NaN",
                               self.ctx.model, self.ctx.model + "x", "\u2028"))
        if op == 4:
            return [self._json_value() for _ in range(rng.randrange(3))] if rng.random() < 0.7 else \
                _nest(rng.choice((100, 900)))
        if op == 5:
            return {"state": "online"} if rng.random() < 0.5 else {}
        if op == 6:
            return rng.uniform(-1e3, 1e3)
        return rng.randrange(-2**70, 2**70)

    # -- valid-looking ----------------------------------------------------------------------
    def _valid(self, kind: str, payload: bytes) -> tuple[bytes, str]:
        """Well-formed frames with hostile content: the right tag and layout, a real tensor, but
        slots far off, replays, or a status naming another model or rate."""
        rng = self.rng
        body = self._decoded(payload, kind)
        if body is None:
            return payload, "replay"
        body = _copy(body)
        if kind == "status" and isinstance(body, dict):
            body.update(rng.choice(({"model": self.ctx.model + "0"}, {"rate": rng.choice((0.001, 1.0, 9.99, 1e5))},
                                    {"state": "offline"}, {"state": "online"}, {"rate": None},
                                    {"state": "offline", "rate": rng.choice((-5.0, 0.0, 1e-300, 1e300))})))
            return json.dumps(body).encode(), "status"
        if kind == "replay" and isinstance(body, dict):
            body.update(rng.choice(({"client": rng.choice(("a/b", "+", "#", "", "x" * 300, 5, None, ["a"], "$SYS"))},
                                    {"since": rng.choice((math.nan, math.inf, -math.inf, -1.0, 1e308, "0", None,
                                                          0, self.clock() + 3600))},
                                    {"since": 0.0})))
            return json.dumps(body).encode(), "replay"
        if kind == "gateway_status" and isinstance(body, dict):
            body.update(rng.choice(({"state": "online"}, {"state": "offline"}, {"model": "other"})))
            return json.dumps(body).encode(), "gateway-status"
        if kind in ("result", "cloud_result") and isinstance(body, dict):
            body.update(rng.choice(({"event": rng.choice((0, 2**63, -1, body.get("event", 0) + 1))},
                                    {"label": rng.choice((-1, self.ctx.classes, 2**31))}, {"exit": "cloud"},
                                    {"model": "other"}, {"latency_ms": rng.choice((-1.0, 1e308, None))},
                                    {"captured": rng.choice((None, "x", -1.0, 1e308, self.clock() + 3600))},
                                    {"devices": rng.choice(("cam0", None, [1], {}))},
                                    {"confidence": rng.choice((None, "x", math.nan))}, {"class": [None]})))
            return json.dumps(body).encode(), "result"
        if kind == "cmd" and isinstance(body, dict):
            return json.dumps({rng.choice(("local", "edge", "cache", "device_cache")):
                               rng.choice((0.0, 1.0, 2.0, 0.5, 1.0000001, -0.0))}).encode(), "cmd"
        if isinstance(body, list) and len(body) > 1 and kind in ("scores", "feature", "raw") \
                and isinstance(body[1], int):
            body[1] = self._slot(body[1])
            return msgpack.packb(body, use_bin_type=True), "slot"
        return payload, "replay"


def _json_default(value: object) -> object:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, msgpack.ExtType):
        return [value.code, value.data.hex()]
    raise TypeError(type(value).__name__)


def _nest(depth: int) -> list:
    node: list = []
    for _ in range(depth):
        node = [node]
    return node


def _copy(value: object) -> object:
    if isinstance(value, list):
        return [_copy(v) for v in value]
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    return value


# -- Hypothesis ----------------------------------------------------------------------------------

def hypothesis_frames(seeds: Iterable[Seed], ctx: Context, *, kinds: Iterable[str] | None = None):
    """A Hypothesis strategy of :class:`Fuzzed` frames: each field of a frame of each kind drawn
    right (from a seed) or wrong (any msgpack or JSON value), byte-level mutations of seeds,
    and random bytes. Imports Hypothesis when called."""
    from hypothesis import strategies as st

    by_kind: dict[str, list[Seed]] = {}
    for s in seeds:
        by_kind.setdefault(s.kind, []).append(s)
    kinds = [k for k in (kinds or ALL_KINDS) if k in by_kind]
    n = len(ctx.sensors)

    scalars = (st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.sampled_from(INTERESTING_INTS)
               | st.floats() | st.text(max_size=16) | st.binary(max_size=32))
    values = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c,
                                                                                        max_size=3),
                          max_leaves=12)
    json_scalars = (st.none() | st.booleans() | st.integers(-10**30, 10**30) | st.floats()
                    | st.text(max_size=16))
    json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=4)
                               | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=10)

    def either(right, wrong=values, p_right: int = 3):
        """Mostly ``right`` (a real value), sometimes anything."""
        return st.one_of(*([right] * p_right), wrong)

    tag = either(st.just(ctx.tag), st.integers(0, 127) | values)
    slot = either(st.integers(0, SLOT_MOD - 1), st.sampled_from(INTERESTING_INTS) | values)
    event_id = either(st.integers(0, MAX_EVENT_ID), st.sampled_from(INTERESTING_INTS) | values)
    mask = either(st.integers(1, (1 << n) - 1), st.integers(-2, 1 << (n + 1)) | values)
    slots = either(st.lists(st.integers(0, SLOT_MOD - 1), min_size=1, max_size=8),
                  st.lists(slot, max_size=8) | values)

    def tensor(kind: str):
        size = ctx.tensor_bytes.get(kind, 8)
        real = [p for s in by_kind.get(kind, ()) for p in _tensors(s.payload)]
        right = st.sampled_from(real) if real else st.binary(min_size=size, max_size=size)
        return either(st.binary(min_size=size, max_size=size) | right,
                     st.binary(max_size=2 * size + 2) | st.sampled_from(NAN_PATTERNS).map(
                         lambda p, size=size: (p * (size // len(p) + 1))[:size]) | values)

    def packed(body_strategy, kind: str, topic_strategy):
        def pack(parts) -> Fuzzed | None:
            body, extra, topic = parts
            try:
                payload = msgpack.packb(list(body) + list(extra), use_bin_type=True)
            except (OverflowError, TypeError, ValueError):
                payload = b"\x90"
            return Fuzzed(kind, topic, payload, "hypothesis:structure")
        extra = st.lists(values, max_size=2) | st.just([])
        return st.tuples(body_strategy, st.one_of(st.just([]), st.just([]), extra), topic_strategy).map(pack)

    def device_topic(kind: str):
        names = st.sampled_from(list(ctx.sensors)) | st.sampled_from(_names(ctx)) | \
            st.from_regex(r"\A[A-Za-z0-9_.-]{1,64}\Z")
        return names.map(lambda d, kind=kind: ctx.topic(kind, device=d or "-"))

    structured = {
        "scores": packed(st.tuples(tag, slot, tensor("scores")), "scores", device_topic("scores")),
        "feature": packed(st.tuples(tag, slot, tensor("feature")) | st.tuples(tag, slots), "feature",
                          device_topic("feature")),
        "raw": packed(st.tuples(tag, slot, tensor("raw")), "raw", device_topic("raw")),
        "request": packed(st.tuples(tag, slots, mask), "request", st.just(ctx.topic("request"))),
        "forward": packed(st.tuples(tag, event_id, either(st.floats(0, 4e9), st.floats() | values), mask,
                                    tensor("forward")), "forward", st.just(ctx.topic("forward"))),
    }
    status_body = st.fixed_dictionaries(
        {"state": either(st.sampled_from(("online", "offline")), json_values)},
        optional={"model": either(st.just(ctx.model), json_values), "rate": either(st.floats(0.1, 100), json_values),
                  "time": json_values, "policy": json_values})
    result_body = st.fixed_dictionaries(
        {"event": either(st.integers(0, MAX_EVENT_ID), json_values), "label": either(st.integers(0, ctx.classes - 1),
                                                                                  json_values),
         "class": json_values, "confidence": json_values,
         "exit": either(st.sampled_from(("local", "edge", "cloud", "cache")), json_values),
         "devices": json_values, "captured": json_values, "latency_ms": json_values,
         "model": either(st.just(ctx.model), json_values)},
        optional={"degraded": json_values, "nodes": json_values, "extra": json_values})
    cmd_body = st.dictionaries(st.sampled_from(("local", "edge", "cache", "device_cache", "x")),
                               either(st.floats(0, 1), json_values), max_size=4)

    def as_json(kind: str, topic_strategy):
        def dump(parts) -> Fuzzed:
            body, topic = parts
            return Fuzzed(kind, topic, json.dumps(body, allow_nan=True).encode(), "hypothesis:json")
        return lambda body: st.tuples(body, topic_strategy).map(dump)

    structured["status"] = as_json("status", device_topic("status"))(status_body | json_values)
    structured["result"] = as_json("result", st.just(ctx.topic("result")))(result_body | json_values)
    structured["cmd"] = as_json("cmd", st.sampled_from(("thresholds", "thresholds", "reboot")).map(
        lambda s: ctx.topic("cmd", setting=s)))(cmd_body | json_values)

    def mutated(kind: str):
        def build(parts) -> Fuzzed:
            seed, ops = parts
            data = bytearray(seed.payload)
            for op, pos, value in ops:
                if not data:
                    data = bytearray(bytes([value]))
                    continue
                i = pos % len(data)
                if op == 0:
                    data[i] ^= 1 << (value % 8)
                elif op == 1:
                    data[i] = value
                elif op == 2:
                    del data[i:]
                elif op == 3:
                    data[i:i] = bytes([value])
                else:
                    del data[i]
            return Fuzzed(kind, seed.topic, bytes(data), "hypothesis:bytes")
        ops = st.lists(st.tuples(st.integers(0, 4), st.integers(0, 1 << 16), st.integers(0, 255)),
                       min_size=1, max_size=6)
        return st.tuples(st.sampled_from(by_kind[kind]), ops).map(build)

    def random_bytes(kind: str):
        topics = st.sampled_from([s.topic for s in by_kind[kind]])
        return st.tuples(st.binary(max_size=256), topics).map(
            lambda p, kind=kind: Fuzzed(kind, p[1], p[0], "hypothesis:random"))

    per_kind = [st.one_of(*([structured[k]] if k in structured else []), mutated(k), random_bytes(k)) for k in kinds]
    return st.one_of(*per_kind)


def _tensors(payload: bytes) -> list[bytes]:
    try:
        body = msgpack.unpackb(payload, raw=False)
    except Exception:
        return []
    return [x for x in body[2:] if isinstance(x, bytes)] if isinstance(body, list) else []


def demo_context(topics: Topics | None = None, cell: str = "cell0") -> Context:
    """A context without a bundle (tests that need no shard): the fakes' 3 sensors, fp32 tensors."""
    return Context(topics or Topics("fuzz"), cell, "m1", ("cam0", "cam1", "cam2"), 10.0, 3,
                   {"scores": 12, "feature": 32, "forward": 16, "raw": 256})


def synthetic_seeds(ctx: Context, *, shapes: dict[str, tuple[int, ...]], codecs: dict[str, CodecSpec],
                    now: float | None = None, events: int = 2, seed: int = 0) -> list[Seed]:
    """Seeds made with the real encoders from random tensors of the given shapes (for a manifest
    whose shards are scripted, as in tests/fakes.py)."""
    rng = np.random.default_rng(seed)
    now = time.time() if now is None else now
    first = round(now * ctx.rate)
    out: list[Seed] = []
    for i in range(events):
        event = first + i
        for d in ctx.sensors:
            scores = rng.standard_normal(shapes[SCORES]).astype(np.float32)
            feature = rng.standard_normal(shapes[FEATURE]).astype(np.float32)
            out += [Seed("scores", ctx.topic("scores", device=d),
                         encode_slot_frame(SCORES, model=ctx.model, event=event, tensor=scores,
                                           codec=codecs[SCORES])),
                    Seed("scores", ctx.topic("scores", device=d),
                         encode_slot_frame(SCORES, model=ctx.model, event=event, tensor=scores, codec=codecs[SCORES],
                                           feature=feature, feature_codec=codecs[FEATURE], vote=1)),
                    Seed("feature", ctx.topic("feature", device=d),
                         encode_slot_frame(FEATURE, model=ctx.model, event=event, tensor=feature,
                                           codec=codecs[FEATURE])),
                    Seed("feature", ctx.topic("feature", device=d),
                         encode_events_frame(GONE, model=ctx.model, events=[event]))]
        out.append(Seed("request", ctx.topic("request"),
                        encode_events_frame(REQUEST, model=ctx.model, events=[event], devices=ctx.sensors,
                                            sensors=ctx.sensors)))
        out.append(Seed("forward", ctx.topic("forward"),
                        encode_forward_frame(model=ctx.model, event=event, captured=event / ctx.rate,
                                             devices=ctx.sensors, sensors=ctx.sensors,
                                             tensor=rng.standard_normal(shapes["forward"]).astype(np.float32),
                                             codec=codecs["forward"])))
        out.append(Seed("result", ctx.topic("result"), json.dumps(
            {"event": event, "label": 1, "class": "b", "confidence": 0.9, "exit": "cloud", "devices": list(ctx.sensors),
             "captured": event / ctx.rate, "latency_ms": 50.0, "model": ctx.model, "degraded": False}).encode()))
    for d in ctx.sensors:
        out.append(Seed("status", ctx.topic("status", device=d), _status("online", ctx.model, ctx.rate)))
        out.append(Seed("status", ctx.topic("status", device=d), _status("offline", ctx.model, ctx.rate)))
    out += command_seeds(ctx, {"local": 0.5, "edge": 0.5})
    out += control_seeds(ctx, now)
    return out


__all__ = ["ALL_KINDS", "INPUT_KINDS", "OPTIONAL_KINDS", "Context", "Fuzzed", "Mutator", "Seed", "bundle_seeds",
           "classify", "command_seeds", "context_of", "demo_context", "hypothesis_frames", "synthetic_seeds"]
