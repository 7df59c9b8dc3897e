"""The fog node service: subscribes its slice topic, runs the logic, publishes its answers."""
from __future__ import annotations

import json
from dataclasses import asdict

from fogsplit.core.clock import SYSTEM_CLOCK, Clock
from fogsplit.core.manifest import Bundle
from fogsplit.core.runner import ShardRunner
from fogsplit.core.service import Service, status_payload
from fogsplit.core.settings import FogSettings
from fogsplit.core.topics import Topics
from fogsplit.core.transport import Transport

from fogsplit.fog.logic import FogAnswer, FogNodeLogic, FogStats

__all__ = ["FogNode", "FogSettings", "FogStats", "node_name"]


def node_name(index: int) -> str:
    return f"fog{index}"


class FogNode(Service):
    def __init__(self, transport: Transport, topics: Topics, bundle: Bundle, *, cell: str, node: str,
                 settings: FogSettings | None = None, clock: Clock = SYSTEM_CLOCK) -> None:
        self.settings = settings = settings or FogSettings()
        super().__init__(transport, topics, f"{cell}/{node}", inbox=settings.inbox, clock=clock)
        m = bundle.manifest
        if m.fog is None:
            raise ValueError(f"bundle {bundle.path} has no fog nodes (export it with --fog-nodes N)")
        self.cell, self.node = cell, node
        runner = ShardRunner(bundle.shard_path(m.shard(m.fog.node(node).shard)), threads=settings.threads)
        self.logic = FogNodeLogic(m, runner, node=node, clock=clock)
        model = m.model_id
        self.presence("fog_status", topics.fog_status(cell, node), lambda: status_payload("online", model=model),
                      status_payload("offline", model=model))
        self.route(topics.fog_slice(cell, node), self.logic.on_slice)

    def apply(self, actions) -> None:
        answers = [a for a in actions or () if isinstance(a, FogAnswer)]
        for a in answers:
            self.send("fog_answer", self.topics.fog_answer(a.cell, a.node), a.payload, [a.event])
        super().apply([a for a in actions or () if not isinstance(a, FogAnswer)])

    def start(self) -> "FogNode":
        self.log.info("%s: serving model %s, channels %s of the fused feature", self.name,
                      self.logic.manifest.model_id, list(self.logic.spec.channels))
        return super().start()

    def snapshot(self) -> FogStats:
        stats = self.logic.snapshot()
        stats.refused = self.refused
        return stats

    def on_stop(self) -> None:
        self.log.info("%s: stopping; %s", self.name, json.dumps(asdict(self.snapshot())))
