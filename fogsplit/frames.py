"""Wire frames: the msgpack maps that carry scores, features and requests between tiers.

Decoding checks everything a hostile or broken sender could get wrong and raises
:class:`FrameError` naming the rule, so a tier can report the frame and go on serving.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import msgpack
import numpy as np

from fogsplit.codecs import CODECS, CodecSpec, decode_tensor, encode_tensor
from fogsplit.errors import FrameError

PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 1 << 20
MAX_EVENTS_PER_REQUEST = 1024
MAX_EVENT_ID = (1 << 63) - 1
_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")

SCORES, FEATURE, REQUEST, FORWARD, RAW, GONE = "s", "f", "q", "w", "r", "g"
KINDS = {SCORES: "scores", FEATURE: "feature", REQUEST: "request", FORWARD: "forward",
         RAW: "raw", GONE: "gone"}
TENSOR_KINDS = (SCORES, FEATURE, FORWARD, RAW)
_KEYS = {"v", "k", "e", "d", "t", "m", "c", "q", "s", "b", "p"}


@dataclass(frozen=True, slots=True)
class Frame:
    """A decoded frame. ``tensor`` is set for scores, feature, forward and raw frames;
    ``events`` for requests and gone notices; ``devices`` for forwards (who took part)."""

    kind: str
    sender: str
    model: str
    event: int = 0
    captured: float = 0.0
    tensor: np.ndarray | None = None
    codec: str = ""
    events: tuple[int, ...] = ()
    devices: tuple[str, ...] = ()


@dataclass(frozen=True)
class Expect:
    """What a receiver accepts: its model id and, per tensor kind, the shape it must have."""

    model: str
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    codecs: dict[str, CodecSpec] = field(default_factory=dict)


def encode_tensor_frame(kind: str, *, event: int, sender: str, captured: float, model: str,
                        tensor: np.ndarray, codec: CodecSpec,
                        devices: tuple[str, ...] = ()) -> bytes:
    """Encode a frame that carries one tensor."""
    body: dict = {"v": PROTOCOL_VERSION, "k": kind, "e": int(event), "d": sender,
                  "t": float(captured), "m": model, "c": codec.name,
                  "s": list(tensor.shape), "b": encode_tensor(tensor, codec)}
    if codec.lossless:
        body["c"] = f"{codec.name}+{codec.lossless}"
    if devices:
        body["p"] = list(devices)
    return msgpack.packb(body, use_bin_type=True)


def encode_events_frame(kind: str, *, sender: str, model: str, events: list[int],
                        devices: tuple[str, ...] = ()) -> bytes:
    """Encode a request for features (from ``devices``), or a device's notice that they are gone."""
    body: dict = {"v": PROTOCOL_VERSION, "k": kind, "d": sender, "m": model, "e": [int(e) for e in events]}
    if devices:
        body["p"] = list(devices)
    return msgpack.packb(body, use_bin_type=True)


def decode_frame(payload: bytes, expect: Expect, *, topic: str | None = None) -> Frame:
    """Decode and validate one frame; raises :class:`FrameError` with the broken rule."""
    if len(payload) > MAX_FRAME_BYTES:
        raise FrameError("size", f"{len(payload)} bytes exceeds the {MAX_FRAME_BYTES} byte cap", topic=topic)
    try:
        body = msgpack.unpackb(payload, raw=False, strict_map_key=True,
                               max_bin_len=MAX_FRAME_BYTES, max_str_len=4096,
                               max_array_len=MAX_EVENTS_PER_REQUEST, max_map_len=32)
    except Exception as exc:
        raise FrameError("msgpack", f"not a msgpack frame ({type(exc).__name__}: {exc})", topic=topic) from exc
    if not isinstance(body, dict):
        raise FrameError("msgpack", f"frame is a {type(body).__name__}, not a map", topic=topic)
    device = body.get("d") if isinstance(body.get("d"), str) else None
    event = body.get("e") if isinstance(body.get("e"), int) else None
    try:
        return _check(body, expect)
    except FrameError as exc:
        raise FrameError(exc.rule, exc.detail, device=device, event=event, topic=topic) from None


def _check(body: dict, expect: Expect) -> Frame:
    unknown = set(body) - _KEYS
    if unknown:
        raise FrameError("keys", f"unknown keys {sorted(unknown)}")
    if body.get("v") != PROTOCOL_VERSION:
        raise FrameError("version", f"protocol version {body.get('v')!r}, this tier speaks {PROTOCOL_VERSION}")
    kind = body.get("k")
    if kind not in KINDS:
        raise FrameError("kind", f"unknown frame kind {kind!r}")
    sender = body.get("d")
    if not isinstance(sender, str) or not _ID.match(sender):
        raise FrameError("sender", f"sender id {sender!r} is not 1-64 of [A-Za-z0-9_.-]")
    if body.get("m") != expect.model:
        raise FrameError("model", f"frame is for model {body.get('m')!r}, this tier runs {expect.model!r}")
    devices = body.get("p", [])
    if not isinstance(devices, list) or not all(isinstance(d, str) and _ID.match(d) for d in devices):
        raise FrameError("devices", "the list of devices is malformed")
    if kind in (REQUEST, GONE):
        events = body.get("e")
        if not isinstance(events, list) or not events or not all(_is_event_id(e) for e in events):
            raise FrameError("event", f"a {KINDS[kind]} frame must list 1 or more event ids (non-negative integers)")
        return Frame(kind=kind, sender=sender, model=expect.model, events=tuple(events), devices=tuple(devices))
    event = body.get("e")
    if not _is_event_id(event):
        raise FrameError("event", f"event id {event!r} is not a non-negative integer")
    captured = body.get("t")
    if not isinstance(captured, (int, float)) or not math.isfinite(captured) or captured < 0:
        raise FrameError("time", f"capture time {captured!r} is not a finite non-negative number")
    tensor, codec = _check_tensor(body, kind, expect)
    return Frame(kind=kind, sender=sender, model=expect.model, event=event, captured=float(captured),
                 tensor=tensor, codec=codec, devices=tuple(devices))


def _check_tensor(body: dict, kind: str, expect: Expect) -> tuple[np.ndarray, str]:
    codec_name = body.get("c")
    if not isinstance(codec_name, str):
        raise FrameError("codec", "missing codec name")
    name, _, lossless = codec_name.partition("+")
    if name not in CODECS or lossless not in ("", "zlib"):
        raise FrameError("codec", f"unknown codec {codec_name!r}")
    base = expect.codecs.get(kind)
    if base is not None and base.name != name:
        raise FrameError("codec", f"{KINDS[kind]} frames use codec {base.name!r} here, got {name!r}")
    if name in ("int8", "topk") and base is None:
        raise FrameError("codec", f"codec {name!r} needs calibration this tier does not have for {KINDS[kind]}")
    spec = base if base is not None else CodecSpec(name)
    if lossless != spec.lossless:
        spec = CodecSpec(spec.name, spec.scale, spec.zero_point, spec.k, lossless)
    shape = body.get("s")
    if not isinstance(shape, list) or not all(isinstance(d, int) and 0 < d <= 1 << 20 for d in shape):
        raise FrameError("shape", f"shape {shape!r} is not a list of positive integers")
    want = expect.shapes.get(kind)
    if want is not None and tuple(shape) != tuple(want):
        raise FrameError("shape", f"{KINDS[kind]} shape {shape} differs from the model's {list(want)}")
    payload = body.get("b")
    if not isinstance(payload, bytes):
        raise FrameError("payload", "payload is missing or not bytes")
    return decode_tensor(payload, tuple(shape), spec), codec_name


def _is_event_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_EVENT_ID
