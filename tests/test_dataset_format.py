import numpy as np
import pytest

from fogsplit.core.dataset import load_npz, make_dataset, save_npz
from fogsplit.export.datasets import load_data
from fogsplit.core.errors import DataError


def arrays(n=10, **over):
    rng = np.random.default_rng(0)
    out = {"x_cam0": rng.integers(0, 255, (n, 3, 8, 8), dtype=np.uint8),
           "x_cam1": rng.integers(0, 255, (n, 3, 8, 8), dtype=np.uint8),
           "y": np.arange(n) % 2}
    out.update(over)
    return {k: v for k, v in out.items() if v is not None}


def write(tmp_path, **over):
    path = tmp_path / "d.npz"
    np.savez(path, **arrays(**over))
    return path


def test_round_trip_and_default_split(tmp_path):
    ds = load_npz(write(tmp_path))
    assert ds.sensor_names == ["cam0", "cam1"] and ds.kind == "image" and ds.classes == ("class0", "class1")
    assert set(np.unique(ds.split)) == {0, 1}
    again = load_npz(save_npz(ds, tmp_path / "again.npz"))
    assert np.array_equal(again.sensors["cam1"], ds.sensors["cam1"]) and np.array_equal(again.split, ds.split)


def test_time_series_with_classes_and_split(tmp_path):
    path = tmp_path / "s.npz"
    np.savez(path, x_imu0=np.zeros((4, 3, 16), np.float32), y=np.array([0, 1, 2, 0]),
             split=np.array([0, 0, 1, 1]), classes=np.array(["walk", "run", "sit"]))
    ds = load_npz(path)
    assert ds.kind == "series" and ds.classes == ("walk", "run", "sit") and len(ds.test()) == 2


@pytest.mark.parametrize("over,needle", [
    (dict(y=None), "missing array 'y'"),
    (dict(y=np.ones((10, 2), int)), "array 'y' must have shape"),
    (dict(y=np.linspace(0, 1, 10)), "integer labels"),
    (dict(y=np.arange(10) - 1), "negative label"),
    (dict(x_cam1=np.zeros((9, 3, 8, 8))), "array 'x_cam1' has 9 samples"),
    (dict(x_cam1=np.zeros((10, 3, 16))), "all sensors of a file must be of one kind"),
    (dict(x_cam1=np.zeros((10, 3, 3, 16))), "array 'x_cam1' has an image side of 3"),
    (dict(x_cam1=np.full((10, 3, 8, 8), np.nan)), "array 'x_cam1' sample 0 is all NaN"),
    (dict(x_cam1=np.zeros((10, 8)), ), "array 'x_cam1' must be"),
    (dict(x_cam1=np.full((10, 3, 8, 8), np.nan)), "NaN"),
    (dict(x_cam1=np.array(["a"] * 10)), "x_cam1"),
    (dict(split=np.full(10, 2)), "array 'split' may hold only"),
    (dict(split=np.zeros(10, int)), "no train or no test"),
    (dict(split=np.zeros(3, int)), "array 'split' must have shape"),
    (dict(classes=np.array(["only"])), "names only 1"),
    (dict(extra=np.zeros(3)), "unknown arrays ['extra']"),
    (dict(x_cam0=None, x_cam1=None), "no sensor arrays"),
])
def test_malformed_files_name_the_array(tmp_path, over, needle):
    with pytest.raises(DataError) as err:
        load_npz(write(tmp_path, **over))
    assert needle in str(err.value)


def test_not_an_npz(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable .npz"):
        load_npz(bad)
    with pytest.raises(DataError, match="no such file"):
        load_npz(tmp_path / "absent.npz")
    with pytest.raises(DataError, match="expected one of"):
        load_data("imagez")


def test_pickled_object_arrays_are_not_loaded(tmp_path):
    path = tmp_path / "p.npz"
    np.savez(path, x_a=np.zeros((4, 1, 4)), y=np.array([{"a": 1}] * 4, dtype=object))
    with pytest.raises(DataError):
        load_npz(path)


def test_sensor_names_are_checked():
    with pytest.raises(DataError, match="sensor name"):
        make_dataset({"cam/0": np.zeros((4, 1, 4))}, np.array([0, 1, 0, 1]))
