import msgpack
import numpy as np
import pytest

from fogsplit.core.codecs import CodecSpec
from fogsplit.core.errors import FrameError
from fogsplit.core.frames import FEATURE, FORWARD, GONE, REQUEST, SCORES, SLOT_MOD, Expect, decode_frame, \
    encode_events_frame, encode_forward_frame, encode_slot_frame, frame_tag, unwrap_slot

SENSORS = ("cam0", "cam1", "cam2")
EXPECT = Expect(model="m1", sensors=SENSORS, shapes={SCORES: (3,), FEATURE: (2, 2), FORWARD: (2,)},
                codecs={SCORES: CodecSpec("fp16"), FEATURE: CodecSpec("int8", scale=0.1),
                        FORWARD: CodecSpec("fp32")})
SCORES_X = np.array([0.1, 2.0, -1.0], dtype=np.float32)


def scores_body(event: int = 7) -> list:
    return msgpack.unpackb(encode_slot_frame(SCORES, model="m1", event=event, tensor=SCORES_X,
                                             codec=CodecSpec("fp16")))


def test_scores_round_trip_carries_the_slot_not_the_event():
    frame = decode_frame(msgpack.packb(scores_body(event=3 * SLOT_MOD + 7)), "scores", EXPECT)
    assert (frame.kind, frame.slot, frame.feature) == (SCORES, 7, None)
    assert np.allclose(frame.tensor, SCORES_X, atol=1e-3)


def test_a_scores_frame_is_a_few_bytes():
    payload = encode_slot_frame(SCORES, model="m1", event=1_700_000_000 * 25, tensor=np.zeros(6),
                                codec=CodecSpec("int8", scale=0.1))
    assert len(payload) == 1 + 1 + 3 + 2 + 6   # array, tag, slot, bin header, six int8 scores


def test_one_phase_scores_carry_the_feature():
    feature = np.array([[0.5, -0.5], [1.0, 0.0]], dtype=np.float32)
    payload = encode_slot_frame(SCORES, model="m1", event=9, tensor=SCORES_X, codec=CodecSpec("fp16"),
                                feature=feature, feature_codec=EXPECT.codecs[FEATURE])
    frame = decode_frame(payload, "scores", EXPECT)
    assert np.allclose(frame.feature, feature, atol=0.051)


def test_int8_feature_uses_the_manifest_calibration():
    x = np.array([[0.5, -0.5], [1.0, 0.0]], dtype=np.float32)
    payload = encode_slot_frame(FEATURE, model="m1", event=1, tensor=x, codec=EXPECT.codecs[FEATURE])
    assert np.allclose(decode_frame(payload, "feature", EXPECT).tensor, x, atol=0.051)


def test_request_names_devices_by_mask():
    payload = encode_events_frame(REQUEST, model="m1", events=[3, SLOT_MOD + 4], devices=("cam0", "cam2"),
                                  sensors=SENSORS)
    frame = decode_frame(payload, "request", EXPECT)
    assert frame.events == (3, 4) and frame.devices == ("cam0", "cam2")


def test_gone_shares_the_feature_topic():
    frame = decode_frame(encode_events_frame(GONE, model="m1", events=[5]), "feature", EXPECT)
    assert (frame.kind, frame.events) == (GONE, (5,))


def test_forward_keeps_the_full_event_and_time():
    payload = encode_forward_frame(model="m1", event=1 << 40, captured=1.7e9, devices=("cam1",),
                                   sensors=SENSORS, tensor=np.array([1.0, 2.0]), codec=CodecSpec("fp32"))
    frame = decode_frame(payload, "forward", EXPECT)
    assert (frame.event, frame.captured, frame.devices) == (1 << 40, 1.7e9, ("cam1",))


@pytest.mark.parametrize("near", [0, 5, SLOT_MOD - 3, 10 * SLOT_MOD + 2, 10 * SLOT_MOD - 2, 42_500_000_000])
@pytest.mark.parametrize("offset", [-3000, -1, 0, 1, 3000])
def test_unwrap_slot_restores_events_near_the_expected_one(near, offset):
    event = near + offset
    if event < 0:
        return
    assert unwrap_slot(event % SLOT_MOD, near) == event


def test_tag_changes_with_the_model():
    tags = {frame_tag(f"model{i}") for i in range(50)}
    assert len(tags) > 30 and all(0 <= t < 128 for t in tags)


def refusal(payload, leaf: str = "scores") -> FrameError:
    payload = payload if isinstance(payload, bytes) else msgpack.packb(payload)
    with pytest.raises(FrameError) as err:
        decode_frame(payload, leaf, EXPECT, topic="t", device="cam0")
    assert err.value.topic == "t" and err.value.device == "cam0"
    return err.value


@pytest.mark.parametrize("payload,rule", [
    (b"\xc1garbage", "msgpack"),
    (msgpack.packb({"v": 1, "k": "s"}), "layout"),
    (msgpack.packb([]), "layout"),
    (b"\x00" * ((1 << 20) + 1), "size"),
])
def test_undecodable_payloads(payload, rule):
    assert refusal(payload).rule == rule


def _with(index: int, value) -> list:
    body = scores_body()
    if index >= len(body):
        body.append(value)
    else:
        body[index] = value
    return body


@pytest.mark.parametrize("body,rule", [
    (_with(0, frame_tag("m1") ^ 1), "model"),
    (_with(0, "m1"), "model"),
    (_with(1, -1), "event"),
    (_with(1, SLOT_MOD), "event"),
    (_with(1, "7"), "event"),
    (_with(1, True), "event"),
    (_with(2, "text"), "payload"),
    (_with(2, b"\x00" * 5), "payload"),
    (_with(2, np.array([1, np.nan, 2], dtype="<f2").tobytes()), "finite"),
    (_with(3, b"\x00"), "payload"),          # a one-phase feature of the wrong length
    (scores_body() + [b"", b""], "layout"),
    (scores_body()[:2], "layout"),
])
def test_each_broken_rule_is_named(body, rule):
    assert refusal(body).rule == rule


def test_refusal_carries_the_slot_as_event():
    err = refusal(_with(0, frame_tag("old-model")))
    assert (err.device, err.event, err.rule) == ("cam0", 7, "model")
    assert err.as_report()["rule"] == "model"


@pytest.mark.parametrize("body,leaf,rule", [
    ([frame_tag("m1"), [], 1], "request", "event"),
    ([frame_tag("m1"), [1], 0], "request", "devices"),
    ([frame_tag("m1"), [1], 1 << 3], "request", "devices"),
    ([frame_tag("m1"), [1], "cam0"], "request", "devices"),
    ([frame_tag("m1"), [SLOT_MOD]], "feature", "event"),
    ([frame_tag("m1"), 1, float("nan"), 1, b"\x00" * 8], "forward", "time"),
    ([frame_tag("m1"), -1, 1.0, 1, b"\x00" * 8], "forward", "event"),
    ([frame_tag("m1"), 1, 1.0, 1, b"\x00" * 8], "status", "kind"),
    ([frame_tag("m1"), 1, b"\x00" * 3], "raw", "kind"),   # this tier takes no raw frames
])
def test_other_kinds_refuse_broken_fields(body, leaf, rule):
    assert refusal(body, leaf).rule == rule
