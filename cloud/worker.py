"""The cloud tier: the last shard for the events no lower tier could answer.

Workers are stateless and share the forward topics through a shared subscription, so more
workers means more throughput. :class:`RawOffload` is the baseline fogsplit is measured
against: devices send raw samples and the whole network runs here.
"""
from __future__ import annotations

import time

import numpy as np

from fogsplit.core.assembly import Assembler, Event
from fogsplit.core.frames import decode_frame
from fogsplit.core.fusion import fuse
from fogsplit.core.manifest import Bundle, expect_frames
from fogsplit.core.transport import Message, Transport
from fogsplit.core.results import make_result
from fogsplit.core.roster import Roster, decode_device_frame, parse_status
from fogsplit.core.runner import ShardRunner
from fogsplit.core.service import Service, status_payload
from fogsplit.core.topics import Topics, cell_of, device_of


def cloud_stage(runner: ShardRunner, edge_feature: np.ndarray) -> np.ndarray:
    """The cloud shard on one forwarded feature: final logits."""
    return runner.run(edge_feature=edge_feature[None])["logits"][0]


class CloudWorker(Service):
    def __init__(self, transport: Transport, topics: Topics, bundle: Bundle, *, worker: str = "cloud0",
                 threads: int = 1) -> None:
        super().__init__(transport, topics, f"cloud/{worker}")
        self.worker = worker
        self.manifest = bundle.manifest
        self.runner = ShardRunner(bundle.shard_path(self.manifest.tier_shard("cloud")), threads=threads)
        self.expect = expect_frames(self.manifest)
        self.answered = 0
        self.route(topics.shared("cloud", topics.forward("+")), self.on_forward)

    def start(self) -> "CloudWorker":
        self.transport.publish(self.topics.cloud_status(self.worker),
                               status_payload("online", model=self.manifest.model_id), retain=True)
        self.log.info("%s: online, model %s", self.name, self.manifest.model_id)
        return super().start()

    def on_forward(self, msg: Message) -> None:
        frame = decode_frame(msg.payload, "forward", self.expect, topic=msg.topic)
        logits = cloud_stage(self.runner, frame.tensor)
        result = make_result(logits, event=frame.event, exit="cloud", classes=self.manifest.classes,
                             devices=list(frame.devices), captured=frame.captured, model=self.manifest.model_id)
        self.transport.publish(self.topics.result(cell_of(msg.topic)), result.to_json())
        self.answered += 1

    def on_stop(self) -> None:
        self.transport.publish(self.topics.cloud_status(self.worker), status_payload("offline"), retain=True)
        self.log.info("%s: offline after %d answers", self.name, self.answered)


def whole_network(runners: dict[str, ShardRunner], samples: dict[str, np.ndarray], sensors: list[str],
                  edge_fusion: str) -> np.ndarray:
    """Every shard in one place on raw samples: the cloud-only model's final logits."""
    features = {d: runners[d].run(x=np.asarray(x, dtype=np.float32)[None])["feature"][0]
                for d, x in samples.items()}
    fused = fuse(features, sensors, edge_fusion)
    edge = runners["gateway"].run(fused=fused[None])["edge_feature"][0]
    return runners["cloud"].run(edge_feature=edge[None])["logits"][0]


class RawOffload(Service):
    """Cloud-only baseline: assemble raw samples per event and run the whole network."""

    def __init__(self, transport: Transport, topics: Topics, bundle: Bundle, *, deadline_ms: float = 250.0,
                 threads: int = 1) -> None:
        super().__init__(transport, topics, "cloud/raw")
        m = self.manifest = bundle.manifest
        self.sensors = m.sensor_names
        self.runners = {s: ShardRunner(bundle.shard_path(m.device_shard(s)), threads=threads) for s in self.sensors}
        self.runners["gateway"] = ShardRunner(bundle.shard_path(m.tier_shard("gateway")), threads=threads)
        self.runners["cloud"] = ShardRunner(bundle.shard_path(m.tier_shard("cloud")), threads=threads)
        self.expect = expect_frames(m)
        self.cells: dict[str, Assembler] = {}
        self.deadline_s = deadline_ms / 1000.0
        self.rosters: dict[str, Roster] = {}
        self.route(topics.raw("+", "+"), self.on_raw)
        self.route(topics.device_status("+", "+"), self.on_device_status)

    def on_device_status(self, msg: Message) -> None:
        device = device_of(msg.topic)
        if device in self.sensors:
            roster = self.rosters.setdefault(cell_of(msg.topic), Roster(self.manifest.model_id))
            roster.update(device, parse_status(msg.payload, device, msg.topic))

    def on_raw(self, msg: Message) -> None:
        cell = cell_of(msg.topic)
        roster = self.rosters.setdefault(cell, Roster(self.manifest.model_id))
        got = decode_device_frame(msg.payload, msg.topic, self.expect, roster)
        assembler = self.cells.setdefault(cell, Assembler(self.sensors, self.deadline_s))
        ev = assembler.add(got.event, got.device, got.frame.tensor, got.captured, time.monotonic())
        if ev is not None:
            self._answer(cell, ev)

    def next_timer(self) -> float | None:
        return min((t for a in self.cells.values() if (t := a.next_deadline()) is not None), default=None)

    def on_timer(self, now: float) -> None:
        for cell, assembler in self.cells.items():
            for ev in assembler.expired(now):
                self._answer(cell, ev)

    def _answer(self, cell: str, ev: Event) -> None:
        logits = whole_network(self.runners, ev.parts, self.sensors, self.manifest.edge_fusion)
        result = make_result(logits, event=ev.event, exit="cloud", classes=self.manifest.classes,
                             devices=ev.devices, captured=ev.captured, model=self.manifest.model_id)
        self.transport.publish(self.topics.result(cell), result.to_json())
        self.cells[cell].finish(ev.event)
