import numpy as np
import pytest

from fogsplit.core.codecs import CodecSpec, calibrate_int8, decode_tensor, encode_tensor, payload_bytes
from fogsplit.core.errors import FrameError

RNG = np.random.default_rng(0)
X = RNG.normal(size=(4, 8, 8)).astype(np.float32)


@pytest.mark.parametrize("spec,tol", [
    (CodecSpec("fp32"), 0.0),
    (CodecSpec("fp16"), 2e-3),
    (CodecSpec("fp32", lossless="zlib"), 0.0),
])
def test_float_codecs_round_trip(spec, tol):
    out = decode_tensor(encode_tensor(X, spec), X.shape, spec)
    assert out.dtype == np.float32 and out.shape == X.shape
    assert np.max(np.abs(out - X)) <= tol


def test_int8_calibrated_error_is_within_half_a_step():
    spec = calibrate_int8(X, percentile=100)
    payload = encode_tensor(X, spec)
    assert len(payload) == X.size == payload_bytes(spec, X.size)
    out = decode_tensor(payload, X.shape, spec)
    assert np.max(np.abs(out - X)) <= spec.scale / 2 + 1e-6


def test_int8_clips_outside_the_calibrated_range():
    spec = calibrate_int8(np.array([-1.0, 1.0]), percentile=100)
    out = decode_tensor(encode_tensor(np.array([5.0, -5.0]), spec), (2,), spec)
    assert out[0] == pytest.approx(1.0, abs=spec.scale) and out[1] == pytest.approx(-1.0, abs=spec.scale)


def test_sign_packs_eight_values_per_byte():
    spec = CodecSpec("sign")
    payload = encode_tensor(X, spec)
    assert len(payload) == X.size // 8
    assert np.array_equal(decode_tensor(payload, X.shape, spec), np.where(X > 0, 1.0, -1.0))


def test_topk_keeps_the_largest_magnitudes():
    spec = CodecSpec("topk", k=10)
    out = decode_tensor(encode_tensor(X, spec), X.shape, spec)
    assert np.count_nonzero(out) == 10
    kept = np.sort(np.abs(X).ravel())[-10:]
    assert np.allclose(np.sort(np.abs(out[out != 0])), kept, atol=1e-2)


def test_payload_of_the_wrong_length_is_refused():
    spec = CodecSpec("fp16")
    with pytest.raises(FrameError) as err:
        decode_tensor(b"\x00" * 7, (4,), spec)
    assert err.value.rule == "payload"


def test_nan_is_refused():
    spec = CodecSpec("fp32")
    with pytest.raises(FrameError) as err:
        decode_tensor(np.array([1.0, np.nan], dtype="<f4").tobytes(), (2,), spec)
    assert err.value.rule == "finite"


def test_zlib_bomb_is_refused():
    import zlib
    spec = CodecSpec("fp32", lossless="zlib")
    with pytest.raises(FrameError) as err:
        decode_tensor(zlib.compress(b"\x00" * (8 << 20)), (2 << 20,), spec)
    assert err.value.rule == "size"


def test_topk_index_out_of_range_is_refused():
    spec = CodecSpec("topk", k=1)
    payload = np.array([99], dtype="<u4").tobytes() + np.array([1.0], dtype="<f2").tobytes()
    with pytest.raises(FrameError):
        decode_tensor(payload, (4,), spec)


@pytest.mark.parametrize("bad", [dict(name="gzip"), dict(name="int8", scale=0.0), dict(name="topk"),
                                 dict(name="fp16", lossless="lz4")])
def test_bad_codec_specs_are_refused(bad):
    with pytest.raises(ValueError):
        CodecSpec(**bad)


def test_codec_spec_dict_round_trip_and_unknown_keys():
    spec = CodecSpec("int8", scale=0.5, zero_point=3, lossless="zlib")
    assert CodecSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="unknown codec keys"):
        CodecSpec.from_dict({"name": "fp16", "bits": 4})
