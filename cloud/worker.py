"""The cloud services: a worker sharing the forward topics, and the raw-offload baseline."""
from __future__ import annotations

import json
from dataclasses import asdict

from fogsplit.core.clock import SYSTEM_CLOCK, Clock
from fogsplit.core.actions import Answer
from fogsplit.core.manifest import Bundle
from fogsplit.core.models import ModelSet, WatchedRunner
from fogsplit.core.rollout import Trust
from fogsplit.core.rollout_link import RolloutLink
from fogsplit.core.runner import ShardRunner
from fogsplit.core.service import Service, status_payload
from fogsplit.core.settings import CloudSettings, RolloutSettings
from fogsplit.core.topics import Topics
from fogsplit.core.transport import Transport

from fogsplit.cloud.logic import CloudLogic, CloudStats, RawOffloadLogic, cloud_stage, whole_network

__all__ = ["CloudStats", "CloudWorker", "RawOffload", "cloud_stage", "whole_network"]


class CloudWorker(Service):
    def __init__(self, transport: Transport, topics: Topics, bundle: Bundle, *, worker: str = "cloud0",
                 settings: CloudSettings | None = None, clock: Clock = SYSTEM_CLOCK,
                 rollout: RolloutSettings | None = None, trust: Trust = Trust()) -> None:
        self.settings = settings = settings or CloudSettings()
        super().__init__(transport, topics, f"cloud/{worker}", inbox=settings.inbox, clock=clock)
        m = bundle.manifest
        self.worker = worker
        self.logic = self._build(bundle)
        self.models = ModelSet(m.model_id, self.logic)
        self.presence("cloud_status", topics.cloud_status(worker), lambda: status_payload("online", model=m.model_id),
                      status_payload("offline", model=m.model_id))
        # One share group per fleet: rumqttd keys a group by its name alone, so fleets sharing
        # a broker would split each other's forwards (docs/broker.md).
        self.route(topics.shared(f"cloud-{topics.fleet}", topics.forward("+")), self._on_forward)
        # One cloud serves every cell: its rollout agents are per cell, and it keeps the model it
        # started with for the cells that never took a rollout (docs/rollout.md).
        self.rollout = None if rollout is None or rollout.store is None else RolloutLink(
            self, tier="cloud", name=worker, cell=None, shards=[m.tier_shard("cloud").name], running=m.model_id,
            settings=rollout, trust=trust, clock=clock,
            prepare=lambda b: self.models.add(b.manifest.model_id, self._build(b)), switch=self.models.switch,
            forget=lambda model: model != m.model_id and self.models.forget(model))
        self.every(settings.stats_period_s, self.publish_stats)

    @property
    def answered(self) -> int:
        return sum(logic.answered for logic in self.models.logics.values())

    # -- model switching (docs/rollout.md) ---------------------------------------------------
    def _build(self, bundle: Bundle) -> CloudLogic:
        m = bundle.manifest
        runner = WatchedRunner(ShardRunner(bundle.shard_path(m.tier_shard("cloud")), threads=self.settings.threads))
        return CloudLogic(m, runner, clock=self.clock)

    def _on_forward(self, msg):
        """A forward goes to the logic of the model its tag names: every cell's model is served."""
        self.logic = self.models.logic_at(self.clock.time())
        logic = self.models.by_tag(msg.payload) or self.logic
        actions = logic.on_forward(msg)
        failure = logic.runner.take_failure()
        answers = [a for a in actions if isinstance(a, Answer)]
        if self.rollout is not None and (answers or failure):
            self.rollout.observe(logic.manifest.model_id, len(answers), failure=failure)
        return actions

    def start(self) -> "CloudWorker":
        self.log.info("%s: serving model %s", self.name, self.logic.manifest.model_id)
        return super().start()

    def snapshot(self) -> CloudStats:
        stats = self.logic.snapshot(self.worker)
        stats.refused = self.refused
        stats.inbox_dropped = self.inbox_dropped
        stats.transport = self.transport.stats()
        return stats

    def publish_stats(self) -> None:
        self.send("cloud_stats", self.topics.cloud_stats(self.worker), json.dumps(asdict(self.snapshot())).encode())

    def on_stop(self) -> None:
        self.log.info("%s: stopping after %d answers, %d refused", self.name, self.answered, self.refused)


class RawOffload(Service):
    """Cloud-only baseline: takes every cell's raw samples and runs the whole network."""

    def __init__(self, transport: Transport, topics: Topics, bundle: Bundle, *,
                 settings: CloudSettings | None = None, clock: Clock = SYSTEM_CLOCK) -> None:
        settings = settings or CloudSettings()
        super().__init__(transport, topics, "cloud/raw", inbox=settings.inbox, clock=clock)
        m = bundle.manifest
        runners = {s: ShardRunner(bundle.shard_path(m.device_shard(s)), threads=settings.threads)
                   for s in m.sensor_names}
        for tier in ("gateway", "cloud"):
            runners[tier] = ShardRunner(bundle.shard_path(m.tier_shard(tier)), threads=settings.threads)
        self.logic = RawOffloadLogic(m, runners, deadline_s=settings.deadline_ms / 1000.0, clock=clock)
        self.route(topics.raw("+", "+"), self.logic.on_raw)
        self.route(topics.device_status("+", "+"), self.logic.on_status)

    def next_timer(self) -> float | None:
        return self.logic.next_deadline()

    def on_timer(self, now: float) -> None:
        self.apply(self.logic.on_timer(now))
