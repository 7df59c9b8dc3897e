"""`fogsplit bench comm` end to end, tiny: every figure the issue names is in the JSON."""
from __future__ import annotations

import json

import pytest

from fogsplit.cli import main

pytestmark = pytest.mark.slow


def test_bench_comm_writes_every_figure(tmp_path, capsys):
    out, png = tmp_path / "comm.json", tmp_path / "comm.png"
    code = main(["bench", "comm", "--events", "300", "--epochs", "1", "--test-events", "12", "--rate", "50",
                 "--thresholds", "0.3,0.9", "--settings", "fogsplit-pruned", "--workdir", str(tmp_path / "w"),
                 "--json", str(out), "--plot", str(png)])
    assert code == 0
    r = json.loads(out.read_text())
    assert {"settings", "raw_offload", "cloud_only_accuracy", "devices_curve", "missing_device", "phases",
            "best", "operating_point"} <= set(r)
    assert [(s["name"], s["threshold"]) for s in r["settings"]] == [("fogsplit-pruned", 0.3), ("fogsplit-pruned", 0.9)]
    for s in r["settings"]:
        assert {"local", "edge", "cloud"} <= set(s["exit_fraction"])
        assert sum(s["exit_fraction"].values()) == pytest.approx(1.0, abs=1e-3)
        assert 0 < s["bytes_per_event"] < r["raw_offload"]["bytes_per_event"]
        assert s["lost"] == 0 and s["duplicates"] == 0
    assert r["raw_offload"]["bytes_per_event"] > 6 * 3 * 32 * 32
    assert [d["devices"] for d in r["devices_curve"]] == [1, 2, 3, 4, 5, 6]
    assert r["devices_curve"][0]["bytes_per_event"] < r["devices_curve"][-1]["bytes_per_event"]
    assert set(r["missing_device"]) == {f"cam{i}" for i in range(6)}
    one, two = r["phases"]["one_phase"], r["phases"]["two_phase"]
    assert one["lost"] == two["lost"] == 0 and one["threshold"] == two["threshold"]
    assert r["feature_bytes"]["fogsplit-pruned"] == 64
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "raw offload" in capsys.readouterr().out
