"""Command-line flags: bad values are refused with a message naming the flag."""
from __future__ import annotations

import pytest

from fogsplit.cli import build_parser, main


@pytest.mark.parametrize("argv,needle", [
    (["device", "--bundle", "b", "--device", "cam/0"], "--device"),
    (["device", "--bundle", "b", "--device", "cam0", "--rate", "0"], "--rate"),
    (["device", "--bundle", "b", "--device", "cam0", "--rate", "fast"], "--rate"),
    (["device", "--bundle", "b", "--device", "cam0", "--policy", "sometimes"], "--policy"),
    (["gateway", "--bundle", "b", "--broker", "http://x"], "--broker"),
    (["gateway", "--bundle", "b", "--broker", "mqtt://x:notaport"], "--broker"),
    (["gateway", "--bundle", "b", "--fleet", "a/b"], "--fleet"),
    (["gateway", "--bundle", "b", "--deadline-ms", "-5"], "--deadline-ms"),
    (["export", "--out", "x", "--edge-fusion", "sum"], "--edge-fusion"),
    (["demo", "--events", "-1"], "--events"),
    (["launch"], "invalid choice"),
    (["gateway", "--bundle", "b", "--local-threshold", "1.5"], "--local-threshold"),
    (["gateway", "--bundle", "b", "--edge-threshold", "x"], "--edge-threshold"),
    (["export", "--out", "x", "--feature-codec", "rot13"], "--feature-codec"),
    (["export", "--out", "x", "--scores-codec", "sign"], "--scores-codec"),
    (["export", "--out", "x", "--feature-bytes", "0"], "--feature-bytes"),
    (["export", "--out", "x", "--steps", "0"], "--steps"),
    (["export", "--out", "x", "--steps", "many"], "--steps"),
    (["export", "--out", "x", "--epochs", "3", "--steps", "100"], "not allowed with argument"),
    (["bench", "nosuch"], "invalid choice"),
])
def test_bad_flags_are_refused(argv, needle, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(argv)
    assert exit_.value.code == 2
    assert needle in capsys.readouterr().err


@pytest.mark.parametrize("argv,needle", [
    (["device", "--bundle", "b"], "--device"),
    (["cloud"], "--bundle"),
])
def test_a_missing_required_setting_names_its_flag_variable_and_key(argv, needle, capsys, monkeypatch):
    """Required settings may come from --config or the environment, so argparse cannot require them."""
    for name in [n for n in __import__("os").environ if n.startswith("FOGSPLIT_")]:
        monkeypatch.delenv(name)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "missing setting" in err and "FOGSPLIT_" in err


def test_missing_bundle_is_a_clear_error(tmp_path, capsys):
    assert main(["gateway", "--bundle", str(tmp_path / "nope")]) == 2
    assert "no manifest.json" in capsys.readouterr().err


def test_bad_data_file_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "x.npz"
    bad.write_bytes(b"junk")
    assert main(["export", "--data", str(bad), "--out", str(tmp_path / "b")]) == 2
    assert "not a readable .npz" in capsys.readouterr().err


def test_unreachable_broker_is_a_clear_error(bundle_dir, trusted_keys, capsys):
    from fogsplit.bench.embedded import free_port
    code = main(["cloud", "--bundle", str(bundle_dir), "--trusted-key", str(trusted_keys[0]),
                 "--broker", f"mqtt://127.0.0.1:{free_port()}"])
    assert code == 2
    assert "cannot reach broker" in capsys.readouterr().err


def test_data_command_writes_the_documented_format(tmp_path):
    from fogsplit.core.dataset import load_npz
    out = tmp_path / "s.npz"
    assert main(["data", "series", "--events", "50", "--out", str(out)]) == 0
    ds = load_npz(out)
    assert len(ds) == 50 and ds.kind == "series"


@pytest.mark.parametrize("argv,needle", [
    (["bench", "comm", "--thresholds", "0.2,1.5"], "--thresholds"),
    (["bench", "comm", "--thresholds", "low"], "--thresholds"),
    (["bench", "comm", "--settings", "best"], "--settings"),
    (["bench", "comm", "--rate", "0"], "--rate"),
    (["bench", "comm", "--phase-threshold", "0.2,0.4"], "--phase-threshold"),
    (["bench", "comm", "--broker", "tcp://x"], "--broker"),
    (["bench", "cache", "--scenarios", "wan-cloud,moon"], "--scenarios"),
    (["bench", "cache", "--wan-ms", "-5"], "--wan-ms"),
    (["bench", "cache", "--wan-ms", "far"], "--wan-ms"),
])
def test_bench_flags_are_refused(argv, needle, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert needle in capsys.readouterr().err


def test_demo_refuses_a_bundle_built_for_other_data(bundle_dir, trusted_keys, capsys):
    assert main(["demo", "--bundle", str(bundle_dir), "--trusted-key", str(trusted_keys[0]), "--data", "series",
                 "--events", "60"]) == 2
    assert "sensors" in capsys.readouterr().err
