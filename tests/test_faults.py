"""The chaos benchmark (fogsplit bench faults): its tally, its proxy's partition, the configs its
stack writes, and a short version of every fault on both brokers.

The fault tests assert the delivery contract (docs/reliability.md): through any one fault, no
captured event is lost silently and none is answered twice. They assert no timing: recovery
and latency are the benchmark's to report."""
from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest

from fogsplit.bench.embedded import mosquitto_binary
from fogsplit.bench.faults import FAULTS, QUICK, run_fault, tally
from fogsplit.bench.proxy import TcpProxy
from fogsplit.bench.stack import Arrival, Stack, StackOptions, parse_arrival, toml_text
from fogsplit.core.config import load_config
from fogsplit.core.mqtt import MqttTransport, wait_until

DEVICES = 3


def _broker_available(kind: str) -> bool:
    if kind == "mosquitto":
        return mosquitto_binary() is not None
    return importlib.util.find_spec("iotcore") is not None


BROKERS = [pytest.param(kind, marks=pytest.mark.skipif(not _broker_available(kind), reason=f"no {kind} broker here"))
           for kind in ("mosquitto", "embedded")]


@pytest.fixture(scope="session")
def replays(small_data, tmp_path_factory) -> dict[str, Path]:
    """Replay files of the first devices of the test data set (the bundle's sensors)."""
    from fogsplit.core.dataset import save_replay
    out = tmp_path_factory.mktemp("replays")
    return {s: save_replay(small_data, s, out / f"{s}.npz") for s in small_data.sensor_names[:DEVICES]}


def _options(tmp_path: Path, bundle_dir: Path, trusted_keys: list[Path], replays: dict[str, Path],
             broker: str = "embedded") -> StackOptions:
    return StackOptions(bundle=bundle_dir, replays=replays, workdir=tmp_path, broker_kind=broker,
                        trusted_keys=list(trusted_keys))


# -- the tally ------------------------------------------------------------------------------------

def _arrival(event: int, at: float, **kw) -> Arrival:
    return Arrival(event=event, at=at, captured=event / 10, exit=kw.pop("exit", "local"), **kw)


def test_tally_counts_each_event_of_the_window_once() -> None:
    # window [10.0, 11.0) at 10/s: events 100..109; the fault ends at 10.5 (event 105 on)
    arrivals = [_arrival(e, e / 10 + 0.05) for e in (100, 101, 102, 106, 107)]
    arrivals += [_arrival(101, 10.3),                                      # a duplicate
                 _arrival(103, 10.9, exit="lost", lost=True, reason="gateway restarted"),
                 _arrival(108, 11.2, late=True, late_s=0.4),
                 _arrival(99, 9.95), _arrival(110, 11.05)]                 # outside the window
    row = tally(arrivals, t0=10.0, t1=11.0, fault_end=10.5, rate=10.0)
    assert row["captured"] == 10
    assert row["results"] == 6                   # 100 101 102 106 107 108
    assert row["lost_notices"] == 1 and row["lost_reasons"] == {"gateway restarted": 1}
    assert row["lost"] == 3                      # 104 105 109: nothing at all
    assert row["duplicates"] == 1 and row["late"] == 1
    assert row["recovery_s"] == pytest.approx(10.65 - 10.5)     # event 106's answer
    assert row["latency_ms_p50"] == pytest.approx(50.0)


def test_parse_arrival_reads_every_shape_and_the_optional_fields() -> None:
    body = {"event": 7, "captured": 1.5, "exit": "lost", "reason": "shed", "late": True, "late_s": 2.0,
            "devices": ["cam0", "cam1"]}
    for shape in (body, json.dumps(body).encode()):
        a = parse_arrival(shape, at=3.0)
        assert (a.event, a.lost, a.reason, a.late, a.late_s, a.devices) == (7, True, "shed", True, 2.0, 2)
    assert parse_arrival(b"not json", 1.0) is None
    assert parse_arrival({"event": "7"}, 1.0) is None


# -- the stack's configs --------------------------------------------------------------------------

def test_the_stack_writes_configs_its_tiers_accept(tmp_path, bundle_dir, trusted_keys, replays) -> None:
    stack = Stack(_options(tmp_path, bundle_dir, trusted_keys, replays))
    roles = {"gateway": "gateway", "cloud0": "cloud", **{d: "device" for d in replays}}
    for name, body in stack._configs().items():
        body["broker"] = {"url": "mqtt://127.0.0.1:1884", "keepalive": None}
        path = tmp_path / f"{name}.toml"
        path.write_text(toml_text(body))
        config = load_config(roles[name], path=path).config
        assert config.bundle == str(bundle_dir)
        assert config.broker.url == "mqtt://127.0.0.1:1884"


# -- the proxy ------------------------------------------------------------------------------------

@pytest.mark.broker
@pytest.mark.skipif(mosquitto_binary() is None, reason="no mosquitto here")
def test_a_partition_holds_traffic_without_closing_the_connection(mosquitto) -> None:
    got: list[bytes] = []
    sub = MqttTransport(mosquitto, "partition-sub")
    sub.subscribe("bench/partition", lambda msg: got.append(msg.payload))
    sub.connect()
    with TcpProxy(mosquitto) as proxy:
        pub = MqttTransport(proxy.url, "partition-pub").connect()
        try:
            pub.publish("bench/partition", b"before", qos=0)
            assert wait_until(lambda: got == [b"before"], timeout=5)
            sent = proxy.upstream_bytes
            assert sent > 0 and proxy.downstream_bytes > 0
            proxy.partition()
            pub.publish("bench/partition", b"during", qos=0)
            time.sleep(0.5)
            assert got == [b"before"] and pub.connected          # nothing relayed, nothing noticed
            proxy.heal()
            assert wait_until(lambda: got == [b"before", b"during"], timeout=5)   # relayed as TCP would
            assert proxy.connections == 1 and proxy.upstream_bytes > sent
        finally:
            pub.close()
            sub.close()


@pytest.mark.broker
@pytest.mark.skipif(mosquitto_binary() is None, reason="no mosquitto here")
def test_a_connection_opened_during_a_partition_goes_through_when_it_heals(mosquitto) -> None:
    with TcpProxy(mosquitto) as proxy:
        proxy.partition(0.5)
        client = MqttTransport(proxy.url, "partition-late")
        started = time.monotonic()
        client.connect(timeout=10)          # its CONNECT waits at the proxy, then is relayed
        try:
            assert time.monotonic() - started >= 0.4 and proxy.connections == 1
        finally:
            client.close()


def test_a_timed_partition_heals_by_itself() -> None:
    with TcpProxy("mqtt://127.0.0.1:1") as proxy:      # nothing connects: only the state is watched
        proxy.partition(0.2)
        assert proxy.partitioned
        assert wait_until(lambda: not proxy.partitioned, timeout=5)


# -- every fault, short, on both brokers -------------------------------------------------------

@pytest.mark.slow
@pytest.mark.broker
@pytest.mark.parametrize("fault", list(FAULTS))
@pytest.mark.parametrize("broker", BROKERS)
def test_a_fault_loses_and_duplicates_nothing(broker, fault, tmp_path, bundle_dir, trusted_keys, replays) -> None:
    row = run_fault(FAULTS[fault], _options(tmp_path, bundle_dir, trusted_keys, replays, broker), QUICK)
    assert row["captured"] > 0 and row["results"] > 0
    assert row["died"] == [], f"processes died on their own: {row['died']} (logs in {tmp_path})"
    figures = {k: row[k] for k in ("captured", "results", "lost", "lost_span_s", "lost_notices", "duplicates",
                                   "late", "recovery_s")}
    assert (row["lost"], row["duplicates"]) == (0, 0), f"{fault} on {broker}: {figures}; logs in {tmp_path}"


@pytest.mark.slow
@pytest.mark.broker
@pytest.mark.skipif(not (_broker_available("mosquitto") or _broker_available("embedded")), reason="no broker")
def test_bench_faults_writes_its_table_as_json(tmp_path, bundle_dir, trusted_keys, capsys) -> None:
    from fogsplit.cli import main
    out = tmp_path / "faults.json"
    assert main(["bench", "faults", "--quick", "--faults", "device_kill", "--devices", "2", "--bundle",
                 str(bundle_dir), "--trusted-key", str(trusted_keys[0]), "--workdir", str(tmp_path / "w"),
                 "--json", str(out)]) == 0
    body = json.loads(out.read_text())
    assert body["broker"] in ("mosquitto", "embedded")
    (row,) = body["faults"]
    for key in ("name", "captured", "results", "lost", "lost_notices", "duplicates", "late", "recovery_s",
                "bytes_per_event", "latency_ms_p50", "latency_ms_p99"):
        assert key in row
    assert row["name"] == "device_kill" and row["captured"] > 0 and row["bytes_per_event"] > 0
    assert "device_kill" in capsys.readouterr().out
