"""Replay files: a device reads only its own sensor's samples and never generates data. No broker."""
from __future__ import annotations

import numpy as np
import pytest

from fogsplit.cli import main
from fogsplit.core.dataset import load_npz, load_sensor, make_dataset, save_npz, save_replay
from fogsplit.core.errors import DataError


@pytest.fixture
def data():
    rng = np.random.default_rng(3)
    sensors = {s: rng.integers(0, 255, (40, 3, 8, 8), dtype=np.uint8) for s in ("cam0", "cam1")}
    return make_dataset(sensors, rng.integers(0, 3, 40), classes=["a", "b", "c"], name="toy")


def test_a_replay_file_holds_one_sensors_test_samples_in_the_documented_format(data, tmp_path):
    path = save_replay(data, "cam1", tmp_path / "cam1.npz")
    with np.load(path) as archive:
        assert sorted(archive.files) == ["classes", "split", "x_cam1", "y"]
        assert (archive["split"] == 1).all() and list(archive["classes"]) == ["a", "b", "c"]
    np.testing.assert_array_equal(load_sensor(path, "cam1"), data.test().sensors["cam1"])


def test_a_whole_data_set_gives_the_same_samples_as_loading_it_all(data, tmp_path):
    path = save_npz(data, tmp_path / "all.npz")
    for split, part in (("test", data.test()), ("train", data.train()), ("all", data)):
        np.testing.assert_array_equal(load_sensor(path, "cam0", split), part.sensors["cam0"])


def test_without_a_split_array_the_seeded_split_of_the_format_is_used(data, tmp_path):
    path = tmp_path / "nosplit.npz"
    np.savez(path, x_cam0=data.sensors["cam0"], y=data.y)
    np.testing.assert_array_equal(load_sensor(path, "cam0"), load_npz(path).test().sensors["cam0"])


def test_only_the_devices_own_array_is_read(data, tmp_path):
    """A peer's array that the whole-file loader refuses does not stop a device."""
    path = tmp_path / "mixed.npz"
    bad = data.sensors["cam1"].astype(np.float32)
    bad[0, 0, 0, 0] = np.inf
    np.savez(path, x_cam0=data.sensors["cam0"], x_cam1=bad, y=data.y, split=data.split)
    with pytest.raises(DataError, match="x_cam1"):
        load_npz(path)
    assert len(load_sensor(path, "cam0")) == len(data.test())


@pytest.mark.parametrize("write, sensor, split, needle", [
    (None, "cam0", "test", "no such file"),
    (lambda p: p.write_text("not an archive"), "cam0", "test", "not a readable .npz"),
    (lambda p: np.save(open(p, "wb"), np.zeros(3)), "cam0", "test", "a single array"),
    (lambda p: np.savez(p, x_cam0=np.zeros((4, 3, 8, 8)), y=np.zeros(4, int)), "cam7", "test",
     "no array 'x_cam7': this file holds sensors ['cam0']"),
    (lambda p: np.savez(p, x_cam0=np.zeros((4, 8)), y=np.zeros(4, int)), "cam0", "test", "must be [N, C, T]"),
    (lambda p: np.savez(p, x_cam0=np.array(["a"] * 4).reshape(4, 1, 1), y=np.zeros(4, int)), "cam0", "test",
     "must be numeric"),
    (lambda p: np.savez(p, x_cam0=np.full((4, 1, 8), np.inf), y=np.zeros(4, int)), "cam0", "test", "infinite"),
    (lambda p: np.savez(p, x_cam0=np.zeros((4, 1, 8)), split=np.array([0, 1, 2, 1])), "cam0", "test",
     "array 'split' must be [4] of 0 (train) and 1 (test)"),
    (lambda p: np.savez(p, x_cam0=np.zeros((4, 1, 8)), split=np.ones(4, int)), "cam0", "train",
     "no train samples"),
])
def test_a_bad_replay_file_is_refused_naming_the_problem(tmp_path, write, sensor, split, needle):
    path = tmp_path / "r.npz"
    if write:
        write(path)
    with pytest.raises(DataError) as err:
        load_sensor(path, sensor, split)
    assert needle in str(err.value) and str(path) in str(err.value)


def test_data_replay_writes_one_file_or_one_per_sensor(data, tmp_path, capsys):
    source = save_npz(data, tmp_path / "toy.npz")
    assert main(["data", "replay", "--data", str(source), "--sensor", "cam1", "--out", str(tmp_path / "c1.npz")]) == 0
    np.testing.assert_array_equal(load_sensor(tmp_path / "c1.npz", "cam1"), data.test().sensors["cam1"])
    assert main(["data", "replay", "--data", str(source), "--out", str(tmp_path / "each")]) == 0
    assert sorted(p.name for p in (tmp_path / "each").iterdir()) == ["cam0.npz", "cam1.npz"]
    assert main(["data", "replay", "--data", str(source), "--sensor", "cam9", "--out", str(tmp_path / "x.npz")]) == 2
    assert "no sensor 'cam9'" in capsys.readouterr().err


@pytest.mark.parametrize("data_flag, needle", [
    (["--data", "images"], "fogsplit data replay --data images --sensor cam0 --out cam0.npz"),
    (["--data", "series"], "built-in data"),
    ([], "no data to replay: give --data FILE.npz"),
])
def test_a_device_refuses_built_in_data_and_points_at_the_replay_command(tmp_path, capsys, data_flag, needle):
    assert main(["device", "--bundle", str(tmp_path), "--device", "cam0", "--allow-unsigned", *data_flag]) == 2
    assert needle in capsys.readouterr().err
