"""One fog node as a plain object: the gateway's slices in, the node's answers out.

No MQTT, no threads: ``on_slice`` decodes a slice of the fused feature (refused with the rule
it breaks), runs the node's shard and returns a :class:`FogAnswer` (its logits and its part of
the edge feature) for the service in fog/node.py to publish. The clock only dates the stats.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from fogsplit.core.actions import Refuse, refusing
from fogsplit.core.clock import Clock
from fogsplit.core.frames import FOG_ANSWER, decode_frame, encode_fog_frame
from fogsplit.core.manifest import Manifest, expect_fog
from fogsplit.core.metrics import Window
from fogsplit.core.runner import ShardRunner
from fogsplit.core.topics import cell_of
from fogsplit.core.transport import Message


@dataclass(frozen=True, slots=True)
class FogAnswer:
    """A node's answer to one event, for its answer topic."""

    cell: str
    node: str
    event: int
    payload: bytes


@dataclass
class FogStats:
    node: str
    model: str
    time: float = 0.0
    uptime_s: float = 0.0
    answered: int = 0
    refused: int = 0
    shard_ms: dict[str, float | None] = field(default_factory=dict)


class FogNodeLogic:
    def __init__(self, manifest: Manifest, runner: ShardRunner, *, node: str, clock: Clock) -> None:
        if manifest.fog is None:
            raise ValueError(f"bundle {manifest.model_id} has no fog section: it was exported without --fog-nodes")
        self.manifest, self.runner, self.node, self.clock = manifest, runner, node, clock
        self.spec = manifest.fog.node(node)
        self.expect = expect_fog(manifest, node)
        self.answered = 0
        self.shard_ms = Window()
        self.started = clock.monotonic()

    @refusing
    def on_slice(self, msg: Message) -> list[FogAnswer | Refuse]:
        frame = decode_frame(msg.payload, "slice", self.expect, topic=msg.topic, device=self.node)
        start = self.clock.monotonic()
        out = self.runner.run(slice=frame.tensor[None])
        self.shard_ms.add((self.clock.monotonic() - start) * 1000.0)
        payload = encode_fog_frame(FOG_ANSWER, model=self.manifest.model_id, event=frame.event,
                                   tensor=out["feature"][0], logits=out["logits"][0],
                                   codec=self.manifest.fog.answer_codec)
        self.answered += 1
        return [FogAnswer(cell_of(msg.topic), self.node, frame.event, payload)]

    def snapshot(self) -> FogStats:
        return FogStats(node=self.node, model=self.manifest.model_id, time=round(self.clock.time(), 3),
                        uptime_s=round(self.clock.monotonic() - self.started, 1), answered=self.answered,
                        shard_ms=self.shard_ms.percentiles(50, 99))
