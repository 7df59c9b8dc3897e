import msgpack
import numpy as np
import pytest

from fogsplit.codecs import CodecSpec
from fogsplit.errors import FrameError
from fogsplit.frames import FEATURE, GONE, REQUEST, SCORES, Expect, decode_frame, encode_events_frame, \
    encode_tensor_frame

EXPECT = Expect(model="m1", shapes={SCORES: (3,), FEATURE: (2, 2)},
                codecs={SCORES: CodecSpec("fp16"), FEATURE: CodecSpec("int8", scale=0.1)})


def scores_frame(**overrides) -> dict:
    body = msgpack.unpackb(encode_tensor_frame(SCORES, event=7, sender="cam0", captured=1.5, model="m1",
                                               tensor=np.array([0.1, 2.0, -1.0], dtype=np.float32),
                                               codec=CodecSpec("fp16")))
    body.update(overrides)
    return body


def test_scores_round_trip():
    frame = decode_frame(msgpack.packb(scores_frame()), EXPECT)
    assert (frame.kind, frame.event, frame.sender, frame.captured) == (SCORES, 7, "cam0", 1.5)
    assert np.allclose(frame.tensor, [0.1, 2.0, -1.0], atol=1e-3)


def test_int8_feature_uses_the_manifest_calibration():
    x = np.array([[0.5, -0.5], [1.0, 0.0]], dtype=np.float32)
    payload = encode_tensor_frame(FEATURE, event=1, sender="cam1", captured=2.0, model="m1", tensor=x,
                                  codec=EXPECT.codecs[FEATURE])
    assert np.allclose(decode_frame(payload, EXPECT).tensor, x, atol=0.051)


def test_request_round_trip():
    payload = encode_events_frame(REQUEST, sender="gw0", model="m1", events=[3, 4], devices=("cam0",))
    frame = decode_frame(payload, EXPECT)
    assert frame.events == (3, 4) and frame.devices == ("cam0",)


def refusal(body_or_bytes) -> FrameError:
    payload = body_or_bytes if isinstance(body_or_bytes, bytes) else msgpack.packb(body_or_bytes)
    with pytest.raises(FrameError) as err:
        decode_frame(payload, EXPECT, topic="t")
    assert err.value.topic == "t"
    return err.value


@pytest.mark.parametrize("payload,rule", [
    (b"\xc1garbage", "msgpack"),
    (msgpack.packb([1, 2, 3]), "msgpack"),
    (b"\x00" * ((1 << 20) + 1), "size"),
])
def test_undecodable_payloads(payload, rule):
    assert refusal(payload).rule == rule


@pytest.mark.parametrize("overrides,rule", [
    ({"v": 2}, "version"),
    ({"k": "z"}, "kind"),
    ({"d": "cam/0"}, "sender"),
    ({"d": 5}, "sender"),
    ({"m": "other"}, "model"),
    ({"e": -1}, "event"),
    ({"e": "7"}, "event"),
    ({"t": float("nan")}, "time"),
    ({"c": "rot13"}, "codec"),
    ({"c": "fp32"}, "codec"),
    ({"s": [4]}, "shape"),
    ({"s": [3, -1]}, "shape"),
    ({"s": "3"}, "shape"),
    ({"b": "text"}, "payload"),
    ({"b": b"\x00" * 5}, "payload"),
    ({"b": np.array([1, np.nan, 2], dtype="<f2").tobytes()}, "finite"),
    ({"x": 1}, "keys"),
    ({"p": ["ok", "bad/one"]}, "devices"),
])
def test_each_broken_rule_is_named(overrides, rule):
    err = refusal(scores_frame(**overrides))
    assert err.rule == rule
    if rule not in ("sender",):
        assert err.device == "cam0"


def test_refusal_carries_device_and_event():
    err = refusal(scores_frame(m="old-model"))
    assert (err.device, err.event, err.rule) == ("cam0", 7, "model")
    assert err.as_report()["rule"] == "model"


def test_request_without_events_is_refused():
    body = msgpack.unpackb(encode_events_frame(GONE, sender="cam0", model="m1", events=[1]))
    body["e"] = []
    assert refusal(body).rule == "event"
