"""What a receiver knows of each device: online or not, the model it runs and its capture
rate, which turns the 16-bit slot of a frame back into the event id and the capture time
(slot ``n`` is captured at ``n / rate`` seconds since the epoch).

The roster learns from statuses (the retained birth and the will both name the model and the
rate) and remembers the model and rate across an ``offline`` status, so a device whose
connection dropped is placed in time again by its first frame after it reconnects: a frame
is proof of life, and neither a lost retained store nor a spoofed ``offline`` locks a device
out. A receiver that has never heard a device's status may be given the cell's capture rate.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from fogsplit.core.errors import FrameError
from fogsplit.core.untrusted import is_number, json_object, show
from fogsplit.core.frames import GONE, MAX_EVENT_ID, Expect, Frame, decode_frame, unwrap_slot
from fogsplit.core.topics import device_of

MAX_RATE = 10_000.0     # captures per second, as DeviceSettings.rate


@dataclass(frozen=True)
class DeviceStatus:
    state: str
    model: str | None = None
    rate: float | None = None


def parse_status(payload: bytes, device: str, topic: str | None = None) -> DeviceStatus:
    """A device's status JSON: ``{"state": "online"|"offline", "model": id, "rate": captures/s}``."""
    body = json_object(payload, "status", f"the status of {device!r}", topic=topic, device=device)
    if body.get("state") not in ("online", "offline"):
        raise FrameError("status", f"status of {device!r} has no 'state' of online or offline",
                         device=device, topic=topic)
    rate = body.get("rate")
    if rate is not None and (not is_number(rate) or not 0 < rate < MAX_RATE):
        raise FrameError("status", f"status of {device!r} has capture rate {show(rate)}, not a number in "
                                   f"(0, {MAX_RATE:g})", device=device, topic=topic)
    model = body.get("model")
    if model is not None and (not isinstance(model, str) or len(model) > 128):
        raise FrameError("status", f"status of {device!r} names model {show(model)}, not an id", device=device,
                         topic=topic)
    return DeviceStatus(body["state"], model, float(rate) if rate is not None else None)


class Roster:
    """The last word of each device a receiver has heard of: its status, or a frame."""

    def __init__(self, model: str, *, default_rate: float | None = None) -> None:
        self.model = model
        self.default_rate = default_rate
        self.devices: dict[str, DeviceStatus] = {}

    def update(self, device: str, status: DeviceStatus) -> None:
        """Take a status; an ``offline`` one that names no model or rate keeps the known ones."""
        known = self.devices.get(device)
        if known is not None and status.state == "offline":
            status = replace(status, model=status.model or known.model, rate=status.rate or known.rate)
        self.devices[device] = status

    def is_online(self, device: str) -> bool:
        status = self.devices.get(device)
        return status is not None and status.state == "online"

    def saw_frame(self, device: str) -> bool:
        """A valid frame came from ``device``: it is online. True if it was not before."""
        status = self.devices.get(device)
        if status is not None and status.state == "online":
            return False
        rate = status.rate if status is not None and status.rate else self.default_rate
        self.devices[device] = DeviceStatus("online", status.model if status else None, rate)
        return True

    def event_of(self, device: str, slot: int, now: float) -> tuple[int, float]:
        """``(event id, capture time)`` of ``device``'s frame with ``slot``, received at ``now``
        (epoch seconds); refuses frames from devices whose rate is unknown or whose model differs."""
        status = self.devices.get(device)
        rate = status.rate if status is not None and status.rate else self.default_rate
        if rate is None:
            raise FrameError("status", f"no status with a capture rate from {device!r} yet, and no capture_rate "
                                       "is configured for the cell: its frame cannot be placed in time",
                             device=device)
        if status is not None and status.model is not None and status.model != self.model:
            raise FrameError("model", f"{device!r} runs model {status.model!r}, this tier {self.model!r}",
                             device=device)
        event = unwrap_slot(slot, round(now * rate))
        if event > MAX_EVENT_ID:
            raise FrameError("event", f"event {event} of {device!r} is beyond the largest event id", device=device)
        return event, event / rate


@dataclass(frozen=True)
class DeviceFrame:
    """A device's frame with what its topic and status say: who sent it, for which event, when."""

    frame: Frame
    device: str
    event: int | None = None       # None for a gone notice, which lists slots
    captured: float | None = None


def decode_device_frame(payload: bytes, topic: str, expect: Expect, roster: Roster, now: float) -> DeviceFrame:
    """Decode a frame published on ``.../device/{d}/{leaf}`` and place it in time (``now``:
    epoch seconds at arrival)."""
    device, leaf = device_of(topic), topic.rsplit("/", 1)[-1]
    if device not in expect.sensors:
        raise FrameError("device", f"unknown device {device!r}: the model has {list(expect.sensors)}",
                         device=device, topic=topic)
    frame = decode_frame(payload, leaf, expect, topic=topic, device=device)
    if frame.kind == GONE:
        return DeviceFrame(frame, device)
    try:
        event, captured = roster.event_of(device, frame.slot, now)
    except FrameError as exc:
        raise FrameError(exc.rule, exc.detail, device=device, event=frame.slot, topic=topic) from None
    return DeviceFrame(frame, device, event, captured)
