"""The broker the program starts for itself when no ``--broker`` is given.

Mosquitto when its binary is installed (``apt install mosquitto``): it speaks MQTT 5, whose
topic aliases take the topic off every data packet after the first, and it sets TCP_NODELAY.
Otherwise rumqttd through the ``iotcore`` wheel, which installs with pip on x86_64, aarch64 and
armv7 but speaks MQTT 3.1.1 only. docs/architecture.md has the measurements behind the order.
"""
from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

KINDS = ("auto", "mosquitto", "rumqttd")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def mosquitto_binary() -> str | None:
    found = shutil.which("mosquitto")
    if found:
        return found
    return "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None


def wait_for_port(host: str, port: int, timeout: float = 10.0, *, process: subprocess.Popen | None = None,
                  log_file: Path | None = None) -> None:
    """Return once something accepts TCP connections on ``host:port``; raise if it never does,
    or at once if ``process`` (the server being waited for) exits, with its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            text = log_file.read_text() if log_file and log_file.exists() else ""
            raise RuntimeError(f"the broker exited with code {process.returncode} before listening on "
                               f"{host}:{port}\n{text}")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing listens on {host}:{port} after {timeout}s")


def mosquitto_config(host: str, port: int, log_file: Path) -> str:
    return (f"listener {port} {host}\nallow_anonymous true\npersistence false\n"
            f"max_queued_messages 100000\nset_tcp_nodelay true\nlog_dest file {log_file}\n")


class EmbeddedBroker:
    """Start with ``with EmbeddedBroker() as url: ...``; the broker stops on exit.

    ``kind`` is ``auto`` (Mosquitto if installed, else rumqttd), ``mosquitto`` or ``rumqttd``.
    """

    def __init__(self, port: int | None = None, host: str = "127.0.0.1", kind: str = "auto") -> None:
        if kind not in KINDS:
            raise ValueError(f"broker kind {kind!r} is not one of {KINDS}")
        if kind == "auto":
            kind = "mosquitto" if mosquitto_binary() else "rumqttd"
        self.kind = kind
        self.host = host
        self.port = port or free_port(host)
        self._broker = None
        self._process: subprocess.Popen | None = None
        self._workdir: tempfile.TemporaryDirectory | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self) -> "EmbeddedBroker":
        if self.kind == "mosquitto":
            self._start_mosquitto()
        else:
            self._start_rumqttd()
        log.info("embedded broker (%s) listening on %s", self.kind, self.url)
        return self

    def _start_mosquitto(self) -> None:
        binary = mosquitto_binary()
        if binary is None:
            raise RuntimeError("mosquitto is not installed (apt install mosquitto); use kind 'rumqttd'")
        self._workdir = tempfile.TemporaryDirectory(prefix="fogsplit-mosquitto-")
        root = Path(self._workdir.name)
        conf, log_file = root / "mosquitto.conf", root / "mosquitto.log"
        conf.write_text(mosquitto_config(self.host, self.port, log_file))
        self._process = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)
        try:
            wait_for_port(self.host, self.port, process=self._process, log_file=log_file)
        except RuntimeError:
            self.stop()
            raise

    def _start_rumqttd(self) -> None:
        try:
            from iotcore import Broker
        except ImportError as exc:
            raise RuntimeError("the embedded broker needs Mosquitto installed or the 'broker' extra: "
                               "pip install 'fogsplit[broker]'; or point --broker at a running MQTT broker") from exc
        self._broker = Broker(port=self.port, listen=self.host).start()

    def kill(self) -> None:
        """Crash the broker: SIGKILL for Mosquitto (nothing saved, no goodbye to clients); the
        in-process rumqttd can only be stopped. Whatever it kept in memory is gone."""
        if self._process is not None:
            self._process.kill()
            self._process.wait(10)
            self._process = None
        self.stop()

    def stop(self) -> None:
        if self._broker is not None:
            self._broker.stop()
            self._broker = None
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
            self._process = None
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    def __enter__(self) -> str:
        return self.start().url

    def __exit__(self, *exc: object) -> None:
        self.stop()
