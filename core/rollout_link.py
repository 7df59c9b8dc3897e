"""Wires a :class:`~fogsplit.core.rollout.RolloutAgent` into a service: the rollout topics in,
statuses and error reports out, and the tier's three hooks (build a logic for a bundle,
switch at a time, drop a logic). Every handler runs on the service thread.

A device agent or a gateway serves one cell; a cloud worker serves every cell, so it keeps one
agent per cell that has sent it an offer (``cell=None``).
"""
from __future__ import annotations

import json
from typing import Callable, Sequence

from fogsplit.core.clock import Clock
from fogsplit.core.errors import FrameError
from fogsplit.core.manifest import Bundle
from fogsplit.core.rollout import Forget, Out, Prepare, Report, RolloutAgent, RolloutError, Schedule, Trust, \
    chunk_topic_parts, parse_offer
from fogsplit.core.service import Service
from fogsplit.core.settings import RolloutSettings
from fogsplit.core.store import BundleStore
from fogsplit.core.topics import cell_of
from fogsplit.core.transport import Message

TICK_S = 0.25


class RolloutLink:
    def __init__(self, service: Service, *, tier: str, name: str, cell: str | None, shards: Sequence[str],
                 running: str, settings: RolloutSettings, trust: Trust, clock: Clock,
                 prepare: Callable[[Bundle], None], switch: Callable[[str, float], None],
                 forget: Callable[[str], None]) -> None:
        if settings.store is None:
            raise ValueError("rollouts need a bundle store (rollout.store)")
        self.service, self.tier, self.name, self.shards = service, tier, name, tuple(shards)
        self.settings, self.trust, self.clock, self.running = settings, trust, clock, running
        self.store = BundleStore(settings.store, keep=settings.keep)
        self.prepare, self.switch, self.forget = prepare, switch, forget
        self.agents: dict[str, RolloutAgent] = {}
        topics = service.topics
        where = cell or "+"
        service.route(topics.rollout(where), self._on_offer)
        service.route(topics.rollout_status(where, "+", "+"), self._on_status)
        for shard in self.shards:
            service.route(topics.rollout_chunk("+", shard, "+"), self._on_chunk)
        service.every(TICK_S, self.tick)
        if cell is not None:
            self._agent(cell)

    def _agent(self, cell: str) -> RolloutAgent:
        agent = self.agents.get(cell)
        if agent is None:
            agent = self.agents[cell] = RolloutAgent(
                tier=self.tier, name=self.name, cell=cell, shards=self.shards, running=self.running,
                store=self.store, trust=self.trust, settings=self.settings, clock=self.clock)
        return agent

    # -- inputs -----------------------------------------------------------------------------
    def _on_offer(self, msg: Message) -> None:
        if not msg.payload:
            return                                   # a cleared retained offer
        try:
            offer = parse_offer(msg.payload)
        except RolloutError as exc:
            raise FrameError("rollout", str(exc), topic=msg.topic) from None
        agent = self._agent(cell_of(msg.topic))
        self._apply(agent, agent.on_offer(offer))

    def _on_chunk(self, msg: Message) -> None:
        try:
            model, shard, index = chunk_topic_parts(msg.topic)
        except RolloutError as exc:
            raise FrameError("rollout", str(exc), topic=msg.topic) from None
        for agent in list(self.agents.values()):
            self._apply(agent, agent.on_chunk(model, shard, index, msg.payload))

    def _on_status(self, msg: Message) -> None:
        agent = self.agents.get(cell_of(msg.topic))
        if agent is None or not msg.payload:
            return
        try:
            body = json.loads(msg.payload)
        except (ValueError, UnicodeDecodeError):
            body = None
        if not isinstance(body, dict):
            raise FrameError("rollout", "a rollout status is not a JSON object", topic=msg.topic)
        if body.get("rollout") == agent.rollout:
            self._apply(agent, agent.on_peer_status(body))

    def observe(self, model: str, events: int, *, degraded: int = 0, failure: str | None = None) -> None:
        """The outcome of events ``model`` decided, for its health check."""
        for agent in list(self.agents.values()):
            self._apply(agent, agent.on_events(model, events, degraded=degraded, failure=failure))

    def tick(self) -> None:
        for agent in list(self.agents.values()):
            self._apply(agent, agent.on_timer())

    # -- outputs ----------------------------------------------------------------------------
    def _apply(self, agent: RolloutAgent, outs: list[Out]) -> None:
        queue = list(outs)
        while queue:
            out = queue.pop(0)
            if isinstance(out, Report):
                self._report(agent, out.body)
            elif isinstance(out, Prepare):
                try:
                    self.prepare(out.bundle)
                except Exception as exc:   # any failure to build the logic refuses the model, A serves on
                    self.service.log.exception("%s: cannot serve model %s", self.service.name,
                                               out.bundle.manifest.model_id)
                    queue = agent.refuse(out.bundle.manifest.model_id, f"cannot serve it: {exc}")
            elif isinstance(out, Schedule):
                self.switch(out.model, out.at)
            elif isinstance(out, Forget):
                if not any(a.running == out.model or (a.staged and a.staged.model == out.model)
                           for a in self.agents.values()):
                    self.forget(out.model)

    def _report(self, agent: RolloutAgent, body: dict) -> None:
        topics = self.service.topics
        self.service.send("rollout_status", topics.rollout_status(agent.cell, self.tier, self.name),
                          json.dumps(body).encode())
        if body["state"] in ("refused", "rolled-back"):
            self.service.send("error", topics.error, json.dumps({
                "by": self.service.name, "rule": f"rollout {body['state']}", "detail": body["reason"],
                "device": None, "event": None, "topic": topics.rollout(agent.cell), "model": body["model"]}).encode())
