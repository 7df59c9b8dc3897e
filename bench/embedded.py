"""The broker the program starts for itself when no ``--broker`` is given.

Mosquitto when its binary is installed (``apt install mosquitto``). Otherwise rumqttd through
the ``iotcore`` wheel (``pip install 'fogsplit[broker]'``: x86_64, aarch64 and armv7), started
with an MQTT 5 listener: topic aliases (granted up to 4096), persistent sessions that queue
QoS 1 messages while their client is away, shared subscriptions (``$share/...``), retained
messages and last wills, TCP_NODELAY. docs/broker.md has the measurements (``fogsplit bench
broker``: same loss and bytes/event as Mosquitto, p95 latency within 2x) and where rumqttd 0.20
differs: above all, a shared subscription held by a persistent session loses what was in
flight when its member drops, and crashes rumqttd when that member was the group's last.

Either broker runs as a child process of its own (rumqttd has no shutdown API, so it cannot
live in ours): :meth:`EmbeddedBroker.stop` ends it politely, :meth:`EmbeddedBroker.kill` with
SIGKILL, as a crash would, and :meth:`EmbeddedBroker.start` starts it again on the same port.
A rumqttd child exits by itself when its parent dies (it watches its stdin pipe) and when
rumqttd panics (exit code 70). Neither keeps anything on disk unless asked (``data_dir``,
Mosquitto only): a killed broker comes back empty, without retained messages or sessions.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

KINDS = ("auto", "mosquitto", "rumqttd")
MQTT_VERSIONS = ("5", "3.1.1")

# rumqttd's limits, chosen to match compose/mosquitto/mosquitto.conf where there is a match.
MAX_PAYLOAD_BYTES = 16 << 20     # Mosquitto's max_packet_size in compose; iotcore's default is 20 kB
MAX_INFLIGHT = 1000              # QoS 1 messages in flight per client (max_inflight_messages)
# rumqttd keeps what is published on each subscribed filter in memory segments, and a client
# (a persistent session away, or a slow one) reads from them at its own offset. What it has not
# read when the oldest segment is dropped is lost to it. 8 segments of 2 MiB bound the memory
# per filter (a long run plateaus there) and keep about as much for an absent client as
# Mosquitto's queue of 10000 messages in compose.
SEGMENT_BYTES = 2 << 20
SEGMENT_COUNT = 8

# The child that runs rumqttd: ``python -c _RUMQTTD_CHILD CONFIG READY_FILE PORT LOG_FILE``.
# `python -c` puts the working directory first on sys.path: drop it, so that a folder named
# `iotcore` cannot shadow the package. rumqttd wraps its per-packet routing in ERROR-level tracing spans,
# forwarded to Python logging: silence them before the broker starts, or every packet takes the
# GIL to be logged. rumqttd never sets TCP_NODELAY on the sockets it accepts (Nagle then holds a
# small PUBLISH behind an unacknowledged one until the peer's delayed ACK: 40 ms), but on Linux
# and the BSDs an accepted socket inherits it from the listening one: the child finds rumqttd's
# listener among its own file descriptors and sets it there, before it says it is ready. A
# panic in a rumqttd thread leaves the process up but deaf (docs/broker.md has one that
# clients can cause): the child reads its own log (its stderr) and exits with code 70 at the
# first one, so that it fails like a crash rather than hangs. It exits when its parent goes
# away (the parent holds the other end of its stdin).
_RUMQTTD_CHILD = """\
import logging, os, signal, socket, sys, threading, time
sys.path[:] = [p for p in sys.path if p not in ('', '.')]
logging.basicConfig(level=logging.WARNING, format='%(asctime)s %(levelname)s %(name)s: %(message)s')
logging.getLogger('rumqttd').setLevel(logging.CRITICAL)
signal.signal(signal.SIGINT, signal.SIG_DFL)
from iotcore import IotCoreBroker
config, ready, port, log_file = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]

def exit_on_panic(log):
    while True:
        line = log.readline()
        if not line:
            time.sleep(0.1)
        elif b'panicked at' in line:
            logging.error('rumqttd panicked (above); its router is gone: exiting as a crashed broker')
            os._exit(70)

log = open(log_file, 'rb')
log.seek(0, os.SEEK_END)
threading.Thread(target=exit_on_panic, args=(log,), daemon=True).start()
broker = IotCoreBroker(config_path=config)
broker.start()

def listener_nodelay():
    fds = '/proc/self/fd' if os.path.isdir('/proc/self/fd') else '/dev/fd'
    for name in os.listdir(fds):
        try:
            fd = os.dup(int(name))
        except (OSError, ValueError):
            continue
        try:
            s = socket.socket(fileno=fd)
        except OSError:
            os.close(fd)
            continue
        try:
            if s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) and s.getsockname()[1] == port:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return True
        except OSError:
            pass
        finally:
            s.close()
    return False

deadline, nodelay = time.monotonic() + 10, False
while not nodelay and time.monotonic() < deadline:
    nodelay = listener_nodelay()
    if not nodelay:
        time.sleep(0.01)
if not nodelay:
    logging.warning('could not set TCP_NODELAY on the listener of port %d: latency suffers', port)
with open(ready + '.tmp', 'w') as f:
    f.write('nodelay' if nodelay else 'nagle')
os.replace(ready + '.tmp', ready)
try:
    sys.stdin.buffer.read()
finally:
    os._exit(0)
"""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def mosquitto_binary() -> str | None:
    found = shutil.which("mosquitto")
    if found:
        return found
    return "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None


def rumqttd_available() -> bool:
    """Whether the iotcore wheel (the 'broker' extra) is installed; not imported here: the child runs it."""
    return importlib.util.find_spec("iotcore") is not None


def wait_for_port(host: str, port: int, timeout: float = 10.0, *, process: subprocess.Popen | None = None,
                  log_file: Path | None = None) -> None:
    """Return once something accepts TCP connections on ``host:port``; raise if it never does,
    or at once if ``process`` (the server being waited for) exits, with its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            text = log_file.read_text(errors="replace") if log_file and log_file.exists() else ""
            raise RuntimeError(f"the broker exited with code {process.returncode} before listening on "
                               f"{host}:{port}\n{text}")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing listens on {host}:{port} after {timeout}s")


def mosquitto_config(host: str, port: int, log_file: Path, data_dir: Path | None = None) -> str:
    persistence = "persistence false\n"
    if data_dir is not None:
        persistence = f"persistence true\npersistence_location {data_dir}/\nautosave_interval 300\n"
        if os.geteuid() == 0:
            # as root Mosquitto drops to the `mosquitto` user, who cannot write a root's folder
            persistence += "user root\n"
    return (f"listener {port} {host}\nallow_anonymous true\n{persistence}"
            f"max_queued_messages 100000\nset_tcp_nodelay true\nlog_dest file {log_file}\n")


def rumqttd_config(host: str, port: int, mqtt: str = "5") -> str:
    """rumqttd's TOML: one listener on ``host:port``, MQTT 5 (``[v5.1]``) or 3.1.1 (``[v4.1]``)."""
    if mqtt not in MQTT_VERSIONS:
        raise ValueError(f"MQTT version {mqtt!r} is not one of {MQTT_VERSIONS}")
    server = "v5" if mqtt == "5" else "v4"
    listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return f"""\
id = 0

[router]
id = 0
max_connections = 10010
max_outgoing_packet_count = 200
max_segment_size = {SEGMENT_BYTES}
max_segment_count = {SEGMENT_COUNT}

[{server}.1]
name = "{server}-1"
listen = "{listen}"
next_connection_delay_ms = 1
    [{server}.1.connections]
    connection_timeout_ms = 60000
    max_payload_size = {MAX_PAYLOAD_BYTES}
    max_inflight_count = {MAX_INFLIGHT}
    dynamic_filters = true
"""


class EmbeddedBroker:
    """Start with ``with EmbeddedBroker() as url: ...``; the broker stops on exit.

    ``kind`` is ``auto`` (Mosquitto if installed, else rumqttd), ``mosquitto`` or ``rumqttd``.
    ``mqtt`` is ``5`` or, for rumqttd only, ``3.1.1`` (a listener that speaks nothing newer:
    what the transport's fallback is tested against). ``data_dir`` gives Mosquitto persistence
    as compose ships it (``autosave_interval 300``); rumqttd keeps nothing on disk.

    ``kill()`` then ``start()`` is a broker crash and restart on the same port.
    """

    def __init__(self, port: int | None = None, host: str = "127.0.0.1", kind: str = "auto", *,
                 mqtt: str = "5", data_dir: str | Path | None = None) -> None:
        if kind not in KINDS:
            raise ValueError(f"broker kind {kind!r} is not one of {KINDS}")
        if mqtt not in MQTT_VERSIONS:
            raise ValueError(f"MQTT version {mqtt!r} is not one of {MQTT_VERSIONS}")
        if kind == "auto":
            kind = "mosquitto" if mosquitto_binary() else "rumqttd"
        if kind == "mosquitto" and mqtt != "5":
            raise ValueError("only rumqttd can be limited to MQTT 3.1.1; Mosquitto speaks both")
        if kind == "rumqttd" and data_dir is not None:
            raise ValueError("rumqttd keeps nothing on disk: data_dir is for Mosquitto only")
        self.kind = kind
        self.mqtt = mqtt
        self.host = host
        self.port = port or free_port(host)
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self._process: subprocess.Popen | None = None
        self._workdir: tempfile.TemporaryDirectory | None = None
        self.nodelay: bool | None = None     # TCP_NODELAY on the broker's side, once started

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The broker's own process id while it runs (SIGKILL to it is a broker crash)."""
        return self._process.pid if self.running else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def exit_code(self) -> int | None:
        """How the broker ended when it ended by itself (70: rumqttd panicked); None while it
        runs or once :meth:`kill` or :meth:`stop` ended it."""
        return self._process.poll() if self._process is not None else None

    @property
    def log_file(self) -> Path | None:
        """The broker's log (rumqttd: its stderr, panics included) until :meth:`stop` removes it."""
        return Path(self._workdir.name) / f"{self.kind}.log" if self._workdir is not None else None

    def start(self, timeout: float = 10.0) -> "EmbeddedBroker":
        """Start the broker and return once it accepts connections; again after :meth:`kill`
        or :meth:`stop`, on the same port."""
        if self.running:
            return self
        if self._process is not None:       # it died by itself (a rumqttd panic: exit code 70)
            self._close_pipe(self._process)
            self._process = None
        if self._workdir is None:
            self._workdir = tempfile.TemporaryDirectory(prefix=f"fogsplit-{self.kind}-")
        root = Path(self._workdir.name)
        log_file = self.log_file
        if self.kind == "mosquitto":
            command = self._mosquitto_command(root, log_file)
        else:
            command = self._rumqttd_command(root)
        ready = root / "ready"
        ready.unlink(missing_ok=True)
        with open(log_file, "ab") as out:
            self._process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT)
        try:
            if self.kind == "rumqttd":
                self._wait_ready(ready, timeout, log_file)
            else:
                self.nodelay = True          # set_tcp_nodelay in its config
            wait_for_port(self.host, self.port, timeout, process=self._process, log_file=log_file)
        except RuntimeError:
            self.stop()
            raise
        log.info("embedded broker (%s, MQTT %s) listening on %s, pid %d", self.kind, self.mqtt, self.url,
                 self._process.pid)
        return self

    def _mosquitto_command(self, root: Path, log_file: Path) -> list[str]:
        binary = mosquitto_binary()
        if binary is None:
            raise RuntimeError("mosquitto is not installed (apt install mosquitto); use kind 'rumqttd'")
        if self.data_dir is not None:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        conf = root / "mosquitto.conf"
        conf.write_text(mosquitto_config(self.host, self.port, log_file, self.data_dir))
        return [binary, "-c", str(conf)]

    def _rumqttd_command(self, root: Path) -> list[str]:
        if not rumqttd_available():
            raise RuntimeError("the embedded broker needs Mosquitto installed or the 'broker' extra: "
                               "pip install 'fogsplit[broker]'; or point --broker at a running MQTT broker")
        conf = root / "rumqttd.toml"
        conf.write_text(rumqttd_config(self.host, self.port, self.mqtt))
        return [sys.executable, "-c", _RUMQTTD_CHILD, str(conf), str(root / "ready"), str(self.port),
                str(self.log_file)]

    def _wait_ready(self, ready: Path, timeout: float, log_file: Path) -> None:
        """Wait for the rumqttd child to say it listens (after setting TCP_NODELAY on its listener)."""
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if self._process.poll() is not None:
                raise RuntimeError(f"rumqttd exited with code {self._process.returncode} before listening on "
                                   f"{self.host}:{self.port}\n{log_file.read_text(errors='replace')}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"rumqttd did not listen on {self.host}:{self.port} within {timeout}s")
            time.sleep(0.01)
        self.nodelay = ready.read_text() == "nodelay"
        if not self.nodelay:
            log.warning("rumqttd on %s: TCP_NODELAY could not be set on its listener; small packets may "
                        "wait up to 40 ms (Nagle)", self.url)

    def kill(self) -> None:
        """Crash the broker: SIGKILL, nothing saved, no goodbye to its clients. What it kept in
        memory (sessions, queues, retained messages) is gone; with ``data_dir``, Mosquitto comes
        back with its last autosave. :meth:`start` brings it back on the same port."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        process.wait(10)
        self._close_pipe(process)

    def stop(self) -> None:
        """Stop the broker (SIGTERM, SIGKILL after 10 s) and remove its files."""
        process, self._process = self._process, None
        if process is not None:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(10)
            self._close_pipe(process)
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    @staticmethod
    def _close_pipe(process: subprocess.Popen) -> None:
        if process.stdin is not None:
            try:
                process.stdin.close()
            except OSError:
                pass

    def __enter__(self) -> str:
        return self.start().url

    def __exit__(self, *exc: object) -> None:
        self.stop()
