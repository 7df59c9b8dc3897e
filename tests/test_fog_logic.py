"""The fog node's logic and the gateway's side of the fog nodes, broker-free, on a FakeClock:
slices out, answers in, the ensemble of the nodes that answered, a lost node, the deadline."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from fakes import CELL, SENSORS, TOPICS, UNSURE, ScriptedRunner, confident, feature, manifest, scores, status
from fogsplit.core.actions import Answer, Forward, Refuse, RequestFeatures
from fogsplit.core.clock import FakeClock
from fogsplit.core.codecs import CodecSpec
from fogsplit.core.frames import FOG_ANSWER, FOG_SLICE, decode_frame, encode_fog_frame
from fogsplit.core.manifest import FogNodeSpec, FogSpec, ShardSpec, expect_fog
from fogsplit.core.settings import GatewaySettings
from fogsplit.core.transport import Message
from fogsplit.fog.logic import FogAnswer, FogNodeLogic
from fogsplit.gateway.fog import FogSlice
from fogsplit.gateway.logic import GatewayLogic

NODES = ("fog0", "fog1")
CHANNELS = {"fog0": (0, 1, 2, 3), "fog1": (2, 3, 4, 5)}   # of the fused [6, 2, 2]
FEATURES = {"fog0": (0, 1), "fog1": (2, 3)}                # of the edge feature [4]


def fog_manifest():
    m = manifest()
    shards = tuple(ShardSpec(n, "fog", f"{n}.onnx", "0" * 64, {"slice": ["batch", 4, 2, 2]},
                             {"logits": ["batch", 3], "feature": ["batch", 2]}) for n in NODES)
    fog = FogSpec(design="test", slice_codec=CodecSpec("fp32"), answer_codec=CodecSpec("fp32"),
                  nodes=tuple(FogNodeSpec(n, n, CHANNELS[n], FEATURES[n]) for n in NODES))
    return replace(m, shards=m.shards + shards, fog=fog)


def slice_msg(node: str, event: int, value: float = 1.0) -> Message:
    payload = encode_fog_frame(FOG_SLICE, model="m1", event=event, tensor=np.full((4, 2, 2), value, np.float32),
                               codec=CodecSpec("fp32"))
    return Message(TOPICS.fog_slice(CELL, node), payload)


def answer_msg(node: str, event: int, logits, feature_value: float = 1.0, model: str = "m1") -> Message:
    payload = encode_fog_frame(FOG_ANSWER, model=model, event=event, logits=logits,
                               tensor=np.full(2, feature_value, np.float32), codec=CodecSpec("fp32"))
    return Message(TOPICS.fog_answer(CELL, node), payload)


def node_status(node: str, state: str) -> Message:
    return Message(TOPICS.fog_status(CELL, node), json.dumps({"state": state, "model": "m1"}).encode(), retain=True)


# -- the node ---------------------------------------------------------------------------------

def test_a_node_answers_its_slice_with_its_logits_and_feature():
    runner = ScriptedRunner(logits=confident(1), feature=np.array([0.5, 2.0], np.float32))
    logic = FogNodeLogic(fog_manifest(), runner, node="fog1", clock=FakeClock())
    (answer,) = logic.on_slice(slice_msg("fog1", 123456789, 0.25))
    assert isinstance(answer, FogAnswer) and (answer.cell, answer.node, answer.event) == (CELL, "fog1", 123456789)
    assert runner.calls[0]["slice"].shape == (1, 4, 2, 2) and np.all(runner.calls[0]["slice"] == 0.25)
    frame = decode_frame(answer.payload, "answer", expect_fog(fog_manifest(), "fog1"))
    assert frame.event == 123456789 and frame.tensor.argmax() == 1 and frame.feature.tolist() == [0.5, 2.0]
    assert logic.snapshot().answered == 1


@pytest.mark.parametrize("payload,rule", [
    (b"\x93not msgpack", "msgpack"),
    (encode_fog_frame(FOG_SLICE, model="other", event=1, tensor=np.zeros((4, 2, 2)), codec=CodecSpec("fp32")), "model"),
    (encode_fog_frame(FOG_SLICE, model="m1", event=1, tensor=np.zeros((3, 2, 2)), codec=CodecSpec("fp32")), "payload"),
    (encode_fog_frame(FOG_SLICE, model="m1", event=1, tensor=np.full((4, 2, 2), np.nan), codec=CodecSpec("fp32")),
     "finite"),
])
def test_a_bad_slice_is_refused_not_raised(payload, rule):
    runner = ScriptedRunner(logits=confident(1), feature=np.zeros(2, np.float32))
    logic = FogNodeLogic(fog_manifest(), runner, node="fog0", clock=FakeClock())
    (refused,) = logic.on_slice(Message(TOPICS.fog_slice(CELL, "fog0"), payload))
    assert isinstance(refused, Refuse) and refused.error.rule == rule, refused
    assert runner.calls == []


def test_a_node_of_a_bundle_without_fog_nodes_is_refused():
    with pytest.raises(ValueError, match="no fog section"):
        FogNodeLogic(manifest(), ScriptedRunner(), node="fog0", clock=FakeClock())


# -- the gateway ------------------------------------------------------------------------------

def gateway(edge_logits=None):
    clock = FakeClock()
    runner = ScriptedRunner(logits=confident(2) if edge_logits is None else edge_logits,
                            edge_feature=np.arange(4, dtype=np.float32))
    logic = GatewayLogic(fog_manifest(), runner, cell=CELL, gateway="gw0", clock=clock,
                         settings=GatewaySettings(deadline_ms=200, feature_deadline_ms=400, fog_deadline_ms=100))
    for device in SENSORS:
        logic.on_status(status(device))
    return logic, clock, runner


def to_fog(logic, clock, value: float = 1.0) -> tuple[int, list[FogSlice]]:
    """An unsure event whose features arrive: the gateway sends the nodes their slices."""
    event = round(clock.time() * 10)
    for device in SENSORS[:2]:
        logic.on_scores(scores(device, event, UNSURE))
    assert isinstance(logic.on_scores(scores("cam2", event, UNSURE))[0], RequestFeatures)
    for device in SENSORS[:2]:
        assert logic.on_feature(feature(device, event, value)) == []
    slices = logic.on_feature(feature("cam2", event, value))
    return event, slices


def test_the_gateway_sends_each_node_its_slice_and_answers_with_the_ensemble():
    logic, clock, runner = gateway()
    event, slices = to_fog(logic, clock)
    assert [(s.node, s.event) for s in slices] == [("fog0", event), ("fog1", event)]
    for s in slices:
        node_logic = FogNodeLogic(fog_manifest(), ScriptedRunner(logits=confident(0), feature=np.zeros(2)),
                                  node=s.node, clock=clock)
        frame = decode_frame(s.payload, "slice", node_logic.expect)
        assert frame.event == event and frame.tensor.shape == (4, 2, 2)
    assert logic.on_fog_answer(answer_msg("fog0", event, confident(1, 8.0))) == []
    (answer,) = logic.on_fog_answer(answer_msg("fog1", event, confident(1, 4.0)))
    r = answer.result
    assert (r.exit, r.label, r.nodes, r.degraded, r.event) == ("edge", 1, ["fog0", "fog1"], False, event)
    assert runner.calls == []                     # the gateway's own shard never ran
    assert logic.on_fog_answer(answer_msg("fog0", event, confident(1))) == []   # late: nothing
    assert logic.snapshot().fog["answered"] == {"fog0": 1, "fog1": 1}


def test_a_lost_node_degrades_the_answer_at_the_deadline_and_names_who_took_part():
    logic, clock, runner = gateway()
    event, _ = to_fog(logic, clock)
    assert logic.on_fog_answer(answer_msg("fog1", event, confident(2))) == []
    clock.advance(0.05)
    assert logic.on_timer(clock.monotonic()) == []
    clock.advance(0.06)
    (answer,) = logic.on_timer(clock.monotonic())
    r = answer.result
    assert (r.exit, r.label, r.nodes, r.degraded) == ("edge", 2, ["fog1"], True)
    assert logic.snapshot().fog["missed"] == {"fog0": 1} and logic.assembler.open == {}


def test_a_node_gone_offline_is_not_waited_for():
    logic, clock, _ = gateway()
    assert logic.on_fog_status(node_status("fog0", "offline")) == []
    event, slices = to_fog(logic, clock)
    assert len(slices) == 2                      # it still gets its slice: it may be back
    (answer,) = logic.on_fog_answer(answer_msg("fog1", event, confident(0)))
    assert answer.result.nodes == ["fog1"] and answer.result.degraded
    # its answer brings it back
    clock.advance(1.0)
    event2, _ = to_fog(logic, clock)
    assert logic.on_fog_answer(answer_msg("fog0", event2, confident(0))) == []
    assert "fog0" in logic.fog.online


def test_an_offline_status_frees_the_events_that_waited_only_for_that_node():
    logic, clock, _ = gateway()
    event, _ = to_fog(logic, clock)
    assert logic.on_fog_answer(answer_msg("fog0", event, confident(1))) == []
    (answer,) = logic.on_fog_status(node_status("fog1", "offline"))
    assert answer.result.nodes == ["fog0"] and answer.result.event == event


def test_no_node_in_time_falls_back_to_the_gateway_shard_degraded():
    logic, clock, runner = gateway(edge_logits=confident(2))
    event, _ = to_fog(logic, clock)
    clock.advance(0.2)
    (answer,) = logic.on_timer(clock.monotonic())
    assert (answer.result.exit, answer.result.nodes, answer.result.degraded) == ("edge", [], True)
    assert len(runner.calls) == 1


def test_an_unsure_ensemble_forwards_the_nodes_features_with_a_lost_node_at_zero():
    logic, clock, _ = gateway()
    event, _ = to_fog(logic, clock)
    logic.on_fog_answer(answer_msg("fog1", event, UNSURE, feature_value=3.0))
    clock.advance(0.2)
    (forward,) = logic.on_timer(clock.monotonic())
    assert isinstance(forward, Forward)
    from fogsplit.core.manifest import expect_frames
    frame = decode_frame(forward.payload, "forward", expect_frames(fog_manifest()))
    assert frame.tensor.tolist() == [0.0, 0.0, 3.0, 3.0]


@pytest.mark.parametrize("msg,rule", [
    (Message(TOPICS.fog_answer(CELL, "fog0"), b"\xc1"), "msgpack"),
    (answer_msg("fog9", 1, UNSURE), "device"),
    (answer_msg("fog0", 1, UNSURE, model="other"), "model"),
    (Message(TOPICS.fog_answer(CELL, "fog0"), encode_fog_frame(
        FOG_ANSWER, model="m1", event=1, logits=np.zeros(3), tensor=np.zeros(5), codec=CodecSpec("fp32"))), "payload"),
    (Message(TOPICS.fog_status(CELL, "fog0"), b"[]"), "status"),
])
def test_bad_answers_are_refused(msg, rule):
    logic, _, _ = gateway()
    handler = logic.on_fog_status if msg.topic.endswith("status") else logic.on_fog_answer
    (refused,) = handler(msg)
    assert isinstance(refused, Refuse) and refused.error.rule == rule


def test_without_a_fog_section_the_gateway_runs_its_own_shard():
    clock = FakeClock()
    runner = ScriptedRunner(logits=confident(2), edge_feature=np.arange(4, dtype=np.float32))
    logic = GatewayLogic(manifest(), runner, cell=CELL, gateway="gw0", clock=clock,
                         settings=GatewaySettings(deadline_ms=200, feature_deadline_ms=400))
    for device in SENSORS:
        logic.on_status(status(device))
    event, actions = to_fog(logic, clock)
    assert isinstance(actions[0], Answer) and actions[0].result.nodes is None and len(runner.calls) == 1
    assert b"nodes" not in actions[0].result.to_json()


def test_the_edge_answer_weighs_the_local_exit_in():
    """A node lost: the answer is the remaining ensemble times the local exit's distribution."""
    from fogsplit.core.fusion import log_softmax, with_local
    ensemble, local = np.array([2.0, 1.0, 0.0]), np.array([0.0, 3.0, 0.0])
    got = with_local(ensemble, local)
    assert np.allclose(got, log_softmax(ensemble) + log_softmax(local), atol=1e-6)
    assert got.argmax() == 1      # the local evidence tips an unsure ensemble
