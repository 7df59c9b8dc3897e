"""`fogsplit pack device`: an archive that installs a device agent with no network.

The slow tests download wheels from PyPI once into a cache kept between runs
(FOGSPLIT_PACK_CACHE, default ~/.cache/fogsplit-pack); with it filled each takes seconds."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from fogsplit.cli import main
from fogsplit.core.dataset import save_replay
from fogsplit.pack import DEFAULT_CACHE

CACHE = Path(os.environ.get("FOGSPLIT_PACK_CACHE", DEFAULT_CACHE))
HERE_PYTHON = "%d.%d" % sys.version_info[:2]


def pack(bundle, out, *extra, device="cam0", target="x86_64", python="3.11"):
    return main(["pack", "device", "--bundle", str(bundle), "--device", device, "--platform", target,
                 "--python", python, "--out", str(out), "--cache", str(CACHE), *extra])


@pytest.mark.parametrize("argv, needle", [
    (["--platform", "armv7"], "no 32-bit ARM (armv7l) wheels of numpy, onnxruntime"),
    (["--platform", "mips"], "--platform 'mips' is not one of ['aarch64', 'x86_64']"),
    (["--python", "2.7"], "--python '2.7' is not one of"),
    (["--out", "/nonexistent-dir/x.tar.gz"], "folder /nonexistent-dir does not exist"),
    (["--out", "/proc/x.tar.gz"], "--out /proc/x.tar.gz: cannot write there"),
    (["--bundle", "/nonexistent-bundle"], "--bundle /nonexistent-bundle: no such bundle directory"),
    (["--wheel", "/etc/hostname"], "not a fogsplit wheel file"),
    (["--device", "cam/0"], "device"),
])
def test_bad_input_is_refused_before_anything_is_built(tmp_path, capsys, argv, needle):
    given = {"--bundle": str(tmp_path), "--device": "cam0", "--platform": "x86_64", "--python": "3.11",
             "--out": str(tmp_path / "x.tar.gz")}
    given.update(dict(zip(argv[::2], argv[1::2])))
    assert main(["pack", "device", *[w for kv in given.items() for w in kv], "--cache", str(tmp_path / "c")]) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "c").exists(), "nothing is downloaded for a refused pack"


@pytest.mark.slow
@pytest.mark.parametrize("extra, needle", [
    (["--trusted-key", "KEY", "--device", "cam9"], "sensor 'cam9' is not in this bundle"),
    ([], "is signed: give --trusted-key"),
    (["--trusted-key", "KEY", "--replay", "SERIES"], "samples of shape [2, 16], but the bundle's cam0 takes [3, 32, 32]"),
])
def test_a_pack_that_does_not_fit_its_bundle_is_refused(bundle_dir, trusted_keys, tmp_path, capsys, extra, needle):
    import numpy as np
    series = tmp_path / "series.npz"
    np.savez(series, x_cam0=np.zeros((4, 2, 16), np.float32), y=np.zeros(4, int), split=np.ones(4, int))
    extra = [str(trusted_keys[0]) if w == "KEY" else str(series) if w == "SERIES" else w for w in extra]
    assert pack(bundle_dir, tmp_path / "x.tar.gz", *extra) == 2
    assert needle in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(platform.machine() != "x86_64", reason="installs the x86_64 pack on this machine")
def test_the_x86_64_pack_installs_offline_into_a_fresh_venv(bundle_dir, trusted_keys, small_data, tmp_path):
    replay = save_replay(small_data, "cam0", tmp_path / "cam0.npz")
    out = tmp_path / "cam0.tar.gz"
    assert pack(bundle_dir, out, "--trusted-key", str(trusted_keys[0]), "--replay", str(replay),
                "--broker", "mqtts://gw.lan:8883", "--fleet", "plant7", python=HERE_PYTHON) == 0
    with tarfile.open(out) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    [root] = (tmp_path / "x").iterdir()
    assert root.name == f"fogsplit-device-cam0-x86_64-py{HERE_PYTHON}"
    assert sorted(p.name for p in (root / "bundle").iterdir()) == ["device_cam0.onnx", "manifest.json",
                                                                   "manifest.sig"]
    assert [p.name for p in (root / "trusted").iterdir()] == [trusted_keys[0].name]
    assert (root / "replay" / "cam0.npz").is_file() and (root / "systemd" / "fogsplit-device.service").is_file()
    assert os.access(root / "install.sh", os.X_OK)

    # The install script's own venv step, with no index and none of this machine's pip settings.
    venv = tmp_path / "venv"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(["sh", str(root / "install.sh"), "--venv-only", str(venv)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    help_text = subprocess.run([str(venv / "bin" / "fogsplit"), "device", "--help"], env=env, capture_output=True,
                               text=True, timeout=60)
    assert help_text.returncode == 0 and "--trusted-key" in help_text.stdout, help_text.stderr
    shown = subprocess.run([str(venv / "bin" / "fogsplit"), "config", "show", "--role", "device", "--format", "json",
                            "--config", str(root / "config" / "device.toml")], env=env, capture_output=True,
                           text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    config = json.loads(shown.stdout)
    assert config["data"] == "/var/lib/fogsplit/replay/cam0.npz" and config["fleet"] == "plant7"
    assert config["trusted_keys"] == [f"/etc/fogsplit/trusted/{trusted_keys[0].name}"]


@pytest.mark.slow
def test_the_install_script_refuses_another_python(bundle_dir, trusted_keys, tmp_path):
    other = "3.13" if HERE_PYTHON != "3.13" else "3.12"
    out = tmp_path / "cam0.tar.gz"
    assert pack(bundle_dir, out, "--trusted-key", str(trusted_keys[0]), python=other) == 0
    with tarfile.open(out) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    [root] = (tmp_path / "x").iterdir()
    done = subprocess.run(["sh", str(root / "install.sh"), "--venv-only", str(tmp_path / "venv")],
                          env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable}, capture_output=True, text=True)
    assert done.returncode == 2 and f"wheels for Python {other}, but" in done.stderr
    assert not (tmp_path / "venv").exists()


@pytest.mark.slow
@pytest.mark.parametrize("python", ["3.11", "3.13"])
def test_the_aarch64_wheelhouse_resolves_with_no_index(bundle_dir, trusted_keys, tmp_path, python):
    out = tmp_path / "cam1.tar.gz"
    assert pack(bundle_dir, out, "--trusted-key", str(trusted_keys[0]), device="cam1", target="aarch64",
                python=python) == 0
    with tarfile.open(out) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    wheelhouse = next((tmp_path / "x").iterdir()) / "wheelhouse"
    names = [p.name for p in wheelhouse.iterdir()]
    assert any(n.startswith("onnxruntime-") and "manylinux_2_28_aarch64" in n for n in names), names
    done = subprocess.run([sys.executable, "-m", "pip", "--isolated", "install", "--dry-run", "--no-index",
                           "--find-links", str(wheelhouse), "--platform", "manylinux_2_28_aarch64",
                           "--platform", "manylinux2014_aarch64",       # a Pi with glibc 2.28 takes both
                           "--python-version", python, "--only-binary=:all:", "--target", str(tmp_path / "t"),
                           "--report", str(tmp_path / "r.json"), "fogsplit"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    chosen = {i["metadata"]["name"].lower() for i in json.loads((tmp_path / "r.json").read_text())["install"]}
    assert {"fogsplit", "numpy", "onnxruntime", "paho-mqtt", "msgpack", "msgspec", "pynacl"} <= chosen
