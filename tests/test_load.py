"""The load and soak benchmarks (fogsplit bench load, fogsplit bench soak): their tallies, and a
very short run of each on a real broker. No timing is asserted: rates and latencies are the
benchmarks' to report; the runs check that the JSON has its keys and that no process died."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from fogsplit.bench.embedded import mosquitto_binary
from fogsplit.bench.load import CpuSampler, judge, summarize_profile, tally, window_events
from fogsplit.bench.soak import per_minute, per_tier, rss_growth
from fogsplit.bench.stack import Arrival

DEVICES = 3
HAVE_BROKER = mosquitto_binary() is not None or importlib.util.find_spec("iotcore") is not None


@pytest.fixture(scope="module")
def replay_dir(small_data, tmp_path_factory) -> Path:
    """``<dir>/<sensor>.npz`` for the first devices of the test data set (the bundle's sensors)."""
    from fogsplit.core.dataset import save_replay
    out = tmp_path_factory.mktemp("load-replays")
    for sensor in small_data.sensor_names[:DEVICES]:
        save_replay(small_data, sensor, out / f"{sensor}.npz")
    return out


def _arrival(event: int, at: float, **kw) -> Arrival:
    return Arrival(event=event, at=at, captured=event / 10, exit=kw.pop("exit", "local"), **kw)


# -- the tallies ----------------------------------------------------------------------------------

def test_window_events_leave_out_the_slots_the_source_skipped() -> None:
    assert window_events(10.0, 10.0, 11.0) == list(range(100, 110))
    assert window_events(10.0, 10.0, 11.0, [[103, 106], [200, 300]]) == [100, 101, 102, 106, 107, 108, 109]


def test_tally_counts_answers_silence_notices_and_shed() -> None:
    arrivals = [_arrival(e, e / 10 + 0.01) for e in (100, 101, 102)]
    arrivals += [_arrival(101, 10.5),                                          # a duplicate
                 _arrival(103, 10.4, exit="lost", lost=True, reason="gateway restarted"),
                 _arrival(104, 10.45, reason="shed: the gateway was behind"),
                 _arrival(999, 100.0)]                                         # not an event of the window
    row = tally(arrivals, [100, 101, 102, 103, 104, 105])
    assert (row["captured"], row["results"], row["lost"], row["lost_notices"]) == (6, 4, 1, 1)
    assert row["duplicates"] == 1 and row["shed"] == 1
    assert row["local_latency_ms"]["n"] == 3          # the shed answer is degraded: not a plain local exit
    assert row["latency_ms"]["p50"] == pytest.approx(10.0)


def test_a_rate_is_held_only_without_loss_shedding_or_a_late_p99() -> None:
    row = {"captured": 10, "lost": 0, "lost_notices": 0, "shed": 0, "gateway": {"shed": 0},
           "latency_ms": {"p99": 20.0}, "source": {"skipped": 0}, "died": []}
    assert judge(row, 1000.0) == {"holds": True, "why": []}
    assert not judge({**row, "gateway": {"shed": 3}}, 1000.0)["holds"]
    assert not judge({**row, "latency_ms": {"p99": 1500.0}}, 1000.0)["holds"]
    assert not judge({**row, "source": {"skipped": 5}}, 1000.0)["holds"]


def test_rss_growth_is_taken_after_the_warmup_per_process_and_per_tier() -> None:
    samples = [{"t_s": 0, "rss_mb": {"gateway": 50.0, "cam0": 40.0, "cam1": 40.0, "cloud0": 70.0}},
               {"t_s": 60, "rss_mb": {"gateway": 80.0, "cam0": 80.0, "cam1": 80.0, "cloud0": 70.0}},
               {"t_s": 120, "rss_mb": {"gateway": 88.0, "cam0": 80.0, "cam1": 84.0, "cloud0": 70.0}}]
    growth, info = rss_growth(samples, warmup_s=60)
    assert growth["gateway"] == pytest.approx(0.10) and growth["cloud0"] == 0.0
    assert info["gateway"]["mb_per_min"] == pytest.approx(8.0)
    assert per_tier(growth, ["cam0", "cam1"]) == {"gateway": pytest.approx(0.10), "devices": pytest.approx(0.05),
                                                  "cloud": 0.0}


def test_per_minute_buckets_by_capture_time() -> None:
    arrivals = [_arrival(e, e / 10 + 0.1) for e in range(0, 1200, 100)]
    minutes = per_minute(arrivals, start=0.0, end=120.0)
    assert [m["minute"] for m in minutes] == [0, 1] and minutes[0]["p99_ms"] == pytest.approx(100.0)


def test_the_profile_summary_splits_work_from_waiting() -> None:
    loop = "thread (1): cell0/gw0;Thread.run (threading.py:1);Service._loop (service.py:2)"
    raw = (f"{loop};Journal.has (journal.py:3) 6\n{loop};Condition.wait (threading.py:9) 2\n"
           "thread (2): paho-net;Client._loop (client.py:1667) 2\n")
    body = summarize_profile(raw)
    assert body["samples"] == 10 and body["waiting"] == pytest.approx(0.4)
    assert body["own"][0] == ["Journal.has (journal.py:3)", 0.6]
    assert dict(body["threads"]) == {"cell0/gw0": 0.8, "paho-net": 0.2}


def test_the_cpu_sampler_reports_this_process() -> None:
    import os
    sampler = CpuSampler({"bench": os.getpid()}, threads_of=("bench",)).start()
    sum(i * i for i in range(200_000))
    report = sampler.stop()
    assert report["processes"]["bench"]["cpu_s"] >= 0 and report["machine"]["cpus"] >= 1


# -- short runs -------------------------------------------------------------------------------------

def _cell_flags(tmp_path: Path, bundle_dir: Path, trusted_keys: list[Path], replay_dir: Path) -> list[str]:
    return ["--devices", str(DEVICES), "--bundle", str(bundle_dir), "--trusted-key", str(trusted_keys[0]),
            "--replays", str(replay_dir), "--workdir", str(tmp_path / "w")]


@pytest.mark.slow
@pytest.mark.broker
@pytest.mark.skipif(not HAVE_BROKER, reason="no broker here")
def test_bench_load_writes_its_figures(tmp_path, bundle_dir, trusted_keys, replay_dir, capsys) -> None:
    from fogsplit.cli import main
    out = tmp_path / "load.json"
    assert main(["bench", "load", "--rates", "20", "--window-s", "2", "--warmup-s", "0.5", "--settle-s", "1",
                 "--latency-rate", "10", "--overload-rate", "40", "--bare-trials", "1", "--bare-seconds", "1",
                 "--bare-start-rate", "50", "--rtt-count", "20", "--sigterm-timeout", "20",
                 *_cell_flags(tmp_path, bundle_dir, trusted_keys, replay_dir), "--json", str(out)]) == 0
    body = json.loads(out.read_text())
    for key in ("max_rate", "bare_ceiling", "local_latency_ms_p50", "bare_rtt_ms_p50", "overload", "cpu", "steps",
                "bottleneck"):
        assert key in body, key
    for key in ("events", "results", "shed", "lost", "p99_ms", "sigterm_s", "sigterm_exit"):
        assert key in body["overload"], key
    assert [s["died"] for s in body["steps"]] == [[]] and body["overload"]["died"] == []
    assert body["local_latency"]["died"] == []
    assert body["overload"]["sigterm_killed"] is False
    assert body["steps"][0]["captured"] > 0 and "gateway" in body["cpu"]["processes"]
    assert "bottleneck" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.broker
@pytest.mark.skipif(not HAVE_BROKER, reason="no broker here")
def test_bench_soak_writes_its_figures(tmp_path, bundle_dir, trusted_keys, replay_dir) -> None:
    from fogsplit.cli import main
    out = tmp_path / "soak.json"
    assert main(["bench", "soak", "--minutes", "0.15", "--rate", "12.5", "--sample-s", "3", "--warmup-s", "2",
                 "--settle-s", "1", *_cell_flags(tmp_path, bundle_dir, trusted_keys, replay_dir),
                 "--json", str(out)]) == 0
    body = json.loads(out.read_text())
    for key in ("rss_growth", "lost", "latency_ms_p99_per_minute", "samples", "rate"):
        assert key in body, key
    assert body["rate"] == 10.0 and body["died"] == []
    assert set(body["rss_growth"]) >= {"gateway", "devices", "cloud", "broker"}
    assert len(body["samples"]) >= 2 and body["captured"] > 0
