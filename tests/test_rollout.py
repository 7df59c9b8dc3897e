"""Over-the-air rollout end to end on a real broker: a stack runs bundle A while events stream,
``fogsplit rollout`` ships B; every tier reports B active and healthy, every event sent gets
exactly one result, from A before the switch and from B after it. A tampered B and a B signed
by an unknown key are refused and A keeps serving; a B whose gateway shard outputs NaN fails its
health check and the cell rolls itself back."""
from __future__ import annotations

import dataclasses
import json
import shutil
import threading
import time
from collections import Counter
from pathlib import Path

import msgpack
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fogsplit.cli import main
from fogsplit.cloud.worker import CloudWorker
from fogsplit.core.frames import unwrap_slot
from fogsplit.core.manifest import load_bundle, parse_manifest, sha256_file, write_manifest
from fogsplit.core.mqtt import MqttTransport, wait_until
from fogsplit.core.results import Result
from fogsplit.core.rollout import Trust
from fogsplit.core.settings import DeviceSettings, GatewaySettings, RolloutSettings
from fogsplit.core.signing import load_public_key, new_key_pair, sign_bundle
from fogsplit.core.topics import Topics
from fogsplit.device.agent import DeviceAgent
from fogsplit.device.sources import ReplaySource
from fogsplit.gateway.gateway import Gateway

pytestmark = pytest.mark.slow

CELL = "c0"
RATE = 10.0


def make_b(bundle_dir: Path, out: Path, key: Path, *, dataset: str, thresholds: dict | None = None,
           gateway_onnx: bytes | None = None) -> Path:
    """A's directory with another data set name (so another model id), re-signed."""
    shutil.copytree(bundle_dir, out)
    m = parse_manifest(json.loads((out / "manifest.json").read_text()))
    shards = m.shards
    if gateway_onnx is not None:
        (out / m.tier_shard("gateway").file).write_bytes(gateway_onnx)
        shards = tuple(dataclasses.replace(s, sha256=sha256_file(out / s.file)) if s.tier == "gateway" else s
                       for s in shards)
    write_manifest(dataclasses.replace(m, dataset=dataset, shards=shards, thresholds=thresholds or m.thresholds), out)
    sign_bundle(out, key)
    return out


def nan_gateway(bundle_dir: Path) -> bytes:
    """A gateway shard with the real one's inputs and outputs that answers NaN."""
    m = parse_manifest(json.loads((bundle_dir / "manifest.json").read_text()))
    spec = m.tier_shard("gateway")
    (name, shape), = spec.inputs.items()
    width = int(np.prod(shape[1:]))
    nodes, outputs, inits = [helper.make_node("Flatten", [name], ["flat"], axis=1)], [], []
    for out, out_shape in spec.outputs.items():
        size = int(np.prod(out_shape[1:]))
        inits += [numpy_helper.from_array(np.full((width, size), np.nan, np.float32), f"w_{out}"),
                  numpy_helper.from_array(np.array([-1, *out_shape[1:]], np.int64), f"s_{out}")]
        nodes += [helper.make_node("MatMul", ["flat", f"w_{out}"], [f"m_{out}"]),
                  helper.make_node("Reshape", [f"m_{out}", f"s_{out}"], [out])]
        outputs.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, ["batch", *out_shape[1:]]))
    graph = helper.make_graph(nodes, "nan_gateway",
                              [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", *shape[1:]])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


class Stack:
    """Cloud worker, gateway and one agent per sensor, each with its own bundle store; an app that
    records results, the slots every device sent, and the rollout statuses."""

    def __init__(self, bundle, url: str, root: Path, trust: Trust) -> None:
        self.url, self.bundle = url, bundle
        self.topics = Topics(f"ro{time.monotonic_ns() % 10**7}")
        self.lock = threading.Lock()
        self.results: list[Result] = []
        self.sent: set[int] = set()
        self.rollout: dict[str, dict] = {}
        self.app = MqttTransport(url, f"app-{self.topics.fleet}")
        self.app.subscribe(self.topics.result(CELL), self._on_result)
        self.app.subscribe(self.topics.scores(CELL, "+"), self._on_scores)
        self.app.subscribe(self.topics.rollout_status(CELL, "+", "+"), self._on_status)
        self.app.connect()

        def rollout(name: str) -> dict:
            return {"rollout": RolloutSettings(store=str(root / name), health_events=5, health_s=3.0, drain_s=5.0),
                    "trust": trust}

        self.services = [CloudWorker(MqttTransport(url, f"cloud-{self.topics.fleet}"), self.topics, bundle,
                                     **rollout("cloud"))]
        self.services.append(Gateway(MqttTransport(url, f"gw-{self.topics.fleet}"), self.topics, bundle, cell=CELL,
                                     settings=GatewaySettings(deadline_ms=400, feature_deadline_ms=400),
                                     **rollout("gw")))
        samples = np.zeros((4, *bundle.manifest.sensors[0].shape), np.float32)
        for i, s in enumerate(bundle.manifest.sensor_names):
            self.services.append(DeviceAgent(
                MqttTransport(url, f"{s}-{self.topics.fleet}"), self.topics, bundle, cell=CELL, device=s,
                source=ReplaySource(samples + i, rate=RATE, loop=True), settings=DeviceSettings(rate=RATE),
                **rollout(s)))
        for service in self.services:
            service.transport.connect()
            service.start()

    def _on_result(self, msg) -> None:
        with self.lock:
            self.results.append(Result.from_json(msg.payload))

    def _on_scores(self, msg) -> None:
        slot = msgpack.unpackb(msg.payload)[1]
        with self.lock:
            self.sent.add(unwrap_slot(slot, round(time.time() * RATE)))

    def _on_status(self, msg) -> None:
        body = json.loads(msg.payload)
        with self.lock:
            self.rollout[f"{body['tier']}/{body['name']}"] = body

    def results_after(self, t: float) -> list[Result]:
        everyone = self.bundle.manifest.sensor_names
        with self.lock:
            return [r for r in self.results if r.captured > t and r.devices == everyone]

    def ship(self, bundle: Path, timeout_s: float = 60) -> int:
        return main(["rollout", "--bundle", str(bundle), "--cell", CELL, "--broker", self.url, "--fleet",
                     self.topics.fleet, "--lead-s", "2", "--timeout-s", str(timeout_s)])

    def components(self) -> set[str]:
        return {"cloud/cloud0", "gateway/gw0", *(f"device/{s}" for s in self.bundle.manifest.sensor_names)}

    def close(self) -> None:
        for service in reversed(self.services):
            service.stop(timeout=2)
            service.transport.close()
        self.app.close()


@pytest.fixture
def trust(trusted_keys) -> Trust:
    return Trust([load_public_key(k) for k in trusted_keys])


@pytest.fixture
def stack(mosquitto, bundle_dir, trust, tmp_path):
    stack = Stack(load_bundle(bundle_dir, trusted_keys=trust.keys), mosquitto, tmp_path / "stores", trust)
    assert wait_until(lambda: len(stack.results_after(0)) >= 3, timeout=30)
    yield stack
    stack.close()


def test_rollout_switches_every_tier_to_b_and_no_event_is_lost_or_duplicated(stack, bundle_dir, signing_key,
                                                                              tmp_path):
    a = stack.bundle.manifest.model_id
    b_dir = make_b(bundle_dir, tmp_path / "b", signing_key[0], dataset="rollout-b")
    b = load_bundle(b_dir, trusted_keys=[signing_key[1]]).manifest.model_id
    assert b != a
    assert stack.ship(b_dir) == 0
    statuses = dict(stack.rollout)
    assert set(statuses) == stack.components()
    assert all(s["model"] == b and s["state"] == "active" and s["health"] == "ok" for s in statuses.values()), statuses
    switched = statuses["gateway/gw0"]["active_from"]
    assert wait_until(lambda: len(stack.results_after(switched + 1)) >= 5, timeout=20)
    end = time.time()
    with stack.lock:
        sent = {e for e in stack.sent if e / RATE < end}
    assert wait_until(lambda: sent <= {r.event for r in list(stack.results)}, timeout=10), \
        sorted(sent - {r.event for r in stack.results})[:10]
    with stack.lock:
        counts = Counter(r.event for r in stack.results)
        results = list(stack.results)
    assert [e for e, n in counts.items() if n > 1] == []
    assert {r.model for r in results if r.captured >= switched} == {b}
    assert {r.model for r in results if r.captured < switched} == {a}
    assert any(r.captured < switched for r in results)
    gateway = stack.services[1]
    assert gateway.manifest.model_id == b
    assert (tmp_path / "stores" / "gw" / "active").read_text().strip() == b


def test_a_tampered_b_and_a_b_of_an_unknown_key_are_refused_and_a_keeps_serving(stack, bundle_dir, signing_key,
                                                                                tmp_path):
    a = stack.bundle.manifest.model_id
    tampered = make_b(bundle_dir, tmp_path / "tampered", signing_key[0], dataset="rollout-tampered")
    body = json.loads((tampered / "manifest.json").read_text())
    body["thresholds"]["local"] = 0.125          # a threshold edited after signing: the model id is the same
    (tampered / "manifest.json").write_text(json.dumps(body, indent=2) + "\n")
    stranger, _ = new_key_pair(tmp_path / "stranger", "stranger")
    unknown = make_b(bundle_dir, tmp_path / "unknown", stranger, dataset="rollout-unknown")
    for path, reason in ((tampered, "tampered"), (unknown, "unknown key")):
        model = json.loads((path / "manifest.json").read_text())["model_id"]
        assert stack.ship(path, timeout_s=30) == 1
        assert wait_until(lambda: {k for k, s in stack.rollout.items() if s["model"] == model} == stack.components(),
                          timeout=20)
        statuses = [s for s in stack.rollout.values() if s["model"] == model]
        assert all(s["state"] == "refused" and s["reason"].startswith(reason) for s in statuses), statuses
        t = time.time()
        assert wait_until(lambda: len(stack.results_after(t)) >= 5, timeout=20)
        assert {r.model for r in stack.results_after(t)} == {a}


def test_a_b_failing_its_health_check_is_rolled_back_by_the_cell_itself(stack, bundle_dir, signing_key, tmp_path):
    a = stack.bundle.manifest.model_id
    broken = make_b(bundle_dir, tmp_path / "nan", signing_key[0], dataset="rollout-nan",
                    thresholds={"local": 0.0, "edge": 0.0}, gateway_onnx=nan_gateway(bundle_dir))
    assert stack.ship(broken) == 1
    assert wait_until(lambda: stack.rollout.get("gateway/gw0", {}).get("state") == "rolled-back", timeout=20)
    gateway = stack.rollout["gateway/gw0"]
    assert "non-finite" in gateway["reason"] and gateway["active"] == a
    assert wait_until(lambda: all(s["state"] == "rolled-back" for s in stack.rollout.values()), timeout=20), \
        stack.rollout
    back = gateway["revert_at"] + 1
    assert wait_until(lambda: len(stack.results_after(back)) >= 5, timeout=20)
    assert {r.model for r in stack.results_after(back)} == {a}
    with stack.lock:
        counts = Counter(r.event for r in stack.results)
    assert [e for e, n in counts.items() if n > 1] == []
