"""The device's logic and its capture bound, and the cloud's logic: driven by calling them."""
from __future__ import annotations

import numpy as np
import pytest

from fakes import CELL, RATE, SENSORS, TOPICS, ScriptedRunner, confident, manifest
from fogsplit.cloud.logic import CloudLogic
from fogsplit.core.actions import Answer, Refuse
from fogsplit.core.clock import FakeClock
from fogsplit.core.codecs import CodecSpec
from fogsplit.core.frames import FEATURE, GONE, REQUEST, SCORES, decode_frame, encode_events_frame, \
    encode_forward_frame
from fogsplit.core.manifest import expect_frames
from fogsplit.core.settings import DeviceCacheSettings, DeviceSettings
from fogsplit.core.transport import Message
from fogsplit.device.agent import CaptureBacklog
from fogsplit.device.logic import DeviceLogic
from fogsplit.device.sources import Capture

FEATURE_VALUE = np.full((2, 2, 2), 0.5, np.float32)


def make(policy: str = "request", **settings):
    clock = FakeClock()
    runner = ScriptedRunner(scores=confident(1), feature=FEATURE_VALUE)
    logic = DeviceLogic(manifest(), runner, cell=CELL, device="cam1",
                        settings=DeviceSettings(policy=policy, **settings), clock=clock)
    return logic, clock


def capture(event: int) -> Capture:
    return Capture(event=event, captured=event / RATE, sample=np.zeros((1, 8, 8), np.float32))


def request(events: list[int], devices=SENSORS) -> Message:
    payload = encode_events_frame(REQUEST, model="m1", events=events, devices=tuple(devices), sensors=SENSORS)
    return Message(TOPICS.request(CELL), payload)


def test_a_capture_publishes_its_scores_and_keeps_its_feature_for_the_request():
    logic, clock = make()
    (send,) = logic.on_capture(capture(1000))
    assert (send.kind, send.device, send.events) == ("scores", "cam1", (1000,))
    frame = decode_frame(send.payload, "scores", expect_frames(logic.manifest))
    assert frame.kind == SCORES and frame.feature is None and frame.tensor.argmax() == 1
    (sent,) = logic.on_request(request([1000]))
    frame = decode_frame(sent.payload, "feature", expect_frames(logic.manifest))
    assert (sent.kind, frame.kind) == ("feature", FEATURE) and np.allclose(frame.tensor, FEATURE_VALUE)


def test_a_request_for_a_feature_no_longer_held_is_answered_gone():
    logic, clock = make(feature_ttl_s=1.0, keep_features=2)
    for event in (1000, 1001, 1002):
        logic.on_capture(capture(event))
    (sent,) = logic.on_request(request([1000]))          # evicted: only two are kept
    assert decode_frame(sent.payload, "feature", expect_frames(logic.manifest)).kind == GONE
    clock.advance(1.5)
    (sent,) = logic.on_request(request([1002]))          # expired
    assert decode_frame(sent.payload, "feature", expect_frames(logic.manifest)).kind == GONE
    assert logic.snapshot().gone == 2 and logic.snapshot().features_evicted == 3


def test_a_request_for_other_devices_is_not_this_devices_to_answer():
    logic, _ = make()
    logic.on_capture(capture(1000))
    assert logic.on_request(request([1000], devices=("cam0", "cam2"))) == []


def test_eager_sends_the_feature_with_the_scores_and_raw_sends_the_sample():
    logic, _ = make("eager")
    (send,) = logic.on_capture(capture(5))
    assert decode_frame(send.payload, "scores", expect_frames(logic.manifest)).feature is not None
    assert len(logic.store) == 0
    raw = DeviceLogic(manifest(), None, cell=CELL, device="cam1", settings=DeviceSettings(policy="raw"),
                      clock=FakeClock())
    (send,) = raw.on_capture(capture(5))
    assert send.kind == "raw"


@pytest.mark.parametrize("message, rule", [
    (Message(TOPICS.request(CELL), b"\xc1"), "msgpack"),
    (Message(TOPICS.request(CELL), encode_events_frame(REQUEST, model="other", events=[1], devices=("cam1",),
                                                      sensors=SENSORS)), "model"),
    (Message(TOPICS.cmd(CELL, "thresholds"), b'{"device_cache": 9}'), "cmd"),
    (Message(TOPICS.result(CELL), b"[]"), "result"),
])
def test_bad_input_is_refused_with_its_rule(message, rule):
    logic, _ = make(cache=DeviceCacheSettings(threshold=0.2))
    handler = {"request": logic.on_request, "thresholds": logic.on_command, "result": logic.on_result}[
        message.topic.rsplit("/", 1)[-1]]
    (refused,) = handler(message)
    assert isinstance(refused, Refuse) and refused.error.rule == rule


def test_the_capture_backlog_keeps_the_newest_and_counts_what_it_pushed_out():
    backlog = CaptureBacklog(depth=3)
    assert backlog.put(capture(1)) is True             # the consumer must be woken
    for event in range(2, 101):
        assert backlog.put(capture(event)) is False    # a wake-up is already pending
    assert len(backlog) == 3 and backlog.dropped == 97
    taken = [backlog.take() for _ in range(3)]
    assert [(c.event, more) for c, more in taken] == [(98, True), (99, True), (100, False)]
    assert backlog.take() == (None, False)
    assert backlog.put(capture(101)) is True
    backlog.wake_failed()                               # the inbox was full: the next put wakes again
    assert backlog.put(capture(102)) is True and backlog.dropped == 97
    with pytest.raises(ValueError):
        CaptureBacklog(depth=0)


def test_the_cloud_answers_a_forward_in_the_forwarding_cell():
    clock = FakeClock()
    logic = CloudLogic(manifest(), ScriptedRunner(logits=confident(2)), clock=clock)
    payload = encode_forward_frame(model="m1", event=42, captured=clock.time() - 0.25, devices=("cam0", "cam2"),
                                   sensors=SENSORS, tensor=np.zeros(4, np.float32), codec=CodecSpec("fp32"))
    (answer,) = logic.on_forward(Message(TOPICS.forward("c7"), payload))
    assert isinstance(answer, Answer) and answer.cell == "c7"
    r = answer.result
    assert (r.event, r.label, r.exit, r.devices, r.latency_ms) == (42, 2, "cloud", ["cam0", "cam2"], 250.0)
    (refused,) = logic.on_forward(Message(TOPICS.forward("c7"), payload[:-3]))
    assert isinstance(refused, Refuse) and logic.answered == 1
