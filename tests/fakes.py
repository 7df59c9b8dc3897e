"""A small manifest and a scripted shard runner, for broker-free tests of the tiers' logic."""
from __future__ import annotations

import json

import numpy as np

from fogsplit.core.codecs import CodecSpec
from fogsplit.core.frames import FEATURE, GONE, SCORES, encode_events_frame, encode_slot_frame
from fogsplit.core.manifest import Manifest, SensorSpec, ShardSpec
from fogsplit.core.transport import Message
from fogsplit.core.topics import Topics

SENSORS = ("cam0", "cam1", "cam2")
CLASSES = ("circle", "square", "cross")
FEATURE_SHAPE = [2, 2, 2]
RATE = 10.0
TOPICS = Topics("t")
CELL = "c0"


def manifest(model: str = "m1") -> Manifest:
    sensors = tuple(SensorSpec(s, "image", (1, 8, 8), "float32") for s in SENSORS)
    shards = tuple(ShardSpec(f"device-{s}", "device", f"{s}.onnx", "0" * 64, {"x": ["batch", 1, 8, 8]},
                             {"scores": ["batch", 3], "feature": ["batch", *FEATURE_SHAPE]}, sensor=s)
                   for s in SENSORS)
    shards += (ShardSpec("gateway", "gateway", "gateway.onnx", "0" * 64, {"fused": ["batch", 6, 2, 2]},
                         {"logits": ["batch", 3], "edge_feature": ["batch", 4]}),
               ShardSpec("cloud", "cloud", "cloud.onnx", "0" * 64, {"edge_feature": ["batch", 4]},
                         {"logits": ["batch", 3]}))
    return Manifest(model_id=model, classes=CLASSES, sensors=sensors, shards=shards, local_fusion="max",
                    edge_fusion="concat", thresholds={"local": 0.5, "edge": 0.5},
                    codecs={"scores": CodecSpec("fp32"), "feature": CodecSpec("fp32"),
                            "forward": CodecSpec("fp32")})


def confident(label: int, strength: float = 12.0) -> np.ndarray:
    logits = np.zeros(len(CLASSES), np.float32)
    logits[label] = strength
    return logits


UNSURE = np.zeros(len(CLASSES), np.float32)


class ScriptedRunner:
    """A shard runner whose outputs the test sets; records what it was run on."""

    def __init__(self, **outputs: np.ndarray) -> None:
        self.outputs = outputs
        self.calls: list[dict] = []

    def run(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        self.calls.append(inputs)
        return {k: np.asarray(v)[None] for k, v in self.outputs.items()}


def status(device: str, state: str = "online", model: str = "m1", rate: float | None = RATE) -> Message:
    body = {"state": state, "model": model, **({"rate": rate} if rate is not None else {})}
    return Message(TOPICS.device_status(CELL, device), json.dumps(body).encode(), retain=True)


def scores(device: str, event: int, logits: np.ndarray, *, model: str = "m1", vote: int | None = None,
           feature: np.ndarray | None = None) -> Message:
    payload = encode_slot_frame(SCORES, model=model, event=event, tensor=logits, codec=CodecSpec("fp32"),
                                vote=vote, feature=feature, feature_codec=CodecSpec("fp32"))
    return Message(TOPICS.scores(CELL, device), payload)


def feature(device: str, event: int, value: float = 1.0) -> Message:
    payload = encode_slot_frame(FEATURE, model="m1", event=event, tensor=np.full(FEATURE_SHAPE, value, np.float32),
                                codec=CodecSpec("fp32"))
    return Message(TOPICS.feature(CELL, device), payload)


def gone(device: str, *events: int) -> Message:
    return Message(TOPICS.feature(CELL, device), encode_events_frame(GONE, model="m1", events=list(events)))
