"""The gateway service: subscribes the cell's topics, feeds the logic, publishes its actions.

Around the logic it owns the journal (gateway/journal.py): a result is marked sent when the
broker acknowledges it, published again if the client refused it (its queue full), and at
start what was journaled but never acknowledged is published again. It flushes the logic's
acks every ``ack_period_ms`` and answers applications' replay requests from the journal.

Overload: a scores or late frame that waited in the inbox longer than ``shed_after_ms`` is
dropped unread (counted as ``shed``, logged as a count every ``LOG_EVERY_S``), and the next
acks tell the devices the gateway is busy: they hold their replays, which would only be more
load, and publish live only the share of their events the gateway can take
(gateway/admission.py). The shed and the held-back events stay in the spools and are
replayed, answered late, once the gateway has caught up (docs/reliability.md)."""
from __future__ import annotations

import json
from dataclasses import asdict

from fogsplit.core.actions import Answer, Refuse
from fogsplit.core.errors import FrameError
from fogsplit.core.results import parse_result
from fogsplit.core.untrusted import is_number, json_object, show
from fogsplit.core.clock import SYSTEM_CLOCK, Clock
from fogsplit.core.discovery import cell_configs
from fogsplit.core.manifest import Bundle
from fogsplit.core.metrics import ratio
from fogsplit.core.models import ModelSet, WatchedRunner
from fogsplit.core.rollout import Trust
from fogsplit.core.rollout_link import RolloutLink
from fogsplit.core.roster import DeviceStatus
from fogsplit.core.runner import ShardRunner
from fogsplit.core.service import LOG_EVERY_S, Service, status_payload
from fogsplit.core.settings import GatewaySettings, RolloutSettings
from fogsplit.core.topics import Topics, check_name
from fogsplit.core.transport import Transport

from fogsplit.gateway.fog import FogSlice
from fogsplit.gateway.journal import Journal
from fogsplit.gateway.logic import MEMORY_JOURNAL_ROWS, GatewayLogic, GatewayStats

PRUNE_EVERY_S = 10.0
RETRY_EVERY_S = 0.5
SHEDDABLE = ("on_scores", "on_late")     # new work; the answers to work under way are always read
REPLAY_MAX = 10_000     # results replayed per REPLAY_PERIOD_S, to every application together
REPLAY_PERIOD_S = 10.0

__all__ = ["Gateway", "GatewaySettings", "GatewayStats"]


class Gateway(Service):
    def __init__(self, transport: Transport, topics: Topics, bundle: Bundle, *, cell: str,
                 gateway: str = "gw0", settings: GatewaySettings | None = None, clock: Clock = SYSTEM_CLOCK,
                 rollout: RolloutSettings | None = None, trust: Trust = Trust()) -> None:
        self.settings = settings = settings or GatewaySettings()
        super().__init__(transport, topics, f"{cell}/{gateway}", inbox=settings.inbox, clock=clock)
        m = bundle.manifest
        self.cell, self.gateway = cell, gateway
        self._replay_window = [clock.monotonic(), 0]     # [start, results replayed in it]
        self._unpublished: list[tuple[int, bytes]] = []   # journaled results the client refused
        self._shed_logged_at, self._shed_since_log, self._shed_since_ack = -LOG_EVERY_S, 0, 0
        self.journal = Journal(settings.journal, window_s=settings.replay_window_s,
                               max_rows=settings.journal_max if settings.journal else
                               min(settings.journal_max, MEMORY_JOURNAL_ROWS))
        self.logic = self._build(bundle)
        self.models = ModelSet(m.model_id, self.logic)
        self._announce(publish=False)
        self.route(topics.scores(cell, "+"), self._on_frame("on_scores"))
        self.route(topics.late(cell, "+"), self._on_frame("on_late"))
        self.route(topics.cloud_result(cell), self._on_cloud_result)
        self.route(topics.replay(cell), self._on_replay)
        self.route(topics.feature(cell, "+"), self._on_frame("on_feature"))
        self.route(topics.device_status(cell, "+"), self._on_status)
        self.route(topics.cmd(cell, "+"), self._to_all("on_command"))
        if m.fog is not None:
            self.route(topics.fog_answer(cell, "+"), self._on_frame("on_fog_answer"))
            self.route(topics.fog_status(cell, "+"), self._to_all("on_fog_status"))
        self.rollout = None if rollout is None or rollout.store is None else RolloutLink(
            self, tier="gateway", name=gateway, cell=cell, shards=[m.tier_shard("gateway").name], running=m.model_id,
            settings=rollout, trust=trust, clock=clock, prepare=self._prepare, switch=self.models.switch,
            forget=self.models.forget)
        self.every(settings.stats_period_s, self.publish_stats)
        self.every(settings.ack_period_ms / 1000.0, self._flush_acks)
        self.every(PRUNE_EVERY_S, lambda: self.journal.prune(self.clock.time()))
        self.every(RETRY_EVERY_S, self._retry_results)
        if settings.discovery:
            transport.add_connect_listener(lambda: self.submit(self.publish_discovery))

    @property
    def manifest(self):
        return self.logic.manifest

    @property
    def thresholds(self) -> dict[str, float]:
        return self.logic.thresholds

    @property
    def cache(self):
        return self.logic.cache

    def apply(self, actions) -> None:
        """Fog slices go to each node's topic, results are marked sent in the journal once the
        broker has them; the rest as every service publishes them."""
        rest = []
        for a in actions or ():
            if isinstance(a, FogSlice):
                self.send("fog_slice", self.topics.fog_slice(a.cell, a.node), a.payload, [a.event])
            elif isinstance(a, Answer):
                self._publish_result(a.result.event, a.result.to_json())
            else:
                rest.append(a)
        super().apply(rest)

    def _publish_result(self, event: int, payload: bytes) -> None:
        size = self.transport.publish(self.topics.result(self.cell), payload, qos=1,
                                      on_sent=lambda: self.journal.mark_sent([event]))
        if not size:
            self._unpublished.append((event, payload))     # the client refused it (queue full): again soon

    def _retry_results(self) -> None:
        """Publish again the results the client refused (its queue full)."""
        retry, self._unpublished = self._unpublished, []
        for event, payload in retry:
            self._publish_result(event, payload)

    def start(self) -> "Gateway":
        self.log.info("%s: serving model %s, sensors %s, thresholds %s, delivery %s", self.name,
                      self.manifest.model_id, ",".join(self.logic.sensors), self.thresholds, self.settings.delivery)
        unsent = self.journal.unsent()
        if unsent:
            self.log.info("%s: the journal %s holds %d results the broker never acknowledged: publishing them",
                          self.name, self.settings.journal, len(unsent))
            for payload in unsent:
                self._publish_result(json.loads(payload)["event"], payload)
        return super().start()

    def _flush_acks(self) -> None:
        shed, self._shed_since_ack = self._shed_since_ack, 0
        for logic in list(self.models.logics.values()):
            self.apply(logic.take_acks(shed=shed))

    def _on_cloud_result(self, msg):
        """A cloud answer goes to the logic of the model it names (the current one otherwise)."""
        self._follow_schedule()
        model = parse_result(msg.payload, msg.topic).model
        return self.models.logics.get(model, self.logic).on_cloud_result(msg)

    def _on_replay(self, msg):
        """An application asks for the results it may have missed: ``{"client": name, "since":
        capture time}``; they go to its reply topic, then ``{"done": true, "count": n}``. At most
        ``REPLAY_MAX`` results per ``REPLAY_PERIOD_S``, whoever asks: a flood of requests must not
        become a flood of results (or starve the cell's events)."""
        body = json_object(msg.payload, "replay", 'a replay request {"client": name, "since": capture time}',
                           topic=msg.topic)
        client, since = body.get("client"), body.get("since")
        try:
            check_name("client", client)
        except ValueError as exc:
            raise FrameError("replay", str(exc), topic=msg.topic) from None
        if not is_number(since):
            raise FrameError("replay", f"'since' {show(since)} is not a capture time (epoch seconds)", topic=msg.topic)
        now = self.clock.monotonic()
        if now - self._replay_window[0] >= REPLAY_PERIOD_S:
            self._replay_window = [now, 0]
        budget = REPLAY_MAX - self._replay_window[1]
        if budget <= 0:
            raise FrameError("replay", f"more than {REPLAY_MAX} results replayed in {REPLAY_PERIOD_S:.0f}s: ask "
                                       "again later", topic=msg.topic)
        topic = self.topics.replay_reply(self.cell, client)
        results = self.journal.since(float(since), budget)
        self._replay_window[1] += len(results)
        for payload in results:
            self.transport.publish(topic, payload, qos=1)
        self.transport.publish(topic, json.dumps({"done": True, "count": len(results)}).encode(), qos=1)
        self.log.info("%s: replayed %d results since %.3f to %s", self.name, len(results), float(since), client)
        return []

    def next_timer(self) -> float | None:
        return min((t for logic in self.models.logics.values() if (t := logic.next_deadline()) is not None),
                   default=None)

    def on_timer(self, now: float) -> None:
        self._follow_schedule()
        for logic in list(self.models.logics.values()):
            self.apply(self._observe(logic, logic.on_timer(now)))

    # -- model switching (docs/rollout.md) ---------------------------------------------------
    def _build(self, bundle: Bundle) -> GatewayLogic:
        m = bundle.manifest
        runner = WatchedRunner(ShardRunner(bundle.shard_path(m.tier_shard("gateway")), threads=self.settings.threads))
        logic = GatewayLogic(m, runner, cell=self.cell, gateway=self.gateway, settings=self.settings, clock=self.clock,
                             journal=self.journal)
        if hasattr(self, "models"):
            logic.owns = lambda captured, model=m.model_id: self.models.owns(model, captured)
        return logic

    def _prepare(self, bundle: Bundle) -> None:
        """B's logic beside A's: it starts knowing the devices A knows (their rate, who is online)."""
        logic = self._build(bundle)
        if logic.sensors != self.logic.sensors:
            raise ValueError(f"model {bundle.manifest.model_id} has sensors {logic.sensors}, this cell "
                             f"{self.logic.sensors}")
        for device, status in self.logic.roster.devices.items():
            logic.roster.devices[device] = DeviceStatus(status.state, None, status.rate)
        logic.assembler.online = set(self.logic.assembler.online)
        self.logic.owns = lambda captured, model=self.logic.manifest.model_id: self.models.owns(model, captured)
        self.models.add(bundle.manifest.model_id, logic)

    def _follow_schedule(self) -> None:
        logic = self.models.logic_at(self.clock.time())
        if logic is not self.logic:
            self.logic = logic
            self._announce()

    def _announce(self, *, publish: bool = True) -> None:
        model = self.logic.manifest.model_id
        topic = self.topics.gateway_status(self.cell, self.gateway)
        online = lambda: status_payload("online", model=model)  # noqa: E731
        self.presence("gateway_status", topic, online, status_payload("offline", model=model))
        if publish:
            self.send("gateway_status", topic, online())
            self.log.info("%s: events captured now are decided by model %s", self.name, model)

    def _observe(self, logic: GatewayLogic, actions):
        """Feed the health check with what the logic just answered."""
        if self.rollout is not None and actions:
            answers = [a for a in actions if isinstance(a, Answer)]
            failure = logic.runner.take_failure()
            if answers or failure:
                self.rollout.observe(logic.manifest.model_id, len(answers),
                                     degraded=sum(a.result.degraded for a in answers), failure=failure)
        return actions

    def _on_frame(self, method: str):
        sheddable = method in SHEDDABLE

        def handle(msg):
            self._follow_schedule()
            logic = self.models.by_tag(msg.payload) or self.logic
            if sheddable and self.waited_s * 1000.0 > self.settings.shed_after_ms:
                self._shed(logic)
                return []
            return self._observe(logic, getattr(logic, method)(msg))
        return handle

    def _shed(self, logic: GatewayLogic) -> None:
        logic.stats.shed += 1
        self._shed_since_log += 1
        self._shed_since_ack += 1
        now = self.clock.monotonic()
        if now - self._shed_logged_at >= LOG_EVERY_S:
            self.log.warning("%s: behind by %.1fs: %d frames shed unread since the last report (%d in all); the "
                             "devices replay their events", self.name, self.waited_s, self._shed_since_log,
                             logic.stats.shed)
            self._shed_logged_at, self._shed_since_log = now, 0

    def _to_all(self, method: str):
        """A command or a result concerns every model held; the current one's refusal is reported."""
        def handle(msg):
            self._follow_schedule()
            for logic in [lg for lg in self.models.logics.values() if lg is not self.logic]:
                getattr(logic, method)(msg)
            return getattr(self.logic, method)(msg)
        return handle

    def _on_status(self, msg):
        """A device's status goes to the logic of the model it names (to every one when offline)."""
        self._follow_schedule()
        try:
            body = json_object(msg.payload, "status", "a device status")
            model = body.get("model") if body.get("state") == "online" else None
        except FrameError:
            model = None
        if not isinstance(model, str):
            model = None
        if model in self.models.logics:
            return self.models.logics[model].on_status(msg)
        others = [lg for lg in self.models.logics.values() if lg is not self.logic] if model is None else []
        return [a for lg in others for a in lg.on_status(msg) if not isinstance(a, Refuse)] + self.logic.on_status(msg)

    def snapshot(self) -> GatewayStats:
        stats = self.logic.snapshot()
        stats.refused = self.refused
        stats.inbox_dropped = self.inbox_dropped
        stats.bytes_out = self.transport.meter.total()
        stats.bytes_per_event = ratio(stats.bytes_out, stats.events)
        stats.transport = self.transport.stats()
        return stats

    def publish_stats(self) -> None:
        self.send("gateway_stats", self.topics.gateway_stats(self.cell, self.gateway),
                  json.dumps(asdict(self.snapshot())).encode())

    def publish_discovery(self) -> None:
        """The cell's Home Assistant discovery configs, retained (core/discovery.py)."""
        prefix = self.settings.discovery_prefix
        configs = cell_configs(self.topics, prefix=prefix, cell=self.cell, gateway=self.gateway,
                               devices=self.logic.sensors, model=self.manifest.model_id)
        for config in configs:
            self.send("discovery", config.topic, config.payload)
        self.log.info("%s: published %d Home Assistant discovery configs under %s/", self.name, len(configs), prefix)

    def on_stop(self) -> None:
        self._flush_acks()
        self.log.info("%s: stopping; %s", self.name, json.dumps(asdict(self.snapshot())))
