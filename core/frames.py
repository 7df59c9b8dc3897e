"""Wire frames: the msgpack arrays that carry scores, features and requests between tiers.

A frame carries only what neither its topic nor the bundle already says, because on the data
path the frame is most of the packet (DESIGN.md's self-describing map cost about 100 bytes per
6-byte score vector; docs/architecture.md has the accounting):

==========  =========================  ==============================================
kind        topic leaf                 msgpack array
==========  =========================  ==============================================
scores      ``device/{d}/scores``      ``[tag, slot, scores]`` or, one-phase,
                                       ``[tag, slot, scores, feature]``; either may end
                                       with ``vote``, the label the device's own
                                       cache answers (docs/cache.md)
feature     ``device/{d}/feature``     ``[tag, slot, feature]``
gone        ``device/{d}/feature``     ``[tag, [slot, ...]]``: features no longer held
raw         ``device/{d}/raw``         ``[tag, slot, sample]``
request     ``request``                ``[tag, [slot, ...], device_mask]``
forward     ``forward``                ``[tag, event, captured, device_mask, edge_feature]``
late        ``device/{d}/late``        ``[tag, event, captured, scores, feature]``, may
                                       end with ``vote``: a replay from the device's
                                       spool (docs/reliability.md)
lost        ``device/{d}/late``        ``[tag, event, captured, reason]``: the spool
                                       dropped the event's frames
ack         ``ack``                    ``[tag, first_event, [offset, ...]]``: events the
                                       cell has answered for good; ends with ``keep``
                                       while the gateway is behind: hold replays, and
                                       publish live only the events ``e % keep == 0``
==========  =========================  ==============================================

- The sender is the device in the topic, the kind is the topic's leaf.
- ``tag`` (0..127, one byte) is derived from the model id and this protocol version; a frame
  for another model or protocol fails it. The exact check is the model id in each device's
  retained status, which the gateway compares with its own.
- ``slot`` is the event id modulo 2**16, two bytes where the id itself would take nine; the
  receiver restores the full id from the capture rate the device announced (see
  :func:`unwrap_slot`), the way RTP restores 16-bit sequence numbers.
- Tensors are payload bytes only: codec, calibration and shape come from the manifest, and
  the decoder checks the length against them.
- ``device_mask`` is a bitmask over the manifest's sensor order.
- A late frame and an ack carry full event ids: a replay may come hours after its capture,
  when a 16-bit slot no longer names one event.

Decoding checks everything a hostile or broken sender could get wrong and raises
:class:`FrameError` naming the rule, so a tier can report the frame and go on serving.
"""
from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass, field

import msgpack
import numpy as np

from fogsplit.core.codecs import CodecSpec, decode_tensor, encode_tensor
from fogsplit.core.errors import FrameError
from fogsplit.core.untrusted import show

PROTOCOL_VERSION = 2
MAX_FRAME_BYTES = 1 << 20
MAX_EVENTS_PER_REQUEST = 1024
MAX_EVENT_ID = (1 << 63) - 1
SLOT_BITS = 16
SLOT_MOD = 1 << SLOT_BITS

SCORES, FEATURE, REQUEST, FORWARD, RAW, GONE = "s", "f", "q", "w", "r", "g"
FOG_SLICE, FOG_ANSWER = "l", "a"     # gateway -> fog node, fog node -> gateway (docs/eddl.md)
LATE, LOST, ACK = "t", "x", "k"      # device spool replay -> gateway, gateway -> devices (docs/reliability.md)
MAX_REASON = 200
MAX_ACKS = 4096
MAX_KEEP = 64         # a busy gateway takes at least 1 in MAX_KEEP of the devices' live slots
KINDS = {SCORES: "scores", FEATURE: "feature", REQUEST: "request", FORWARD: "forward",
         RAW: "raw", GONE: "gone", FOG_SLICE: "fog slice", FOG_ANSWER: "fog answer", LATE: "late", LOST: "lost notice",
         ACK: "ack"}
TENSOR_KINDS = (SCORES, FEATURE, FORWARD, RAW)
LEAF_KINDS = {"scores": (SCORES,), "feature": (FEATURE, GONE), "raw": (RAW,), "request": (REQUEST,),
              "forward": (FORWARD,), "slice": (FOG_SLICE,), "answer": (FOG_ANSWER,), "late": (LATE, LOST),
              "ack": (ACK,)}


@functools.lru_cache(maxsize=64)
def frame_tag(model_id: str) -> int:
    """One byte (a msgpack positive fixint) naming the model and protocol a frame is for."""
    return hashlib.sha256(f"fogsplit/{PROTOCOL_VERSION}/{model_id}".encode()).digest()[0] & 0x7F


def to_slot(event: int) -> int:
    return int(event) % SLOT_MOD


def unwrap_slot(slot: int, near: int) -> int:
    """The event id congruent to ``slot`` modulo 2**16 that lies closest to ``near``
    (an id the receiver expects: its clock times the capture rate, or one it holds)."""
    base = near - (near % SLOT_MOD) + slot
    candidates = (base - SLOT_MOD, base, base + SLOT_MOD)
    return min((c for c in candidates if c >= 0), key=lambda c: abs(c - near))


def devices_to_mask(devices, sensors: tuple[str, ...]) -> int:
    return sum(1 << sensors.index(d) for d in devices)


def mask_to_devices(mask: int, sensors: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(s for i, s in enumerate(sensors) if mask >> i & 1)


@dataclass(frozen=True, slots=True)
class Frame:
    """A decoded frame. ``slot`` is set for scores, feature and raw frames (the receiver
    unwraps it), ``event`` and ``captured`` for forwards; ``tensor`` for tensor frames
    (``feature`` too for one-phase scores); ``vote`` for scores whose device's cache hit;
    ``events`` (slots) for requests and gone notices; ``devices`` for requests and forwards;
    ``reason`` for lost notices; ``busy`` and ``keep`` for acks of a gateway that is shedding
    load (``keep``: the devices publish live only the events ``e % keep == 0``)."""

    kind: str
    slot: int = 0
    event: int = 0
    captured: float = 0.0
    tensor: np.ndarray | None = None
    feature: np.ndarray | None = None
    vote: int | None = None
    events: tuple[int, ...] = ()
    devices: tuple[str, ...] = ()
    reason: str | None = None
    busy: bool = False
    keep: int = 1


@dataclass(frozen=True)
class Expect:
    """What a receiver accepts: its model, its sensors, and per tensor kind the shape and codec."""

    model: str
    sensors: tuple[str, ...] = ()
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    codecs: dict[str, CodecSpec] = field(default_factory=dict)
    raw: dict[str, tuple[tuple[int, ...], CodecSpec]] = field(default_factory=dict)   # per sensor: its own shape

    @property
    def tag(self) -> int:
        return frame_tag(self.model)


def _pack(body: list) -> bytes:
    return msgpack.packb(body, use_bin_type=True)


def encode_slot_frame(kind: str, *, model: str, event: int, tensor: np.ndarray, codec: CodecSpec,
                      feature: np.ndarray | None = None, feature_codec: CodecSpec | None = None,
                      vote: int | None = None) -> bytes:
    """A device's scores (with its feature, one-phase; with its cache's vote on a hit), feature
    or raw sample for one event."""
    body = [frame_tag(model), to_slot(event), encode_tensor(tensor, codec)]
    if feature is not None:
        if kind != SCORES or feature_codec is None:
            raise ValueError("only a scores frame carries a feature, and it needs the feature codec")
        body.append(encode_tensor(feature, feature_codec))
    if vote is not None:
        if kind != SCORES:
            raise ValueError("only a scores frame carries a cache vote")
        body.append(int(vote))
    return _pack(body)


def encode_events_frame(kind: str, *, model: str, events: list[int], devices: tuple[str, ...] = (),
                        sensors: tuple[str, ...] = ()) -> bytes:
    """A gateway's request for the features of ``events`` from ``devices``, or a device's notice
    that the features of ``events`` are gone."""
    slots = [to_slot(e) for e in events]
    if kind == REQUEST:
        return _pack([frame_tag(model), slots, devices_to_mask(devices, sensors)])
    return _pack([frame_tag(model), slots])


def encode_late_frame(*, model: str, event: int, captured: float, scores: bytes, feature: bytes | None,
                      vote: int | None = None) -> bytes:
    """A device's replay of an event from its spool: full id and capture time, and the scores
    and feature as they were encoded at capture (a late event is answered without a request)."""
    body = [frame_tag(model), int(event), float(captured), scores, feature]
    if vote is not None:
        body.append(int(vote))
    return _pack(body)


def encode_lost_frame(*, model: str, event: int, captured: float, reason: str) -> bytes:
    """A device's notice that its spool dropped the frames of ``event``, and why."""
    return _pack([frame_tag(model), int(event), float(captured), reason[:MAX_REASON]])


def encode_ack_frame(*, model: str, events: list[int], busy: bool = False, keep: int = 1) -> bytes:
    """The gateway's word that ``events`` are answered for good: the devices drop them from their
    spools. Ids as offsets from the first, so an ack of a run of events costs about a byte each.
    ``busy``: the gateway is shedding load, the devices hold their replays; ``keep`` (busy only):
    they publish live only the events ``e % keep == 0`` and spool the others (docs/reliability.md)."""
    if not 1 <= keep <= MAX_KEEP:
        raise ValueError(f"keep {keep} is not in 1..{MAX_KEEP}")
    ordered = sorted(set(int(e) for e in events))
    return _pack([frame_tag(model), ordered[0], [e - ordered[0] for e in ordered[1:]],
                  *([int(keep)] if busy or keep > 1 else [])])


def encode_forward_frame(*, model: str, event: int, captured: float, devices: tuple[str, ...],
                         sensors: tuple[str, ...], tensor: np.ndarray, codec: CodecSpec) -> bytes:
    """The gateway's hand-over to the cloud: full event id and capture time, since the cloud
    has no device status to restore them from."""
    return _pack([frame_tag(model), int(event), float(captured), devices_to_mask(devices, sensors),
                  encode_tensor(tensor, codec)])


def encode_fog_frame(kind: str, *, model: str, event: int, tensor: np.ndarray, codec: CodecSpec,
                     logits: np.ndarray | None = None) -> bytes:
    """A fog slice ``[tag, event, slice]`` (gateway -> node), or a node's answer
    ``[tag, event, logits (fp32), feature]``. The full event id: a node keeps no roster."""
    if kind == FOG_SLICE:
        return _pack([frame_tag(model), int(event), encode_tensor(tensor, codec)])
    if kind != FOG_ANSWER or logits is None:
        raise ValueError("a fog frame is a slice, or an answer with its logits")
    return _pack([frame_tag(model), int(event), encode_tensor(np.asarray(logits, np.float32), CodecSpec("fp32")),
                  encode_tensor(tensor, codec)])


def decode_frame(payload: bytes, leaf: str, expect: Expect, *, topic: str | None = None,
                 device: str | None = None) -> Frame:
    """Decode and validate one frame that arrived on a topic ending in ``leaf``; raises
    :class:`FrameError` with the broken rule (``device`` is named in the error)."""
    if len(payload) > MAX_FRAME_BYTES:
        raise FrameError("size", f"{len(payload)} bytes exceeds the {MAX_FRAME_BYTES} byte cap",
                         device=device, topic=topic)
    try:
        body = msgpack.unpackb(payload, raw=False, strict_map_key=True,
                               max_bin_len=MAX_FRAME_BYTES, max_str_len=4096,
                               max_array_len=MAX_EVENTS_PER_REQUEST, max_map_len=32)
    except Exception as exc:
        raise FrameError("msgpack", f"not a msgpack frame ({type(exc).__name__}: {exc})",
                         device=device, topic=topic) from exc
    event = body[1] if isinstance(body, list) and len(body) > 1 and _is_event_id(body[1]) else None
    try:
        return _check(body, leaf, expect, device)
    except FrameError as exc:
        raise FrameError(exc.rule, exc.detail, device=device, event=event, topic=topic) from None


def _check(body: object, leaf: str, expect: Expect, device: str | None = None) -> Frame:
    if leaf not in LEAF_KINDS:
        raise FrameError("kind", f"no frame belongs on a {leaf!r} topic")
    if not isinstance(body, list) or not body:
        raise FrameError("layout", f"frame is a {type(body).__name__}, not a msgpack array "
                                   f"(protocol {PROTOCOL_VERSION})")
    if body[0] != expect.tag:
        raise FrameError("model", f"frame tag {show(body[0])} is not {expect.tag}, the tag of model {expect.model!r} "
                                  f"under protocol {PROTOCOL_VERSION}: the sender runs another model or protocol")
    kinds = LEAF_KINDS[leaf]
    if GONE in kinds and len(body) == 2 and isinstance(body[1], list):
        return Frame(kind=GONE, events=_check_slots(body[1], "gone"))
    kind = kinds[0]
    if kind in (FOG_SLICE, FOG_ANSWER):
        _need_len(body, (3,) if kind == FOG_SLICE else (4,), kind)
        if not _is_event_id(body[1]):
            raise FrameError("event", f"event id {show(body[1])} is not a non-negative integer")
        if kind == FOG_SLICE:
            return Frame(kind=kind, event=body[1], tensor=_check_tensor(body[2], FOG_SLICE, expect))
        return Frame(kind=kind, event=body[1], tensor=_check_tensor(body[2], SCORES, expect),
                     feature=_check_tensor(body[3], FOG_ANSWER, expect))
    if kind == LATE:
        return _check_late(body, expect)
    if kind == ACK:
        _need_len(body, (3, 4), kind)
        first, offsets = body[1], body[2]
        keep = body[3] if len(body) == 4 else 1
        if not isinstance(keep, int) or isinstance(keep, bool) or not 1 <= keep <= MAX_KEEP:
            raise FrameError("layout", f"an ack ends with its offsets, or while the gateway is behind with 'keep' "
                                       f"1..{MAX_KEEP}, not {show(keep)}")
        if not _is_event_id(first) or not isinstance(offsets, list) or len(offsets) > MAX_ACKS or not all(
                isinstance(o, int) and not isinstance(o, bool) and 0 < o <= MAX_EVENT_ID - first for o in offsets):
            raise FrameError("event", "an ack lists a first event id and positive offsets from it")
        return Frame(kind=ACK, event=first, events=(first, *(first + o for o in offsets)), busy=len(body) == 4,
                     keep=keep)
    if kind == REQUEST:
        _need_len(body, (3,), kind)
        return Frame(kind=REQUEST, events=_check_slots(body[1], "request"),
                     devices=_check_mask(body[2], expect.sensors))
    if kind == FORWARD:
        _need_len(body, (5,), kind)
        _, event, captured, mask, payload = body
        if not _is_event_id(event):
            raise FrameError("event", f"event id {show(event)} is not a non-negative integer")
        if not isinstance(captured, float) or not math.isfinite(captured) or captured < 0:
            raise FrameError("time", f"capture time {show(captured)} is not a finite non-negative number")
        return Frame(kind=FORWARD, event=event, captured=captured, devices=_check_mask(mask, expect.sensors),
                     tensor=_check_tensor(payload, FORWARD, expect))
    _need_len(body, (3, 4, 5) if kind == SCORES else (3,), kind)
    slot = body[1]
    if not isinstance(slot, int) or isinstance(slot, bool) or not 0 <= slot < SLOT_MOD:
        raise FrameError("event", f"event slot {show(slot)} is not an integer in 0..{SLOT_MOD - 1}")
    tensor = _check_raw(body[2], device, expect) if kind == RAW else _check_tensor(body[2], kind, expect)
    extra = body[3:]
    vote = _check_vote(extra.pop(), expect) if extra and not isinstance(extra[-1], bytes) else None
    if len(extra) > 1:
        raise FrameError("layout", "a scores frame carries at most a feature and a cache vote after the scores")
    feature = _check_tensor(extra[0], FEATURE, expect) if extra else None
    return Frame(kind=kind, slot=slot, tensor=tensor, feature=feature, vote=vote)


def _check_late(body: list, expect: Expect) -> Frame:
    """A late frame, or a lost notice (four fields, the last a reason)."""
    _need_len(body, (4, 5, 6), LATE)
    event, captured = body[1], body[2]
    if not _is_event_id(event):
        raise FrameError("event", f"event id {show(event)} is not a non-negative integer")
    if not isinstance(captured, float) or not math.isfinite(captured) or captured < 0:
        raise FrameError("time", f"capture time {show(captured)} is not a finite non-negative number")
    if len(body) == 4:
        if not isinstance(body[3], str) or not body[3] or len(body[3]) > MAX_REASON:
            raise FrameError("layout", f"a lost notice ends with its reason, 1 to {MAX_REASON} characters")
        return Frame(kind=LOST, event=event, captured=captured, reason=body[3])
    scores, feature = body[3], body[4]
    vote = _check_vote(body[5], expect) if len(body) == 6 else None
    return Frame(kind=LATE, event=event, captured=captured, tensor=_check_tensor(scores, SCORES, expect),
                 feature=None if feature is None else _check_tensor(feature, FEATURE, expect), vote=vote)


def _check_vote(vote: object, expect: Expect) -> int:
    classes = expect.shapes[SCORES][0]
    if not isinstance(vote, int) or isinstance(vote, bool) or not 0 <= vote < classes:
        raise FrameError("vote", f"cache vote {show(vote)} is not a class index 0..{classes - 1}")
    return vote


def _need_len(body: list, lengths: tuple[int, ...], kind: str) -> None:
    if len(body) not in lengths:
        raise FrameError("layout", f"a {KINDS[kind]} frame has {' or '.join(map(str, lengths))} fields, "
                                   f"this one {len(body)}")


def _check_slots(slots: object, what: str) -> tuple[int, ...]:
    if not isinstance(slots, list) or not slots or not all(
            isinstance(s, int) and not isinstance(s, bool) and 0 <= s < SLOT_MOD for s in slots):
        raise FrameError("event", f"a {what} frame must list 1 or more event slots (integers 0..{SLOT_MOD - 1})")
    return tuple(slots)


def _check_mask(mask: object, sensors: tuple[str, ...]) -> tuple[str, ...]:
    if not isinstance(mask, int) or isinstance(mask, bool) or not 0 < mask < (1 << len(sensors)):
        raise FrameError("devices", f"device mask {show(mask)} names no device of this model's {len(sensors)}")
    return mask_to_devices(mask, sensors)


def _check_tensor(payload: object, kind: str, expect: Expect) -> np.ndarray:
    if not isinstance(payload, bytes):
        raise FrameError("payload", f"the {KINDS[kind]} payload is missing or not bytes")
    spec, shape = expect.codecs.get(kind), expect.shapes.get(kind)
    if spec is None or shape is None:
        raise FrameError("kind", f"this tier takes no {KINDS[kind]} frames")
    return decode_tensor(payload, tuple(shape), spec)


def _check_raw(payload: object, device: str | None, expect: Expect) -> np.ndarray:
    """A raw sample: in its sensor's own shape and codec; NaN allowed (a missing value, or the
    end of a shorter series), as the sensor produced it."""
    if device not in expect.raw:
        return _check_tensor(payload, RAW, expect)
    if not isinstance(payload, bytes):
        raise FrameError("payload", f"the {KINDS[RAW]} payload is missing or not bytes")
    shape, spec = expect.raw[device]
    return decode_tensor(payload, tuple(shape), spec, allow_nan=True)


def _is_event_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_EVENT_ID
