"""Reading what arrives from the network: JSON that may be hostile, shown without trusting it.

Every tier reads statuses, commands, results and replay requests as JSON. A payload may be
deeply nested (the decoder then recurses until Python's limit), huge, or of any type; these
helpers turn each of those into a :class:`FrameError` naming the rule, and show a value in an
error message at a bounded length, so that a hostile frame costs one refusal, not a traceback.
"""
from __future__ import annotations

import json
import reprlib

from fogsplit.core.errors import FrameError

MAX_JSON_BYTES = 64 * 1024
_SHOW = reprlib.Repr()
_SHOW.maxlevel, _SHOW.maxstring, _SHOW.maxother, _SHOW.maxlong = 2, 40, 40, 40


def show(value: object) -> str:
    """``repr`` of a value from the wire, cut to a few dozen characters and two levels."""
    return _SHOW.repr(value)


def json_object(payload: bytes, rule: str, what: str, *, topic: str | None = None,
                device: str | None = None) -> dict:
    """``payload`` as a JSON object, or a FrameError (``rule``) saying it is not ``what``."""
    if len(payload) > MAX_JSON_BYTES:
        raise FrameError(rule, f"{what}: {len(payload)} bytes exceeds the {MAX_JSON_BYTES} byte cap",
                         topic=topic, device=device)
    try:
        body = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise FrameError(rule, f"{what} is not JSON ({type(exc).__name__})", topic=topic, device=device) from None
    if not isinstance(body, dict):
        raise FrameError(rule, f"{what} is a JSON {type(body).__name__}, not an object", topic=topic, device=device)
    return body


def is_number(value: object) -> bool:
    """A finite int or float that is not a bool (a huge int is not finite enough for a float)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return float(value) - float(value) == 0.0
    except OverflowError:
        return False
