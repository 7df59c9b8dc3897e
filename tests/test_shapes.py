"""Data of any shape: odd lengths and sides, sensors of different shapes and channel counts,
variable-length series (NaN after the end) and missing values. Each either exports and serves
end to end, or is refused with an error that names the array and the problem."""
from __future__ import annotations

import time

import numpy as np
import onnxruntime as ort
import pytest

from fogsplit.bench.harness import stream_test_set, summarize
from fogsplit.core.dataset import load_npz, make_dataset
from fogsplit.core.errors import DataError
from fogsplit.core.manifest import load_bundle
from fogsplit.core.settings import ExportOptions
from fogsplit.export.model import ModelSpec
from fogsplit.export.pipeline import export_bundle

N = 120


def _labels(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 3, N)


def _series(y: np.ndarray, channels: int, length: int, seed: int) -> np.ndarray:
    """A tone whose frequency is the class, in noise: learnable by any sensor."""
    rng = np.random.default_rng(seed)
    t = np.arange(length) / length
    tone = np.sin(2 * np.pi * (y[:, None, None] + 1) * 2 * t)
    return (tone + 0.3 * rng.standard_normal((len(y), channels, length))).astype(np.float32)


def _images(y: np.ndarray, channels: int, h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.zeros((len(y), channels, h, w), np.float32)
    for c in range(3):
        base[y == c, :, :, (c * w) // 3:((c + 1) * w) // 3] = 1.0
    return base + 0.2 * rng.standard_normal(base.shape).astype(np.float32)


def _variable_length(x: np.ndarray, seed: int) -> np.ndarray:
    """NaN after each series' own end (at least half the length kept), and a few missing values."""
    rng = np.random.default_rng(seed)
    x = x.copy()
    length = x.shape[-1]
    for i, end in enumerate(rng.integers(length // 2, length + 1, len(x))):
        x[i, :, end:] = np.nan
    x[rng.integers(0, len(x), 10), 0, rng.integers(0, length // 2, 10)] = np.nan
    return x


CASES = {
    "odd length 29": lambda y: {"a": _series(y, 3, 29, 1), "b": _series(y, 3, 29, 2)},
    "short series 8": lambda y: {"a": _series(y, 2, 8, 1)},
    "tiny images 4x4": lambda y: {"a": _images(y, 3, 4, 4, 1), "b": _images(y, 3, 4, 4, 2)},
    "odd images 9x13": lambda y: {"a": _images(y, 1, 9, 13, 1), "b": _images(y, 3, 9, 13, 2)},
    "50 Hz accel beside 8 kHz mic": lambda y: {"accel": _series(y, 3, 50, 1), "mic": _series(y, 1, 8000, 2)},
    "variable length and missing": lambda y: {"a": _variable_length(_series(y, 4, 29, 1), 3),
                                              "b": _variable_length(_series(y, 2, 40, 2), 4)},
}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """One small export per case (a few dozen steps: the point is the shapes, not the accuracy)."""
    out = {}
    y = _labels()
    for name, make in CASES.items():
        data = make_dataset(make(y), y, name=name.replace(" ", "_"))
        path = tmp_path_factory.mktemp("shape")
        export_bundle(data, path, ExportOptions(steps=30, seed=0, progress=False, max_accuracy_drop=1.0))
        out[name] = (data, load_bundle(path, allow_unsigned=True))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_each_shape_exports_and_every_device_takes_exactly_what_its_sensor_produces(bundles, case):
    data, bundle = bundles[case]
    m = bundle.manifest
    spec = ModelSpec.for_dataset(data)
    assert {s.name: tuple(s.shape) for s in m.sensors} == data.shapes
    for sensor in m.sensor_names:
        shard = m.device_shard(sensor)
        assert shard.inputs["x"][1:] == list(data.shapes[sensor])
        assert shard.outputs["feature"][1:] == list(spec.feature_shape)    # one grid for every device
        session = ort.InferenceSession(str(bundle.shard_path(shard)), providers=["CPUExecutionProvider"])
        scores, feature = session.run(None, {"x": data.sensors[sensor][:8].astype(np.float32)})
        assert np.isfinite(scores).all() and np.isfinite(feature).all()     # NaN in, finite out
    assert set(m.metrics["validation_exit_accuracy"]) == {"device", "local", "edge", "cloud"}


def test_the_feature_grid_is_the_smallest_device_grid_capped():
    spec = ModelSpec(("accel", "mic"), "series", ((3, 50), (1, 8000)), 3)
    assert spec.trunk_grid("accel") == (13,) and spec.trunk_grid("mic") == (2000,)
    assert spec.feature_shape == (4, 13) and spec.edge_feature_shape[1:] == (7,)
    big = ModelSpec(("a",), "image", (3, 224, 224), 3)
    assert big.feature_shape == (4, 8, 8)   # capped: what a device sends stays small


@pytest.mark.parametrize("arrays, needle", [
    ({"a": np.zeros((N, 3, 3))}, "array 'x_a' has a series length of 3"),
    ({"a": np.zeros((N, 3, 4, 2))}, "array 'x_a' has an image side of 2"),
    ({"a": np.zeros((N, 3, 16)), "b": np.zeros((N, 3, 8, 8))}, "all sensors of a file must be of one kind"),
    ({"a": np.full((N, 3, 16), np.inf)}, "array 'x_a' contains infinite values"),
    ({"a": np.full((N, 3, 16), np.nan)}, "array 'x_a' sample 0 is all NaN"),
    ({"a": np.zeros((N, 0, 16))}, "array 'x_a' has no channels"),
])
def test_shapes_that_cannot_be_served_are_refused_naming_the_array(tmp_path, arrays, needle):
    path = tmp_path / "bad.npz"
    np.savez(path, y=_labels(), **{f"x_{k}": v for k, v in arrays.items()})
    with pytest.raises(DataError) as err:
        load_npz(path)
    assert needle in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize("policy", ["request", "raw"])
def test_variable_length_sensors_of_different_shapes_are_served_over_a_real_broker(broker, bundles, policy):
    """NaN-padded series of two shapes, through devices, gateway and cloud; raw offload carries
    the NaN as the sensor produced it."""
    data, bundle = bundles["variable length and missing"]
    test = data.test().subset(np.arange(20))
    outcome = stream_test_set(broker, bundle, test, policy=policy, rate=40,
                              fleet=f"shape{policy}{time.monotonic_ns() % 10**6}")
    report = summarize(outcome)
    assert report["events"] == 20 and report["lost"] == 0 and report["duplicates"] == 0


def test_a_raw_frame_takes_its_own_sensors_shape_and_may_carry_nan():
    from fogsplit.core.codecs import CodecSpec
    from fogsplit.core.errors import FrameError
    from fogsplit.core.frames import RAW, Expect, decode_frame, encode_slot_frame
    fp32 = CodecSpec("fp32")
    expect = Expect(model="m", sensors=("accel", "mic"), raw={"accel": ((3, 50), fp32), "mic": ((1, 400), fp32)})
    sample = np.random.default_rng(0).standard_normal((3, 50)).astype(np.float32)
    sample[:, 40:] = np.nan
    frame = decode_frame(encode_slot_frame(RAW, model="m", event=5, tensor=sample, codec=fp32), "raw", expect,
                         device="accel")
    assert np.array_equal(frame.tensor, sample, equal_nan=True)
    with pytest.raises(FrameError, match="does not fit shape"):      # accel's sample on the mic's topic
        decode_frame(encode_slot_frame(RAW, model="m", event=5, tensor=sample, codec=fp32), "raw", expect,
                     device="mic")
    sample[0, 0] = np.inf
    with pytest.raises(FrameError, match="infinite"):
        decode_frame(encode_slot_frame(RAW, model="m", event=5, tensor=sample, codec=fp32), "raw", expect,
                     device="accel")
