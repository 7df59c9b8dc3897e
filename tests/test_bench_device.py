"""`fogsplit bench device`: a real agent process, a replay file, an embedded broker, figures in JSON."""
from __future__ import annotations

import json

import pytest

from fogsplit.bench import device as bench_device
from fogsplit.cli import main
from fogsplit.core.dataset import save_replay

HEAVY = {"torch", "onnx", "tqdm", "matplotlib", "iotcore", "hnswlib"}


@pytest.mark.slow
def test_bench_device_measures_a_real_agent_against_the_import_floor(bundle_dir, trusted_keys, small_data, tmp_path,
                                                                      capsys):
    replay = save_replay(small_data, "cam2", tmp_path / "cam2.npz")
    out = tmp_path / "device.json"
    assert main(["bench", "device", "--bundle", str(bundle_dir), "--device", "cam2", "--replay", str(replay),
                 "--trusted-key", str(trusted_keys[0]), "--runs", "1", "--stream-s", "2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert {"imports", "rss_mb", "floor_rss_mb", "cold_start_s", "cpu_ms_per_event"} <= set(report)
    assert {"fogsplit", "onnxruntime", "numpy", "paho", "msgpack", "msgspec"} <= set(report["imports"])
    assert not HEAVY & set(report["imports"]), "the device imported a heavy package"
    assert report["rss_mb"] > report["floor_rss_mb"] > 0
    assert report["cold_start_s"] > 0 and report["cpu_ms_per_event"] > 0 and report["per_run"][0]["events"] > 0
    assert "cold start to first scores" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_device_says_why_an_agent_it_started_published_nothing(embedded, bundle_dir, small_data,
                                                                             tmp_path):
    replay = save_replay(small_data, "cam2", tmp_path / "cam2.npz")
    with pytest.raises(RuntimeError, match=r"(?s)published no scores \(exit 2\).*fogsplit device: error: .*key"):
        bench_device.measure(bundle_dir, "cam2", replay, runs=1, rate=10, stream_s=1, url=embedded)


def test_cpu_and_memory_are_read_from_proc():
    import os
    assert bench_device.rss_mib(os.getpid()) > 1
    assert bench_device.cpu_s(os.getpid()) > 0
    assert bench_device.third_party(["numpy", "os", "_io", "fogsplit", "__main__"]) == ["fogsplit", "numpy"]
