"""The gateway's side of the fog nodes (docs/eddl.md): slices out, answers in, the ensemble.

Pure bookkeeping over arrays and messages, like the rest of the gateway's logic. Each node gets
its slice of the fused feature; the edge answer is the mean of the logits of the nodes that
answered before the deadline (or were not known offline), and the edge feature for the cloud
has a lost node's channels at zero, as the nodes were trained with nodes lost at random.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from fogsplit.core.errors import FrameError
from fogsplit.core.untrusted import json_object
from fogsplit.core.frames import FOG_SLICE, decode_frame, encode_fog_frame
from fogsplit.core.manifest import Manifest, expect_fog
from fogsplit.core.topics import device_of
from fogsplit.core.transport import Message


@dataclass(frozen=True, slots=True)
class FogSlice:
    """The gateway sends fog node ``node`` its slice of an event's fused feature."""

    cell: str
    node: str
    event: int
    payload: bytes


@dataclass
class FogWait:
    fused: np.ndarray
    devices: list[str]
    waiting: set[str]
    answers: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)


@dataclass(frozen=True)
class FogOutcome:
    logits: np.ndarray | None        # the ensemble; None when no node answered
    edge_feature: np.ndarray
    nodes: list[str]                 # the nodes that took part
    complete: bool                   # every node of the bundle answered
    fused: np.ndarray
    devices: list[str]


class FogGather:
    def __init__(self, manifest: Manifest) -> None:
        if manifest.fog is None:
            raise ValueError("this bundle has no fog nodes")
        self.manifest = manifest
        self.nodes = {n.name: n for n in manifest.fog.nodes}
        self.expects = {name: expect_fog(manifest, name) for name in self.nodes}
        self.online: set[str] = set(self.nodes)   # until a node's status says otherwise
        self.waits: dict[int, FogWait] = {}
        self.answered: Counter[str] = Counter()
        self.missed: Counter[str] = Counter()

    def ask(self, cell: str, event: int, fused: np.ndarray, devices: list[str]) -> list[FogSlice]:
        """Slices for every node; the event waits for the nodes thought online."""
        self.waits[event] = FogWait(fused, list(devices), set(self.online))
        codec = self.manifest.fog.slice_codec
        return [FogSlice(cell, name, event, encode_fog_frame(FOG_SLICE, model=self.manifest.model_id, event=event,
                                                             tensor=fused[list(spec.channels)], codec=codec))
                for name, spec in self.nodes.items()]

    def ready(self, event: int) -> bool:
        wait = self.waits.get(event)
        return wait is not None and not wait.waiting

    def on_answer(self, msg: Message) -> int | None:
        """Record a node's answer; returns its event id if that event waits for it (else None:
        a late or duplicate answer). A node that answers is online."""
        node = device_of(msg.topic)
        if node not in self.nodes:
            raise FrameError("device", f"{node!r} is not a fog node of model {self.manifest.model_id}",
                             device=node, topic=msg.topic)
        frame = decode_frame(msg.payload, "answer", self.expects[node], topic=msg.topic, device=node)
        self.online.add(node)
        wait = self.waits.get(frame.event)
        if wait is None or node in wait.answers:
            return None
        wait.answers[node] = (frame.tensor, frame.feature)
        wait.waiting.discard(node)
        self.answered[node] += 1
        return frame.event

    def on_status(self, msg: Message) -> list[int]:
        """A node's retained status; an offline node is waited for no more: the events it alone
        held back are returned."""
        node = device_of(msg.topic)
        state = json_object(msg.payload, "status", f"the status of fog node {node!r}", device=node,
                            topic=msg.topic).get("state")
        if node not in self.nodes:
            return []
        if state != "offline":
            self.online.add(node)
            return []
        self.online.discard(node)
        freed = []
        for event, wait in self.waits.items():
            if node in wait.waiting:
                wait.waiting.discard(node)
                if not wait.waiting:
                    freed.append(event)
        return freed

    def finish(self, event: int) -> FogOutcome:
        wait = self.waits.pop(event)
        for node in set(self.nodes) - set(wait.answers):
            self.missed[node] += 1
        nodes = sorted(wait.answers)
        feature = np.zeros(self.manifest.forward_shape, np.float32)
        for node in nodes:
            feature[list(self.nodes[node].features)] = wait.answers[node][1]
        logits = np.mean([wait.answers[n][0] for n in nodes], axis=0) if nodes else None
        return FogOutcome(logits, feature, nodes, len(nodes) == len(self.nodes), wait.fused,
                          wait.devices)

    def snapshot(self) -> dict:
        return {"online": sorted(self.online), "answered": dict(self.answered), "missed": dict(self.missed),
                "waiting": len(self.waits)}
