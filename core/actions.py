"""What a tier's logic asks its service to do: publish this, on a topic of this kind.

The logic of every tier (device/logic.py, gateway/logic.py, cloud/logic.py) takes inputs and
returns a list of these; the service around it maps each to its topic in the topic table
(core/topics.py), with that topic's QoS and retain flag. Tests read them directly.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

from fogsplit.core.errors import FrameError
from fogsplit.core.results import Result


@dataclass(frozen=True, slots=True)
class Answer:
    """An event's one result, for the cell's result topic (a cloud worker's, for the gateway's
    ``cloud_result`` topic)."""

    cell: str
    result: Result
    kind: str = "result"


@dataclass(frozen=True, slots=True)
class RequestFeatures:
    """The gateway asks ``devices`` of its cell for their features of ``events``."""

    cell: str
    events: tuple[int, ...]
    devices: tuple[str, ...]
    payload: bytes


@dataclass(frozen=True, slots=True)
class Forward:
    """The gateway hands an event to the cloud."""

    cell: str
    event: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class Send:
    """A device publishes a frame: ``kind`` is ``scores``, ``feature`` (features and gone
    notices) or ``raw``."""

    cell: str
    device: str
    kind: str
    payload: bytes
    events: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Refuse:
    """A frame or command was refused: reported on the error topic and counted."""

    error: FrameError


Action = Answer | RequestFeatures | Forward | Send | Refuse


def refusing(handler: Callable[..., list[Action]]) -> Callable[..., list[Action]]:
    """Turn a refused frame into a :class:`Refuse` action (the service counts and reports it)
    so that a logic method returns its outcome instead of raising."""
    @functools.wraps(handler)
    def wrapped(self: object, *args: object) -> list[Action]:
        try:
            return handler(self, *args)
        except FrameError as err:
            return [Refuse(err)]
    return wrapped
