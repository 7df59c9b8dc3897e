"""The gateway service: subscribes the cell's topics, feeds the logic, publishes its actions."""
from __future__ import annotations

import json
from dataclasses import asdict

from fogsplit.core.clock import SYSTEM_CLOCK, Clock
from fogsplit.core.manifest import Bundle
from fogsplit.core.runner import ShardRunner
from fogsplit.core.service import Service, status_payload
from fogsplit.core.settings import GatewaySettings
from fogsplit.core.topics import Topics
from fogsplit.core.transport import Transport

from fogsplit.gateway.logic import GatewayLogic, GatewayStats

__all__ = ["Gateway", "GatewaySettings", "GatewayStats"]


class Gateway(Service):
    def __init__(self, transport: Transport, topics: Topics, bundle: Bundle, *, cell: str,
                 gateway: str = "gw0", settings: GatewaySettings | None = None, clock: Clock = SYSTEM_CLOCK) -> None:
        self.settings = settings = settings or GatewaySettings()
        super().__init__(transport, topics, f"{cell}/{gateway}", inbox=settings.inbox, clock=clock)
        m = bundle.manifest
        self.cell, self.gateway = cell, gateway
        runner = ShardRunner(bundle.shard_path(m.tier_shard("gateway")), threads=settings.threads)
        self.logic = GatewayLogic(m, runner, cell=cell, gateway=gateway, settings=settings, clock=clock)
        self.presence("gateway_status", topics.gateway_status(cell, gateway),
                      lambda: status_payload("online", model=m.model_id), status_payload("offline", model=m.model_id))
        if self.logic.cache is not None:
            self.route(topics.result(cell), self.logic.on_result)
        self.route(topics.scores(cell, "+"), self.logic.on_scores)
        self.route(topics.feature(cell, "+"), self.logic.on_feature)
        self.route(topics.device_status(cell, "+"), self.logic.on_status)
        self.route(topics.cmd(cell, "+"), self.logic.on_command)
        self.every(settings.stats_period_s, self.publish_stats)

    @property
    def manifest(self):
        return self.logic.manifest

    @property
    def thresholds(self) -> dict[str, float]:
        return self.logic.thresholds

    @property
    def cache(self):
        return self.logic.cache

    def start(self) -> "Gateway":
        self.log.info("%s: serving model %s, sensors %s, thresholds %s", self.name, self.manifest.model_id,
                      ",".join(self.logic.sensors), self.thresholds)
        return super().start()

    def next_timer(self) -> float | None:
        return self.logic.next_deadline()

    def on_timer(self, now: float) -> None:
        self.apply(self.logic.on_timer(now))

    def snapshot(self) -> GatewayStats:
        stats = self.logic.snapshot()
        stats.refused = self.refused
        stats.inbox_dropped = self.inbox_dropped
        stats.bytes_out = sum(self.transport.meter.snapshot()[1].values())
        stats.transport = self.transport.stats()
        return stats

    def publish_stats(self) -> None:
        self.send("gateway_stats", self.topics.gateway_stats(self.cell, self.gateway),
                  json.dumps(asdict(self.snapshot())).encode())

    def on_stop(self) -> None:
        self.log.info("%s: stopping; %s", self.name, json.dumps(asdict(self.snapshot())))
