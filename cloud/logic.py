"""The cloud tier as plain objects: forwarded events (or raw samples) in, results out.

:class:`CloudLogic` runs the last shard on the events no lower tier could answer; workers are
stateless, so any number of them share the forward topics. Its answer goes back to the cell's
gateway (``cloud_result``), which publishes the event's one result: a forward sent twice (the
gateway's retry, or the broker's redelivery to another worker) may be answered twice here. :class:`RawOffloadLogic` is the
baseline fogsplit is measured against: devices send raw samples and the whole network runs
here. No MQTT and no threads: the services in cloud/worker.py publish what these return.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fogsplit.core.actions import Action, Answer, refusing
from fogsplit.core.assembly import Assembler, Event
from fogsplit.core.clock import Clock
from fogsplit.core.frames import decode_frame
from fogsplit.core.fusion import fuse
from fogsplit.core.manifest import Manifest, expect_frames
from fogsplit.core.metrics import Rate, Window
from fogsplit.core.results import make_result
from fogsplit.core.roster import Roster, decode_device_frame, parse_status
from fogsplit.core.runner import ShardRunner
from fogsplit.core.topics import cell_of, device_of
from fogsplit.core.transport import Message


def cloud_stage(runner: ShardRunner, edge_feature: np.ndarray) -> np.ndarray:
    """The cloud shard on one forwarded feature: final logits."""
    return runner.run(edge_feature=edge_feature[None])["logits"][0]


def whole_network(runners: dict[str, ShardRunner], samples: dict[str, np.ndarray], sensors: list[str],
                  edge_fusion: str) -> np.ndarray:
    """Every shard in one place on raw samples: the cloud-only model's final logits."""
    features = {d: runners[d].run(x=np.asarray(x, dtype=np.float32)[None])["feature"][0]
                for d, x in samples.items()}
    fused = fuse(features, sensors, edge_fusion)
    edge = runners["gateway"].run(fused=fused[None])["edge_feature"][0]
    return runners["cloud"].run(edge_feature=edge[None])["logits"][0]


@dataclass
class CloudStats:
    """The snapshot published on ``cloud/{worker}/stats`` (fields: docs/monitoring.md)."""

    worker: str
    model: str
    time: float = 0.0
    answered: int = 0                         # forwarded events answered
    events_per_s: float = 0.0                 # answered per second since the last snapshot
    latency_ms: dict[str, float | None] = field(default_factory=dict)   # capture to answer: p50, p99
    refused: int = 0
    inbox_dropped: int = 0
    transport: dict = field(default_factory=dict)


class CloudLogic:
    def __init__(self, manifest: Manifest, runner: ShardRunner, *, clock: Clock) -> None:
        self.manifest, self.runner, self.clock = manifest, runner, clock
        self.expect = expect_frames(manifest)
        self.answered = 0
        self.latency = Window()
        self.rate = Rate(0, clock.monotonic())

    @refusing
    def on_forward(self, msg: Message) -> list[Action]:
        frame = decode_frame(msg.payload, "forward", self.expect, topic=msg.topic)
        logits = cloud_stage(self.runner, frame.tensor)
        result = make_result(logits, event=frame.event, exit="cloud", classes=self.manifest.classes,
                             devices=list(frame.devices), captured=frame.captured, model=self.manifest.model_id,
                             now=self.clock.time())
        self.answered += 1
        self.latency.add(result.latency_ms)
        return [Answer(cell_of(msg.topic), result, kind="cloud_result")]

    def snapshot(self, worker: str) -> CloudStats:
        """The counters now, the rate since the last snapshot; the service adds refused and inbox."""
        return CloudStats(worker=worker, model=self.manifest.model_id, time=round(self.clock.time(), 3),
                          answered=self.answered, events_per_s=self.rate.per_second(self.answered,
                                                                                    self.clock.monotonic()),
                          latency_ms=self.latency.percentiles(50, 99))


class RawOffloadLogic:
    """Cloud-only baseline: assemble each cell's raw samples per event, run the whole network."""

    def __init__(self, manifest: Manifest, runners: dict[str, ShardRunner], *, deadline_s: float,
                 clock: Clock) -> None:
        self.manifest, self.runners, self.deadline_s, self.clock = manifest, runners, deadline_s, clock
        self.sensors = manifest.sensor_names
        self.expect = expect_frames(manifest)
        self.cells: dict[str, Assembler] = {}
        self.rosters: dict[str, Roster] = {}

    def _roster(self, cell: str) -> Roster:
        return self.rosters.setdefault(cell, Roster(self.manifest.model_id))

    @refusing
    def on_status(self, msg: Message) -> list[Action]:
        device = device_of(msg.topic)
        if device in self.sensors:
            self._roster(cell_of(msg.topic)).update(device, parse_status(msg.payload, device, msg.topic))
        return []

    @refusing
    def on_raw(self, msg: Message) -> list[Action]:
        cell = cell_of(msg.topic)
        got = decode_device_frame(msg.payload, msg.topic, self.expect, self._roster(cell), self.clock.time())
        assembler = self.cells.setdefault(cell, Assembler(self.sensors, self.deadline_s))
        ev = assembler.add(got.event, got.device, got.frame.tensor, got.captured, self.clock.monotonic())
        return self._answer(cell, ev) if ev is not None else []

    def next_deadline(self) -> float | None:
        return min((t for a in self.cells.values() if (t := a.next_deadline()) is not None), default=None)

    def on_timer(self, now: float) -> list[Action]:
        return [a for cell, assembler in self.cells.items() for ev in assembler.expired(now)
                for a in self._answer(cell, ev)]

    def _answer(self, cell: str, ev: Event) -> list[Action]:
        logits = whole_network(self.runners, ev.parts, self.sensors, self.manifest.edge_fusion)
        result = make_result(logits, event=ev.event, exit="cloud", classes=self.manifest.classes,
                             devices=ev.devices, captured=ev.captured, model=self.manifest.model_id,
                             now=self.clock.time())
        self.cells[cell].finish(ev.event)
        return [Answer(cell, result)]
