"""The result an application reads on ``cell/{cell}/result``: JSON, one per event."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np

from fogsplit.core.errors import FrameError
from fogsplit.core.untrusted import is_number, json_object, show
from fogsplit.core.exits import softmax
from fogsplit.core.frames import MAX_EVENT_ID

EXIT_TIERS = ("local", "edge", "cloud", "cache")  # cache: answered from a semantic cache (docs/cache.md)
OPTIONAL = ("nodes", "late_s", "reason")           # left out of the JSON when unset


@dataclass(frozen=True)
class Result:
    event: int
    label: int
    cls: str
    confidence: float
    exit: str
    devices: list[str]
    captured: float
    latency_ms: float
    model: str
    degraded: bool = False
    nodes: list[str] | None = None   # the fog nodes whose answers made an edge exit (docs/eddl.md)
    late: bool = False               # the event reached the gateway by a replay from a device's spool
    late_s: float | None = None      # how long after its capture the gateway first heard of it
    reason: str | None = None        # why the answer is degraded (docs/reliability.md)

    def to_json(self) -> bytes:
        body = asdict(self)
        body["class"] = body.pop("cls")
        for key in OPTIONAL:
            if body[key] is None:
                body.pop(key)
        if not body["late"]:
            body.pop("late")
        return json.dumps(body).encode()

    @classmethod
    def from_json(cls, payload: bytes) -> "Result":
        body = json.loads(payload)
        body["cls"] = body.pop("class")
        return cls(**body)


def parse_result(payload: bytes, topic: str | None = None) -> Result:
    """A result read off a result topic; a malformed one raises :class:`FrameError`."""
    body = json_object(payload, "result", "the result", topic=topic)
    try:
        body["cls"] = body.pop("class")
        result = Result(**body)
    except (TypeError, KeyError) as exc:
        raise FrameError("result", f"not a result object ({type(exc).__name__}: {show(str(exc))})",
                         topic=topic) from None
    ok = (isinstance(result.event, int) and not isinstance(result.event, bool) and 0 <= result.event <= MAX_EVENT_ID
          and isinstance(result.label, int) and not isinstance(result.label, bool) and -1 <= result.label < 1 << 16
          and isinstance(result.exit, str) and isinstance(result.model, str) and isinstance(result.cls, str)
          and is_number(result.captured) and result.captured >= 0 and is_number(result.confidence)
          and is_number(result.latency_ms) and isinstance(result.devices, list)
          and all(isinstance(d, str) for d in result.devices) and isinstance(result.degraded, bool))
    if not ok:
        raise FrameError("result", "result fields have the wrong types or values (event: an id, label: a class "
                                   "index, captured: epoch seconds, devices: names)", topic=topic)
    return result


def make_result(logits: np.ndarray, *, event: int, exit: str, classes: tuple[str, ...] | list[str],
                devices: list[str], captured: float, model: str, now: float, degraded: bool = False,
                nodes: list[str] | None = None, late_s: float | None = None, reason: str | None = None) -> Result:
    """The result of ``event`` answered at ``now`` (epoch seconds) from ``logits``."""
    p = softmax(np.asarray(logits, dtype=np.float64))
    label = int(np.argmax(p))
    return Result(event=event, label=label, cls=classes[label], confidence=round(float(p[label]), 4),
                  exit=exit, devices=list(devices), captured=captured,
                  latency_ms=round((now - captured) * 1000.0, 3), model=model,
                  degraded=degraded, nodes=None if nodes is None else list(nodes), late=late_s is not None,
                  late_s=None if late_s is None else round(late_s, 3), reason=reason)
