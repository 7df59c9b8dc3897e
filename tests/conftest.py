"""Fixtures: real brokers on free ports, and a small trained bundle shared by the tests."""
from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from fogsplit.broker import EmbeddedBroker, free_port

MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)


def _wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout}s")


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory) -> str:
    """A private Mosquitto on a free port, with its own config file (never the shared 1883)."""
    if MOSQUITTO is None:
        pytest.fail("mosquitto is not installed (apt-get install mosquitto); .ci/run installs it")
    port = free_port()
    workdir = tmp_path_factory.mktemp("mosquitto")
    conf = workdir / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                    f"max_queued_messages 100000\nset_tcp_nodelay true\nlog_dest file {workdir / 'mosquitto.log'}\n")
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for_port(port)
        yield f"mqtt://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="session")
def embedded() -> str:
    with EmbeddedBroker() as url:
        yield url


@pytest.fixture(params=["mosquitto", "embedded"])
def broker(request) -> str:
    """Each integration test runs against both brokers."""
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="session")
def small_data():
    from fogsplit.export.datasets import multiview_images
    return multiview_images(n_events=600, seed=1)


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory, small_data) -> Path:
    """A bundle trained briefly on a small image set: real training, real ONNX, real parity check."""
    from fogsplit.export.pipeline import ExportOptions, export_bundle
    out = tmp_path_factory.mktemp("bundle")
    export_bundle(small_data, out, ExportOptions(epochs=8, seed=0, progress=False))
    return out
