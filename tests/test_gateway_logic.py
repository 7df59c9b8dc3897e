"""Every path of the gateway's logic, driven by calling it: no broker, no threads, no sleeping.

The clock is a FakeClock that moves only when told, the gateway shard a scripted runner."""
from __future__ import annotations

import numpy as np
import pytest

from fakes import CELL, RATE, SENSORS, TOPICS, UNSURE, ScriptedRunner, confident, feature, gone, manifest, scores, \
    status
from fogsplit.core.actions import Answer, Forward, Refuse, RequestFeatures
from fogsplit.core.clock import FakeClock
from fogsplit.core.frames import decode_frame
from fogsplit.core.manifest import expect_frames
from fogsplit.core.results import make_result
from fogsplit.core.settings import CacheSettings, GatewaySettings
from fogsplit.core.transport import Message
from fogsplit.gateway.logic import GatewayLogic


def make(*, edge_logits=None, settings: GatewaySettings | None = None, online=SENSORS):
    clock = FakeClock()
    runner = ScriptedRunner(logits=confident(2) if edge_logits is None else edge_logits,
                            edge_feature=np.arange(4, dtype=np.float32))
    logic = GatewayLogic(manifest(), runner, cell=CELL, gateway="gw0",
                         settings=settings or GatewaySettings(deadline_ms=200, feature_deadline_ms=400),
                         clock=clock)
    for device in online:
        assert logic.on_status(status(device)) == []
    return logic, clock, runner


def now_event(clock: FakeClock) -> int:
    return round(clock.time() * RATE)


def only(actions, kind):
    assert len(actions) == 1 and isinstance(actions[0], kind), actions
    return actions[0]


def test_confident_scores_of_every_online_device_exit_locally_once():
    logic, clock, runner = make()
    event = now_event(clock)
    assert logic.on_scores(scores("cam0", event, confident(1))) == []
    assert logic.on_scores(scores("cam1", event, confident(1))) == []
    answer = only(logic.on_scores(scores("cam2", event, confident(1))), Answer)
    r = answer.result
    assert (answer.cell, r.event, r.label, r.cls, r.exit, r.devices, r.degraded) == \
           (CELL, event, 1, "square", "local", list(SENSORS), False)
    assert r.captured == pytest.approx(event / RATE)
    assert runner.calls == [] and logic.assembler.open == {}
    assert logic.on_scores(scores("cam0", event, confident(1))) == []   # a late duplicate answers nothing
    assert logic.snapshot().exits["local"] == 1


def test_scores_deadline_decides_without_the_silent_device():
    logic, clock, _ = make()
    event = now_event(clock)
    logic.on_scores(scores("cam0", event, confident(0)))
    logic.on_scores(scores("cam1", event, confident(0)))
    clock.advance(0.1)
    assert logic.on_timer(clock.monotonic()) == []
    clock.advance(0.15)
    answer = only(logic.on_timer(clock.monotonic()), Answer)
    assert answer.result.devices == ["cam0", "cam1"] and answer.result.exit == "local"


def test_unsure_scores_request_features_then_the_edge_exit_answers():
    logic, clock, runner = make(edge_logits=confident(2))
    event = now_event(clock)
    for device in SENSORS[:2]:
        assert logic.on_scores(scores(device, event, UNSURE)) == []
    request = only(logic.on_scores(scores("cam2", event, UNSURE)), RequestFeatures)
    assert (request.events, request.devices) == ((event,), SENSORS)
    body = decode_frame(request.payload, "request", expect_frames(logic.manifest))
    assert body.devices == SENSORS and body.events == (event % 65536,)
    assert logic.on_feature(feature("cam0", event)) == []
    assert logic.on_feature(feature("cam1", event)) == []
    answer = only(logic.on_feature(feature("cam2", event)), Answer)
    assert (answer.result.exit, answer.result.label) == ("edge", 2)
    assert runner.calls[0]["fused"].shape == (1, 6, 2, 2)
    assert logic.snapshot().requests == 1


def test_gone_notices_run_the_edge_on_the_features_that_came():
    logic, clock, runner = make()
    event = now_event(clock)
    for device in SENSORS:
        logic.on_scores(scores(device, event, UNSURE))
    logic.on_feature(feature("cam0", event, 3.0))
    logic.on_feature(gone("cam1", event))
    answer = only(logic.on_feature(gone("cam2", event)), Answer)
    assert answer.result.devices == ["cam0"]
    fused = runner.calls[0]["fused"][0]
    assert fused[:2].min() == 3.0 and not fused[2:].any()   # concat: absent devices are zero-filled


def test_a_feature_deadline_answers_from_the_local_exit_marked_degraded():
    logic, clock, runner = make()
    event = now_event(clock)
    for device in SENSORS:
        logic.on_scores(scores(device, event, confident(1, strength=0.5)))
    clock.advance(0.39)
    assert logic.on_timer(clock.monotonic()) == []
    clock.advance(0.02)
    answer = only(logic.on_timer(clock.monotonic()), Answer)
    assert (answer.result.exit, answer.result.degraded, answer.result.label) == ("local", True, 1)
    assert runner.calls == [] and logic.snapshot().degraded == 1


def test_an_unsure_edge_forwards_to_the_cloud_with_the_full_event_id():
    logic, clock, _ = make(edge_logits=UNSURE)
    event = now_event(clock)
    one_phase = np.ones((2, 2, 2), np.float32)      # the features come with the scores
    for device in SENSORS[:2]:
        logic.on_scores(scores(device, event, UNSURE, feature=one_phase))
    forward = only(logic.on_scores(scores("cam2", event, UNSURE, feature=one_phase)), Forward)
    frame = decode_frame(forward.payload, "forward", expect_frames(logic.manifest))
    assert (forward.event, frame.event, frame.devices) == (event, event, SENSORS)
    assert frame.captured == pytest.approx(event / RATE)
    assert logic.snapshot().forwarded == 1 and logic.assembler.open[event].stage == "cloud"
    cloud = make_result(confident(2), event=event, exit="cloud", classes=logic.manifest.classes,
                        devices=list(SENSORS), captured=event / RATE, model="m1", now=clock.time())
    answer = only(logic.on_cloud_result(Message(TOPICS.cloud_result(CELL), cloud.to_json())), Answer)
    assert (answer.result.exit, answer.result.label, answer.kind) == ("cloud", 2, "result")
    assert logic.snapshot().exits["cloud"] == 1 and logic.assembler.open == {}


def test_eager_scores_with_features_skip_the_request():
    logic, clock, runner = make()
    event = now_event(clock)
    for device in SENSORS[:2]:
        assert logic.on_scores(scores(device, event, UNSURE, feature=np.ones((2, 2, 2), np.float32))) == []
    answer = only(logic.on_scores(scores("cam2", event, UNSURE, feature=np.ones((2, 2, 2), np.float32))), Answer)
    assert answer.result.exit == "edge" and logic.snapshot().requests == 0 and len(runner.calls) == 1


def test_a_device_going_offline_mid_event_stops_the_wait_at_once():
    logic, clock, _ = make()
    event = now_event(clock)
    logic.on_scores(scores("cam0", event, confident(0)))
    logic.on_scores(scores("cam1", event, confident(0)))
    answer = only(logic.on_status(status("cam2", "offline")), Answer)
    assert answer.result.devices == ["cam0", "cam1"]
    # ... and while features are awaited
    event += 1
    logic.on_status(status("cam2"))
    for device in ("cam0", "cam1"):
        logic.on_scores(scores(device, event, UNSURE))
    request = only(logic.on_scores(scores("cam2", event, UNSURE)), RequestFeatures)
    logic.on_feature(feature("cam0", event))
    logic.on_feature(feature("cam1", event))
    assert request.devices == SENSORS
    answer = only(logic.on_status(status("cam2", "offline")), Answer)
    assert answer.result.exit == "edge" and answer.result.devices == ["cam0", "cam1"]


def test_a_part_that_comes_after_the_event_was_decided_does_not_decide_it_again():
    logic, clock, _ = make()
    event = now_event(clock)
    logic.on_status(status("cam2", "offline"))
    logic.on_scores(scores("cam0", event, UNSURE))
    only(logic.on_scores(scores("cam1", event, UNSURE)), RequestFeatures)
    logic.on_status(status("cam2"))
    assert logic.on_scores(scores("cam2", event, UNSURE)) == []
    assert logic.snapshot().events == 1 and logic.snapshot().requests == 1


def test_a_frame_from_a_device_marked_offline_brings_it_back():
    """The will (or a spoofed offline) must not lock a device out: its next valid frame is proof of life."""
    logic, clock, _ = make()
    logic.on_status(status("cam1", "offline", rate=None))     # a will without a rate: the rate is remembered
    event = now_event(clock)
    logic.on_scores(scores("cam0", event, confident(2)))
    answer = only(logic.on_scores(scores("cam2", event, confident(2))), Answer)    # no wait for cam1
    assert answer.result.devices == ["cam0", "cam2"]
    event += 1
    logic.on_scores(scores("cam0", event, confident(2)))
    logic.on_scores(scores("cam1", event, confident(2)))
    assert logic.assembler.expected() == set(SENSORS)
    answer = only(logic.on_scores(scores("cam2", event, confident(2))), Answer)
    assert answer.result.devices == list(SENSORS) and logic.snapshot().rejoined == 1


def test_without_any_status_the_configured_cell_rate_places_frames():
    logic, clock, _ = make(online=())
    refused = only(logic.on_scores(scores("cam0", now_event(clock), confident(0))), Refuse)
    assert refused.error.rule == "status" and "capture_rate" in refused.error.detail
    logic, clock, _ = make(online=(), settings=GatewaySettings(capture_rate=RATE, deadline_ms=100))
    event = now_event(clock)
    for device in SENSORS[:2]:
        assert logic.on_scores(scores(device, event, confident(0))) == []
    answer = only(logic.on_scores(scores("cam2", event, confident(0))), Answer)
    assert answer.result.event == event


def test_a_device_of_another_model_is_refused_and_so_are_its_frames():
    logic, clock, _ = make()
    refused = only(logic.on_status(status("cam1", model="older")), Refuse)
    assert refused.error.rule == "model" and refused.error.device == "cam1"
    refused = only(logic.on_scores(scores("cam1", now_event(clock), confident(0))), Refuse)
    assert refused.error.rule == "model"
    refused = only(logic.on_scores(scores("cam0", now_event(clock), confident(0), model="older")), Refuse)
    assert refused.error.rule == "model"     # the frame's tag names another model


@pytest.mark.parametrize("message, rule", [
    (Message(TOPICS.scores(CELL, "cam0"), b"\x93not msgpack"), "msgpack"),
    (Message(TOPICS.scores(CELL, "cam9"), b"\x90"), "device"),
    (Message(TOPICS.device_status(CELL, "cam0"), b"{}"), "status"),
    (Message(TOPICS.cmd(CELL, "thresholds"), b'{"local": 3}'), "cmd"),
    (Message(TOPICS.cmd(CELL, "thresholds"), b'{"cache": 0.2}'), "cmd"),
    (Message(TOPICS.cloud_result(CELL), b'{"event": 1}'), "result"),
])
def test_bad_input_is_refused_with_its_rule_and_changes_nothing(message, rule):
    logic, clock, _ = make(settings=GatewaySettings())
    before = dict(logic.thresholds)
    handler = {"scores": logic.on_scores, "status": logic.on_status, "thresholds": logic.on_command,
               "result": logic.on_cloud_result}[message.topic.rsplit("/", 1)[-1]]
    actions = handler(message)
    assert only(actions, Refuse).error.rule == rule
    assert logic.thresholds == before and logic.assembler.open == {}


def test_thresholds_change_by_command():
    logic, clock, _ = make()
    assert logic.on_command(Message(TOPICS.cmd(CELL, "thresholds"), b'{"local": 0.05, "device_cache": 0.3}')) == []
    assert logic.thresholds == {"local": 0.05, "edge": 0.5}


def test_the_gateway_cache_answers_a_repeated_scene_without_the_shard():
    cache = CacheSettings(max_entries=64, max_bytes=1 << 20, threshold=0.2, k=1, min_agreement=1.0)
    logic, clock, runner = make(edge_logits=confident(1), settings=GatewaySettings(cache=cache))
    answers = []
    for _ in range(2):
        event = now_event(clock)
        for device in SENSORS:
            actions = logic.on_scores(scores(device, event, UNSURE, feature=np.ones((2, 2, 2), np.float32)))
        answers.append(only(actions, Answer).result)
        clock.advance(1.0)
    assert [(r.exit, r.label) for r in answers] == [("edge", 1), ("cache", 1)]
    assert len(runner.calls) == 1 and logic.snapshot().cache["gateway_hits"] == 1


def test_a_quorum_of_device_cache_votes_answers_before_any_feature_is_asked():
    cache = CacheSettings(max_entries=64, max_bytes=1 << 20, threshold=0.2, k=1, min_agreement=1.0)
    logic, clock, runner = make(settings=GatewaySettings(cache=cache))
    event = now_event(clock)
    logic.on_scores(scores("cam0", event, UNSURE, vote=2))
    logic.on_scores(scores("cam1", event, UNSURE, vote=2))
    answer = only(logic.on_scores(scores("cam2", event, UNSURE)), Answer)
    assert (answer.result.exit, answer.result.label) == ("cache", 2)
    assert answer.result.confidence == pytest.approx(2 / 3, abs=1e-3)
    assert runner.calls == [] and logic.snapshot().requests == 0
    event += 1
    logic.on_scores(scores("cam0", event, UNSURE, vote=2))
    logic.on_scores(scores("cam1", event, UNSURE, vote=1))
    assert isinstance(logic.on_scores(scores("cam2", event, UNSURE))[0], RequestFeatures)   # no quorum


def test_forwarded_events_fill_the_cache_from_the_cloud_answer():
    cache = CacheSettings(max_entries=64, max_bytes=1 << 20, threshold=0.2, k=1, min_agreement=1.0)
    logic, clock, _ = make(edge_logits=UNSURE, settings=GatewaySettings(cache=cache))
    event = now_event(clock)
    for device in SENSORS:
        actions = logic.on_scores(scores(device, event, UNSURE, feature=np.ones((2, 2, 2), np.float32)))
    only(actions, Forward)
    result = make_result(confident(0), event=event, exit="cloud", classes=logic.manifest.classes,
                         devices=list(SENSORS), captured=event / RATE, model="m1", now=clock.time())
    assert only(logic.on_cloud_result(Message(TOPICS.cloud_result(CELL), result.to_json())), Answer)
    assert logic.snapshot().cache["entries"] == 1
