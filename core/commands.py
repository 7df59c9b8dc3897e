"""Operator commands on ``cell/{cell}/cmd/{setting}``, checked in one place for every component.

One command exists: ``thresholds``, a JSON object whose keys each component applies where
they are its own: ``local`` and ``edge`` (exit thresholds, normalised entropy in [0, 1]) and
``cache`` (the gateway cache's distance threshold, [0, 2]) at the gateway, ``device_cache``
(the devices' caches, [0, 2]) at every device of the cell that runs one.
"""
from __future__ import annotations

from fogsplit.core.errors import FrameError
from fogsplit.core.untrusted import is_number, json_object, show

THRESHOLD_BOUNDS = {"local": 1.0, "edge": 1.0, "cache": 2.0, "device_cache": 2.0}


def parse_thresholds(payload: bytes, topic: str) -> dict[str, float]:
    """The settings of a ``thresholds`` command; a FrameError (rule ``cmd``) naming what is wrong
    for another command, a body that is not a JSON object, an unknown key or a value out of
    bounds. Nothing of a refused command applies."""
    setting = topic.rsplit("/", 1)[-1]
    try:
        body = json_object(payload, "cmd", "the command")
    except FrameError:
        body = None
    if setting != "thresholds" or body is None:
        raise FrameError("cmd", f"unknown command {show(setting)} or body not a JSON object; known: thresholds "
                                "{\"local\": x, \"edge\": y, \"cache\": z, \"device_cache\": w}", topic=topic)
    unknown = sorted(set(body) - set(THRESHOLD_BOUNDS))
    bad = sorted(k for k, v in body.items() if k in THRESHOLD_BOUNDS and (
        not is_number(v) or not 0 <= v <= THRESHOLD_BOUNDS[k]))
    if unknown or bad or not body:
        raise FrameError("cmd", f"thresholds: unknown keys {unknown} (known {sorted(THRESHOLD_BOUNDS)}), "
                                f"values out of bounds {THRESHOLD_BOUNDS} for {bad}"
                                + (", or no setting at all" if not body else ""), topic=topic)
    return {k: float(v) for k, v in body.items()}
