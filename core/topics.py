"""The topic tree, in one place. Everything lives under ``fogsplit/v1/{fleet}``.

:data:`TOPICS` is the table: every kind of topic with its pattern, QoS, retain flag, payload,
publisher and subscribers. Publishers name the kind (``service.send("result", ...)``) and the
table decides the QoS, so a delivery decision is made here once (docs/architecture.md).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

PREFIX = "fogsplit/v1"
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass(frozen=True)
class TopicKind:
    """One kind of topic: where it lives under the fleet's root, and how it is delivered."""

    kind: str
    pattern: str
    qos: int
    retain: bool
    payload: str
    publisher: str
    subscribers: str


TOPICS: dict[str, TopicKind] = {t.kind: t for t in (
    # Data frames: QoS 0 under an MQTT 5 topic alias. A lost packet is handled by the event
    # deadlines exactly like a dead device (docs/architecture.md).
    TopicKind("scores", "cell/{cell}/device/{device}/scores", 0, False, "msgpack frame", "device", "gateway"),
    TopicKind("feature", "cell/{cell}/device/{device}/feature", 0, False, "msgpack frame", "device", "gateway"),
    TopicKind("raw", "cell/{cell}/device/{device}/raw", 0, False, "msgpack frame", "device", "cloud (raw offload)"),
    TopicKind("request", "cell/{cell}/request", 0, False, "msgpack frame", "gateway", "devices of the cell"),
    # Reliable delivery (docs/reliability.md): a device holds each event in its spool until the
    # gateway acks it, and replays what was not acked. Acks are QoS 0: a lost ack costs one
    # replay, which is acked again. Replays are QoS 1: they are what an outage left behind.
    TopicKind("ack", "cell/{cell}/ack", 0, False, "msgpack frame", "gateway", "devices of the cell"),
    TopicKind("late", "cell/{cell}/device/{device}/late", 1, False, "msgpack frame", "device", "gateway"),
    # Hand-overs and answers: QoS 1, full topics (an alias could outlive its connection).
    TopicKind("forward", "cell/{cell}/forward", 1, False, "msgpack frame", "gateway",
              "cloud workers ($share/cloud-{fleet}/...)"),
    TopicKind("result", "cell/{cell}/result", 1, False, "JSON", "gateway",
              "applications, the cell's caches"),
    # The cloud answers the gateway, which publishes the one result of the event: re-forwards
    # and redeliveries may make a worker answer twice, the gateway's journal says it once.
    TopicKind("cloud_result", "cell/{cell}/cloud/result", 1, False, "JSON", "cloud", "the cell's gateway"),
    # An application that lost its session (a broker restarted without it) asks the gateway for
    # the results it may have missed; they come on its own reply topic.
    TopicKind("replay", "cell/{cell}/replay", 1, False, "JSON", "applications", "the cell's gateway"),
    TopicKind("replay_reply", "cell/{cell}/replay/{client}", 1, False, "JSON", "the cell's gateway",
              "the application that asked"),
    # Presence: retained, so a tier that starts later learns who is there; the will sets offline.
    TopicKind("device_status", "cell/{cell}/device/{device}/status", 1, True, "JSON", "device",
              "gateway, raw offload, operators"),
    TopicKind("device_stats", "cell/{cell}/device/{device}/stats", 0, False, "JSON", "device", "operators"),
    TopicKind("gateway_status", "cell/{cell}/gateway/{gateway}/status", 1, True, "JSON", "gateway", "operators"),
    TopicKind("gateway_stats", "cell/{cell}/gateway/{gateway}/stats", 0, False, "JSON", "gateway", "operators"),
    TopicKind("cloud_status", "cloud/{worker}/status", 1, True, "JSON", "cloud", "operators"),
    TopicKind("cloud_stats", "cloud/{worker}/stats", 0, False, "JSON", "cloud", "operators"),
    TopicKind("cmd", "cell/{cell}/cmd/{setting}", 1, False, "JSON", "operator", "gateway, devices"),
    # Over-the-air rollout (docs/rollout.md). The offer is retained: a tier that starts or
    # reconnects later learns the cell's target model and its activation time. Chunks are QoS 1
    # and not retained (each tier subscribes to its own shards' chunks only; a lost one fails
    # the staging, whose sha256 check the chunks need no checksum of their own for); statuses
    # are retained so that the operator's command, and the tier's peers, see the last word.
    TopicKind("rollout", "model/cell/{cell}/rollout", 1, True, "JSON", "operator (fogsplit rollout)",
              "the cell's devices and gateway, cloud workers"),
    TopicKind("rollout_chunk", "model/{model}/shard/{shard}/{index}", 1, False, "bytes", "operator",
              "the tiers that run that shard"),
    TopicKind("rollout_status", "model/cell/{cell}/status/{tier}/{name}", 1, True, "JSON", "every tier",
              "operators, the cell's tiers (a rollback is followed)"),
    TopicKind("error", "error", 1, False, "JSON", "any tier", "operators"),
    # The edge part split over fog nodes (docs/eddl.md): data frames as above, QoS 0, a lost
    # one handled by the gateway's fog deadline; the node's presence retained, its will offline.
    TopicKind("fog_slice", "cell/{cell}/fog/{node}/slice", 0, False, "msgpack frame", "gateway", "that fog node"),
    TopicKind("fog_answer", "cell/{cell}/fog/{node}/answer", 0, False, "msgpack frame", "fog node", "gateway"),
    TopicKind("fog_status", "cell/{cell}/fog/{node}/status", 1, True, "JSON", "fog node", "gateway, operators"),
    # Home Assistant MQTT discovery: outside the fleet's root, under the discovery prefix
    # (a setting, "homeassistant" by default); retained so that Home Assistant finds it on start.
    TopicKind("discovery", "{prefix}/{component}/{node}/{object}/config", 1, True, "JSON", "gateway",
              "Home Assistant"),
)}


def check_name(what: str, value: str) -> str:
    """A fleet, cell, device or gateway name: no MQTT wildcards or separators."""
    if not isinstance(value, str) or not _NAME.match(value):
        raise ValueError(f"{what} name {value!r} must be 1-64 of letters, digits, '_', '.', '-'")
    return value


@dataclass(frozen=True)
class Topics:
    """Builds every topic of one fleet."""

    fleet: str = "demo"

    def __post_init__(self) -> None:
        check_name("fleet", self.fleet)

    @property
    def root(self) -> str:
        return f"{PREFIX}/{self.fleet}"

    def topic(self, kind: str, **names: str) -> str:
        """The topic of ``kind`` in :data:`TOPICS` with its placeholders filled: every builder
        below goes through here, so the table is the one place a topic is spelt."""
        return f"{self.root}/{TOPICS[kind].pattern.format(**names)}"

    def device_status(self, cell: str, device: str) -> str:
        return self.topic("device_status", cell=cell, device=device)

    def scores(self, cell: str, device: str) -> str:
        return self.topic("scores", cell=cell, device=device)

    def feature(self, cell: str, device: str) -> str:
        return self.topic("feature", cell=cell, device=device)

    def raw(self, cell: str, device: str) -> str:
        return self.topic("raw", cell=cell, device=device)

    def request(self, cell: str) -> str:
        return self.topic("request", cell=cell)

    def forward(self, cell: str) -> str:
        return self.topic("forward", cell=cell)

    def result(self, cell: str) -> str:
        return self.topic("result", cell=cell)

    def ack(self, cell: str) -> str:
        return self.topic("ack", cell=cell)

    def late(self, cell: str, device: str) -> str:
        return self.topic("late", cell=cell, device=device)

    def cloud_result(self, cell: str) -> str:
        return self.topic("cloud_result", cell=cell)

    def replay(self, cell: str) -> str:
        return self.topic("replay", cell=cell)

    def replay_reply(self, cell: str, client: str) -> str:
        return self.topic("replay_reply", cell=cell, client=client)

    def gateway_status(self, cell: str, gateway: str) -> str:
        return self.topic("gateway_status", cell=cell, gateway=gateway)

    def gateway_stats(self, cell: str, gateway: str) -> str:
        return self.topic("gateway_stats", cell=cell, gateway=gateway)

    def device_stats(self, cell: str, device: str) -> str:
        return self.topic("device_stats", cell=cell, device=device)

    def cloud_status(self, worker: str) -> str:
        return self.topic("cloud_status", worker=worker)

    def cloud_stats(self, worker: str) -> str:
        return self.topic("cloud_stats", worker=worker)

    def cmd(self, cell: str, setting: str) -> str:
        return self.topic("cmd", cell=cell, setting=setting)

    def rollout(self, cell: str) -> str:
        return self.topic("rollout", cell=cell)

    def rollout_chunk(self, model: str, shard: str, index: int | str) -> str:
        return self.topic("rollout_chunk", model=model, shard=shard, index=str(index))

    def rollout_status(self, cell: str, tier: str, name: str) -> str:
        return self.topic("rollout_status", cell=cell, tier=tier, name=name)

    def fog_slice(self, cell: str, node: str) -> str:
        return self.topic("fog_slice", cell=cell, node=node)

    def fog_answer(self, cell: str, node: str) -> str:
        return self.topic("fog_answer", cell=cell, node=node)

    def fog_status(self, cell: str, node: str) -> str:
        return self.topic("fog_status", cell=cell, node=node)

    @property
    def error(self) -> str:
        return self.topic("error")

    def shared(self, group: str, topic: str) -> str:
        """A shared subscription: the broker hands each message to one member of ``group``."""
        return f"$share/{group}/{topic}"


def device_of(topic: str) -> str:
    """The device name in a ``.../device/{dev}/{leaf}`` topic."""
    parts = topic.split("/")
    return parts[-2]


def cell_of(topic: str) -> str:
    """The cell name in a ``.../cell/{cell}/...`` topic."""
    parts = topic.split("/")
    return parts[parts.index("cell") + 1]
