"""What a receiver knows of each device from its retained status: online or not, the model it
runs and its capture rate, which turns the 16-bit slot of a frame back into the event id and
the capture time (slot ``n`` is captured at ``n / rate`` seconds since the epoch)."""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass

from fogsplit.core.errors import FrameError
from fogsplit.core.frames import GONE, Expect, Frame, decode_frame, unwrap_slot
from fogsplit.core.topics import device_of


@dataclass(frozen=True)
class DeviceStatus:
    state: str
    model: str | None = None
    rate: float | None = None


def parse_status(payload: bytes, device: str, topic: str | None = None) -> DeviceStatus:
    """A device's status JSON: ``{"state": "online"|"offline", "model": id, "rate": captures/s}``."""
    try:
        body = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        body = None
    if not isinstance(body, dict) or body.get("state") not in ("online", "offline"):
        raise FrameError("status", f"status of {device!r} is not JSON with a 'state' of online or offline",
                         device=device, topic=topic)
    rate = body.get("rate")
    if body["state"] == "online" and rate is not None and (
            not isinstance(rate, (int, float)) or isinstance(rate, bool) or not 0 < rate < 1e6
            or not math.isfinite(rate)):
        raise FrameError("status", f"status of {device!r} has capture rate {rate!r}, not a positive number",
                         device=device, topic=topic)
    model = body.get("model")
    return DeviceStatus(body["state"], model if isinstance(model, str) else None,
                        float(rate) if rate is not None else None)


class Roster:
    """The last status of each device a receiver has heard of."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.devices: dict[str, DeviceStatus] = {}

    def update(self, device: str, status: DeviceStatus) -> None:
        self.devices[device] = status

    def event_of(self, device: str, slot: int, now: float) -> tuple[int, float]:
        """``(event id, capture time)`` of ``device``'s frame with ``slot``, received at ``now``
        (epoch seconds); refuses frames from devices with no usable status."""
        status = self.devices.get(device)
        if status is None or status.rate is None:
            raise FrameError("status", f"no status with a capture rate from {device!r} yet: its frame cannot be "
                                       "placed in time", device=device)
        if status.model is not None and status.model != self.model:
            raise FrameError("model", f"{device!r} runs model {status.model!r}, this tier {self.model!r}",
                             device=device)
        event = unwrap_slot(slot, round(now * status.rate))
        return event, event / status.rate


@dataclass(frozen=True)
class DeviceFrame:
    """A device's frame with what its topic and status say: who sent it, for which event, when."""

    frame: Frame
    device: str
    event: int | None = None       # None for a gone notice, which lists slots
    captured: float | None = None


def decode_device_frame(payload: bytes, topic: str, expect: Expect, roster: Roster) -> DeviceFrame:
    """Decode a frame published on ``.../device/{d}/{leaf}`` and place it in time."""
    device, leaf = device_of(topic), topic.rsplit("/", 1)[-1]
    if device not in expect.sensors:
        raise FrameError("device", f"unknown device {device!r}: the model has {list(expect.sensors)}",
                         device=device, topic=topic)
    frame = decode_frame(payload, leaf, expect, topic=topic, device=device)
    if frame.kind == GONE:
        return DeviceFrame(frame, device)
    try:
        event, captured = roster.event_of(device, frame.slot, time.time())
    except FrameError as exc:
        raise FrameError(exc.rule, exc.detail, device=device, event=frame.slot, topic=topic) from None
    return DeviceFrame(frame, device, event, captured)
