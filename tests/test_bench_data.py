"""`fogsplit bench data`: the classic baselines on their own, and a tiny run over a real broker."""
from __future__ import annotations

import json

import numpy as np
import pytest

from fogsplit.bench import baselines
from fogsplit.bench.data import capped, main as bench_data
from fogsplit.cli import main
from fogsplit.core.dataset import make_dataset

FIGURES = {"name", "accuracy", "exit_accuracy", "best_single_device", "cloud_only", "nn_euclidean", "nn_dtw",
           "minirocket", "bytes_per_event", "reduction", "lost"}


def toy_series(n: int = 60, length: int = 24, seed: int = 0):
    """Two sensors, two classes told apart by frequency; the second class's series end early (NaN)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    t = np.arange(length)
    wave = np.sin(np.outer(1 + 2 * y, t) * 0.4)[:, None, :]
    x = wave + 0.1 * rng.standard_normal((n, 2, length))
    x[y == 1, :, length - 5:] = np.nan
    split = (np.arange(n) >= n * 2 // 3).astype(np.int8)
    return make_dataset({"a": x[:, :1].astype(np.float32), "b": (5 * x[:, 1:] + 3).astype(np.float32)}, y,
                        split=split, name="toy")


def test_znormalise_uses_training_statistics_and_zeroes_nan():
    x = np.array([[[1.0, 3.0, np.nan]], [[5.0, 7.0, 9.0]]], dtype=np.float32)
    z = baselines.znormalise(x, np.array([True, False]))
    assert z[0, 0].tolist() == [-1.0, 1.0, 0.0]                 # train mean 2, deviation 1; NaN -> 0
    assert z[1, 0].tolist() == [3.0, 5.0, 7.0]


def test_nn_euclidean_picks_the_nearest():
    train = np.array([[[0.0, 0.0]], [[10.0, 10.0]]])
    assert baselines.nn_euclidean(train, np.array([3, 7]), np.array([[[9.0, 8.0]], [[1.0, -1.0]]])).tolist() == [7, 3]


def test_images_have_no_series_baselines():
    rng = np.random.default_rng(0)
    data = make_dataset({"cam0": rng.random((20, 3, 8, 8)).astype(np.float32)}, np.arange(20) % 2,
                        split=(np.arange(20) >= 14).astype(np.int8))
    scores = baselines.classic_baselines(data)
    assert 0 <= scores["nn_euclidean"].accuracy <= 1
    for name in ("nn_dtw", "minirocket"):
        assert scores[name].accuracy is None and "images" in scores[name].reason


def test_series_baselines_on_a_toy_set():
    pytest.importorskip("aeon")
    scores = baselines.classic_baselines(toy_series())
    assert {k: s.accuracy for k, s in scores.items()} == {"nn_euclidean": 1.0, "nn_dtw": 1.0, "minirocket": 1.0}


def test_the_test_cap_draws_from_every_class():
    data = toy_series()
    small = capped(data, 6, seed=0)
    assert (small.split == 1).sum() == 6 and (small.split == 0).sum() == (data.split == 0).sum()
    assert capped(data, 10_000, seed=0) is data


@pytest.mark.parametrize("argv, problem", [
    (["--datasets", "Nope"], "each must be one of"),
    (["--export-option", "bogus=1"], "Unexpected keyword argument 'bogus'"),
    (["--export-option", "seed=3"], "given by --seed"),
    (["--broker", "ftp://x"], "--broker"),
])
def test_bad_flags_are_refused_before_anything_runs(argv, problem, capsys):
    with pytest.raises(SystemExit):
        bench_data(argv)
    assert problem in capsys.readouterr().err


@pytest.mark.slow
def test_bench_data_on_a_tiny_archive_set(mosquitto, tmp_path, capsys):
    pytest.importorskip("aeon")
    out = tmp_path / "data.json"
    code = main(["bench", "data", "--datasets", "BasicMotions", "--test-events", "8", "--epochs", "1",
                 "--broker", mosquitto, "--rate", "50", "--workdir", str(tmp_path / "w"), "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert {"datasets", "method", "broker", "seed"} <= set(report)
    (row,) = report["datasets"]
    assert FIGURES <= set(row) and "error" not in row
    assert row["name"] == "BasicMotions" and row["test"] == 8 and row["train"] == 40
    for key in ("accuracy", "best_single_device", "cloud_only", "nn_euclidean", "nn_dtw", "minirocket"):
        assert isinstance(row[key], float) and 0 <= row[key] <= 1, key
    assert set(row["exit_accuracy"]) >= {"local", "edge", "cloud"}
    assert row["lost"] == 0 and row["cloud_only_lost"] == 0
    assert 0 < row["bytes_per_event"] < row["raw_bytes_per_event"] and row["reduction"] > 1
    assert "BasicMotions" in capsys.readouterr().out
