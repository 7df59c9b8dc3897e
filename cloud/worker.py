"""The cloud services: a worker sharing the forward topics, and the raw-offload baseline."""
from __future__ import annotations

from fogsplit.core.clock import SYSTEM_CLOCK, Clock
from fogsplit.core.manifest import Bundle
from fogsplit.core.runner import ShardRunner
from fogsplit.core.service import Service, status_payload
from fogsplit.core.settings import CloudSettings
from fogsplit.core.topics import Topics
from fogsplit.core.transport import Transport

from fogsplit.cloud.logic import CloudLogic, RawOffloadLogic, cloud_stage, whole_network

__all__ = ["CloudWorker", "RawOffload", "cloud_stage", "whole_network"]


class CloudWorker(Service):
    def __init__(self, transport: Transport, topics: Topics, bundle: Bundle, *, worker: str = "cloud0",
                 settings: CloudSettings | None = None, clock: Clock = SYSTEM_CLOCK) -> None:
        settings = settings or CloudSettings()
        super().__init__(transport, topics, f"cloud/{worker}", inbox=settings.inbox, clock=clock)
        m = bundle.manifest
        self.worker = worker
        self.logic = CloudLogic(m, ShardRunner(bundle.shard_path(m.tier_shard("cloud")), threads=settings.threads),
                                clock=clock)
        self.presence("cloud_status", topics.cloud_status(worker), lambda: status_payload("online", model=m.model_id),
                      status_payload("offline", model=m.model_id))
        self.route(topics.shared("cloud", topics.forward("+")), self.logic.on_forward)

    @property
    def answered(self) -> int:
        return self.logic.answered

    def start(self) -> "CloudWorker":
        self.log.info("%s: serving model %s", self.name, self.logic.manifest.model_id)
        return super().start()

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
