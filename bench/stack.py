"""A whole cell as real OS processes, for benchmarks that break things (fogsplit.bench.faults).

    stack = Stack(StackOptions(bundle=..., replays={"cam0": p0, ...}, workdir=tmp))
    with stack:                                   # broker, cloud worker(s), gateway, devices
        stack.wait_flowing()
        stack.kill("gateway"); time.sleep(3); stack.restart("gateway")
        arrivals = stack.collector.log.arrivals()

Every tier runs the way an operator runs it: ``fogsplit cloud|gateway|device --config FILE``
in its own process, with a TOML file the stack writes and a state directory of its own, its
output in ``<workdir>/<name>/<name>.log``. The broker is a private Mosquitto on a free port
(persistence as compose ships it, in the stack's directory; never the shared one on 1883) or
rumqttd (``broker_kind="embedded"``), also in a process of its own, so that both can be killed
with SIGKILL and restarted on the same port.

Each tier process talks to the broker through a :class:`~fogsplit.bench.proxy.TcpProxy` of its
own, which outlives the process: the bench cuts one process off the network with it, and reads
from it the bytes each process sent (its upstream bytes: what it put on the wire).

The application is a :class:`Collector`: an in-process subscriber to the cell's result topic
that notes every result with its arrival time. :func:`make_collector` picks
``fogsplit.core.follow.ResultFollower`` when that module exists (it resumes a persistent
session and has results replayed that it missed while the broker was down), else a plain
:class:`~fogsplit.core.mqtt.MqttTransport` subscription.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import msgspec

from fogsplit.bench.embedded import EmbeddedBroker, free_port, mosquitto_binary, wait_for_port
from fogsplit.bench.proxy import TcpProxy
from fogsplit.core.mqtt import MqttTransport, wait_until
from fogsplit.core.topics import Topics

log = logging.getLogger(__name__)

BROKER_KINDS = ("mosquitto", "embedded")
CLI = "from fogsplit.cli import main; import sys; sys.exit(main())"


def small_bundle(out: Path, data: str = "images", steps: int = 200) -> Path:
    """A small bundle of ``data`` for the benchmarks, trained for ``steps`` steps (about a
    minute), unsigned; one already in ``out`` is reused."""
    if not (out / "manifest.json").is_file():
        log.info("exporting a bundle of %s into %s (%d steps)", data, out, steps)
        subprocess.run([*fogsplit_command(), "export", "--data", data, "--out", str(out), "--steps", str(steps),
                        "--no-progress"], check=True, stdout=subprocess.DEVNULL)
    return out


def make_replays(data: str, devices: int, out: Path) -> dict[str, Path]:
    """The test samples of the first ``devices`` sensors of ``data``, one replay file each."""
    from fogsplit.core.dataset import save_replay
    from fogsplit.export.datasets import load_data      # generates the data set: the bench side only
    dataset = load_data(data)
    if devices > len(dataset.sensor_names):
        raise ValueError(f"{data} has {len(dataset.sensor_names)} sensors; --devices {devices} is too many")
    return {s: save_replay(dataset, s, out / f"{s}.npz") for s in dataset.sensor_names[:devices]}


def fogsplit_command() -> list[str]:
    """The argv prefix that runs the ``fogsplit`` CLI in a new process of this interpreter: the
    console script beside it, else the interpreter with the script's two lines."""
    script = Path(sys.executable).parent / "fogsplit"
    return [str(script)] if script.exists() else [sys.executable, "-c", CLI]


def toml_text(body: dict[str, Any], table: str = "") -> str:
    """A role config as TOML: the keys of ``body``, then each nested dict as a table
    (``[device]``, ``[device.cache]``). None values are left out, so that the setting takes its
    default."""
    lines = [f"[{table}]"] if table else []
    lines += [f"{k} = {_toml_value(v)}" for k, v in body.items() if v is not None and not isinstance(v, dict)]
    text = "\n".join(lines) + "\n"
    for key, values in body.items():
        if isinstance(values, dict):
            text += "\n" + toml_text(values, f"{table}.{key}" if table else key)
    return text


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        return json.dumps(str(value))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {type(value).__name__}")


def rss_mib(pid: int) -> float | None:
    """Resident memory (VmRSS) of a live process in MiB; None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


# -- processes -----------------------------------------------------------------------------------

@dataclass
class Proc:
    """One OS process the stack owns: started, killed and restarted with the same argv (the same
    config and state directory), its output appended to ``log_path``.

    ``wanted`` is whether it should be running: a process that exits while wanted died on its
    own, and :meth:`Stack.dead` reports it with the tail of its log."""

    name: str
    argv: list[str]
    log_path: Path
    proxy: TcpProxy | None = None
    ready: Callable[["Proc"], None] | None = None     # blocks until the process serves
    popen: subprocess.Popen | None = None
    wanted: bool = False
    starts: int = 0

    def start(self) -> "Proc":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("a") as out:
            out.write(f"\n=== start {self.starts + 1} of {self.name} at {time.time():.3f}: {' '.join(self.argv)}\n")
            out.flush()
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            self.popen = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          env=env, start_new_session=True)
        self.starts += 1
        self.wanted = True
        if self.ready is not None:
            self.ready(self)
        return self

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.popen.poll() if self.popen is not None else None

    def kill(self) -> None:
        """SIGKILL: no goodbye, no flush, the will fires (as a power cut or the OOM killer)."""
        self.wanted = False
        if self.alive:
            os.kill(self.popen.pid, signal.SIGKILL)
        if self.popen is not None:
            self.popen.wait(10)

    def terminate(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL if it is not gone after ``timeout``; the exit code."""
        self.wanted = False
        if self.popen is None:
            return None
        if self.alive:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0f s of SIGTERM; killing it", self.name, timeout)
                self.popen.kill()
                self.popen.wait(10)
        return self.popen.returncode

    def rss_mib(self) -> float | None:
        return rss_mib(self.popen.pid) if self.alive else None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


# -- the broker ----------------------------------------------------------------------------------

def mosquitto_bench_config(port: int, data_dir: Path) -> str:
    """compose/mosquitto/mosquitto.conf's delivery settings (queues, persistence with its
    autosave interval, TCP_NODELAY), anonymous, one plain listener on ``port``."""
    user = "user root\n" if os.geteuid() == 0 else ""     # as root Mosquitto would drop to 'mosquitto'
    return (f"{user}listener {port} 127.0.0.1\nallow_anonymous true\n"
            "set_tcp_nodelay true\nmax_inflight_messages 1000\nmax_queued_messages 10000\n"
            "max_queued_bytes 67108864\nmax_packet_size 16777216\n"
            f"persistence true\npersistence_location {data_dir}/\nautosave_interval 300\n"
            "log_dest stdout\nlog_type error\nlog_type warning\nlog_type notice\nlog_type information\n"
            "connection_messages true\nlog_timestamp_format %Y-%m-%dT%H:%M:%S\n")


def broker_process(kind: str, port: int, root: Path) -> "Proc | EmbeddedBrokerProc":
    """The broker on ``port`` as a process the stack can kill and restart; a restart keeps the
    port and, for Mosquitto, the persistence directory."""
    if kind not in BROKER_KINDS:
        raise ValueError(f"broker kind {kind!r} is not one of {BROKER_KINDS}")
    root.mkdir(parents=True, exist_ok=True)
    if kind == "mosquitto":
        binary = mosquitto_binary()
        if binary is None:
            raise RuntimeError("mosquitto is not installed (apt-get install mosquitto); use broker kind 'embedded'")
        (root / "data").mkdir(exist_ok=True)
        conf = root / "mosquitto.conf"
        conf.write_text(mosquitto_bench_config(port, root / "data"))
        argv = [binary, "-c", str(conf)]
    else:
        return EmbeddedBrokerProc(port)

    def ready(proc: Proc) -> None:
        wait_for_port("127.0.0.1", port, timeout=20, process=proc.popen, log_file=proc.log_path)

    return Proc("broker", argv, root / "broker.log", ready=ready)


class EmbeddedBrokerProc:
    """rumqttd as the program itself starts it (fogsplit.bench.embedded.EmbeddedBroker: a child
    process of its own, with the configuration the program ships), behind :class:`Proc`'s
    interface. Its log lives in the broker's own temporary folder while it runs."""

    name = "broker"
    proxy = None

    def __init__(self, port: int) -> None:
        self.broker = EmbeddedBroker(port=port, host="127.0.0.1", kind="rumqttd")
        self.wanted = False
        self.starts = 0

    def start(self) -> "EmbeddedBrokerProc":
        self.broker.start(timeout=20)
        self.starts += 1
        self.wanted = True
        return self

    @property
    def pid(self) -> int | None:
        return self.broker.pid

    @property
    def alive(self) -> bool:
        return bool(self.broker.running)

    @property
    def returncode(self) -> int | None:
        process = getattr(self.broker, "_process", None)
        return process.poll() if process is not None else None

    @property
    def log_path(self) -> Path:
        workdir = getattr(self.broker, "_workdir", None)
        return Path(workdir.name) / "rumqttd.log" if workdir is not None else Path("/nonexistent")

    def kill(self) -> None:
        self.wanted = False
        self.broker.kill()

    def terminate(self, timeout: float = 10.0) -> int | None:
        self.wanted = False
        self.broker.stop()
        return None

    def rss_mib(self) -> float | None:
        return rss_mib(self.pid) if self.alive else None

    def log_tail(self, lines: int = 20) -> str:
        return Proc.log_tail(self, lines)      # the same reading of the same kind of file


# -- the application: a results collector --------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Arrival:
    """One message on the result topic, as the application got it."""

    event: int
    at: float                   # epoch seconds it arrived
    captured: float | None      # when the event was captured, as the result says
    exit: str | None
    late: bool = False          # the result says it answers a late (spooled) event
    late_s: float | None = None
    lost: bool = False          # an explicit lost notice, not an answer
    reason: str | None = None
    devices: int = 0            # how many devices the answer fused
    answer_ms: float | None = None   # capture to answer, by the gateway's clock (the result's latency_ms)


class ResultLog:
    """Every result an application got, in arrival order; safe to add to from a network thread."""

    def __init__(self) -> None:
        self._arrivals: list[Arrival] = []
        self._lock = threading.Lock()
        self.malformed = 0

    def add(self, body: object, at: float | None = None) -> Arrival | None:
        """Note a result given as JSON bytes, a dict, or an object with fields (a ``Result``);
        anything else (a forged or broken frame) is only counted, never raised."""
        try:
            arrival = parse_arrival(body, time.time() if at is None else at)
        except Exception:       # noqa: BLE001 - a frame deep enough to overflow the JSON parser, ...
            arrival = None
        with self._lock:
            if arrival is None:
                self.malformed += 1
            else:
                self._arrivals.append(arrival)
        return arrival

    def arrivals(self) -> list[Arrival]:
        with self._lock:
            return list(self._arrivals)

    def __len__(self) -> int:
        with self._lock:
            return len(self._arrivals)


def parse_arrival(body: object, at: float) -> Arrival | None:
    """An :class:`Arrival` from a result in any shape; None when it names no integer event.
    Fields that the reliability work adds (``late``, ``late_s``, ``reason``, an exit of
    ``lost``) are read when present."""
    if hasattr(body, "payload"):
        body = body.payload
    if isinstance(body, (bytes, bytearray, str)):
        try:
            body = json.loads(body)
        except ValueError:
            return None
    if dataclasses.is_dataclass(body) and not isinstance(body, type):
        body = dataclasses.asdict(body)
    elif isinstance(body, msgspec.Struct):
        body = msgspec.structs.asdict(body)
    if not isinstance(body, dict) or not isinstance(body.get("event"), int) or isinstance(body.get("event"), bool):
        return None
    exit_ = body.get("exit")
    captured = body.get("captured")
    late_s = body.get("late_s")
    devices = body.get("devices")
    answer_ms = body.get("latency_ms")
    return Arrival(event=body["event"], at=at, captured=float(captured) if isinstance(captured, (int, float)) else None,
                   exit=exit_ if isinstance(exit_, str) else None, late=body.get("late") is True,
                   late_s=float(late_s) if isinstance(late_s, (int, float)) else None,
                   lost=exit_ == "lost" or body.get("lost") is True,
                   reason=str(body["reason"]) if body.get("reason") is not None else None,
                   devices=len(devices) if isinstance(devices, list) else 0,
                   answer_ms=float(answer_ms) if isinstance(answer_ms, (int, float)) and not isinstance(answer_ms, bool)
                   else None)


class Collector(Protocol):
    """An application that counts the cell's results: ``log`` fills between start and close.
    ``dropped_duplicates``: results it got again for an event and did not pass on (a follower
    that makes results idempotent), which the bench still counts as duplicates."""

    log: ResultLog
    kind: str

    @property
    def dropped_duplicates(self) -> int: ...

    def start(self) -> "Collector": ...

    def close(self) -> None: ...


class TransportCollector:
    """A plain subscription to the result topic on a clean session: what is published while it
    is disconnected is not seen. ``delay_s``: the handler sleeps that long per message (a slow
    application, which holds up its own connection's network thread)."""

    kind = "transport"
    dropped_duplicates = 0

    def __init__(self, url: str, topics: Topics, cell: str, *, client_id: str, delay_s: float = 0.0) -> None:
        self.log = ResultLog()
        self.delay_s = delay_s
        self.transport = MqttTransport(url, client_id)
        self.transport.subscribe(topics.result(cell), self._on_result)

    def _on_result(self, msg) -> None:
        self.log.add(msg.payload)
        if self.delay_s:
            time.sleep(self.delay_s)

    def start(self) -> "TransportCollector":
        self.transport.connect()
        return self

    def close(self) -> None:
        self.transport.close()


class FollowerCollector:
    """``fogsplit.core.follow.ResultFollower``: a persistent session that asks the gateway to
    replay the results it missed, and passes each event's result on once. Its constructor is
    ``(url, topics, cell, handler, client_id=...)``, it starts with ``connect()`` (or
    ``start()``) and stops with ``close()``; the handler gets a ``Result`` (or JSON bytes, a
    dict). The live duplicates it drops are read from its ``duplicates`` counter."""

    kind = "follower"

    def __init__(self, url: str, topics: Topics, cell: str, *, client_id: str, delay_s: float = 0.0) -> None:
        follow = importlib.import_module("fogsplit.core.follow")
        self.log = ResultLog()
        self.delay_s = delay_s
        self.follower = follow.ResultFollower(url, topics, cell, self._on_result, client_id=client_id)

    def _on_result(self, result: object) -> None:
        self.log.add(result)
        if self.delay_s:
            time.sleep(self.delay_s)

    @property
    def dropped_duplicates(self) -> int:
        return int(getattr(self.follower, "duplicates", 0))

    def start(self) -> "FollowerCollector":
        begin = getattr(self.follower, "connect", None) or self.follower.start
        begin()
        return self

    def close(self) -> None:
        self.follower.close()


def follower_available() -> bool:
    try:
        return hasattr(importlib.import_module("fogsplit.core.follow"), "ResultFollower")
    except ImportError:
        return False


def make_collector(url: str, topics: Topics, cell: str, *, client_id: str, delay_s: float = 0.0,
                   prefer: str = "auto") -> Collector:
    """The application's collector: the ResultFollower when it exists (``prefer="auto"``), else a
    plain subscription (``prefer="transport"``, or when the follower's API does not match)."""
    if prefer != "transport" and follower_available():
        try:
            return FollowerCollector(url, topics, cell, client_id=client_id, delay_s=delay_s)
        except TypeError as exc:
            log.warning("ResultFollower does not take (url, topics, cell, handler, client_id=): %s; "
                        "collecting with a plain subscription", exc)
    return TransportCollector(url, topics, cell, client_id=client_id, delay_s=delay_s)


# -- the stack -----------------------------------------------------------------------------------

@dataclass
class StackOptions:
    """What a stack runs. ``replays`` maps each device (a sensor of the bundle) to its replay
    file; one device process is started per entry."""

    bundle: Path
    replays: dict[str, Path]
    workdir: Path
    broker_kind: str = "mosquitto"
    workers: int = 1
    rate: float = 10.0
    fleet: str = "faults"
    cell: str = "cell0"
    trusted_keys: list[Path] = field(default_factory=list)
    allow_unsigned: bool = False
    gateway: dict[str, Any] = field(default_factory=dict)     # extra [gateway] settings
    keepalive: int | None = None                               # [broker] keepalive of every tier
    collector: str = "auto"                                    # auto | transport (make_collector)


class Stack:
    """Broker, cloud workers, gateway and devices of one cell, each in its own process behind its
    own proxy, and an application collecting the results. Use as a context manager, or call
    :meth:`start` and :meth:`close`."""

    def __init__(self, options: StackOptions) -> None:
        self.options = o = options
        if o.broker_kind not in BROKER_KINDS:
            raise ValueError(f"broker kind {o.broker_kind!r} is not one of {BROKER_KINDS}")
        o.workdir.mkdir(parents=True, exist_ok=True)
        self.topics = Topics(o.fleet)
        self.port = free_port()
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self.broker = broker_process(o.broker_kind, self.port, o.workdir / "broker")
        self.procs: dict[str, Proc | EmbeddedBrokerProc] = {"broker": self.broker}
        self.collector: Collector | None = None
        self.extra_collectors: list[Collector] = []
        self.started_at: float | None = None

    # -- names --------------------------------------------------------------------------------
    @property
    def devices(self) -> list[str]:
        return list(self.options.replays)

    @property
    def workers(self) -> list[str]:
        return [f"cloud{i}" for i in range(self.options.workers)]

    @property
    def tiers(self) -> list[str]:
        """Every process but the broker."""
        return [n for n in self.procs if n != "broker"]

    # -- starting and stopping ------------------------------------------------------------------
    def start(self, timeout: float = 120.0) -> "Stack":
        """Start the broker, the application, then every tier at once; return once every device
        has been fused into one result (raises, with the logs of the dead, if that never comes)."""
        self.broker.start()
        self.collector = self.new_collector("app").start()
        for name, body in self._configs().items():
            self._add_tier(name, body)
        self.started_at = time.time()
        for name in self.tiers:
            self.procs[name].start()
        self.wait_flowing(timeout)
        return self

    def wait_flowing(self, timeout: float = 120.0) -> None:
        """Block until a result that every device took part in arrives after the start."""
        n = len(self.devices)
        started = self.started_at or 0.0

        def flowing() -> bool:
            recent = self.collector.log.arrivals()[-50:]
            return any(a.at >= started and a.devices >= n and not a.lost for a in recent) or bool(self.dead())

        if not wait_until(flowing, timeout, interval=0.2) or self.dead():
            raise RuntimeError(f"the stack gave no result with all {n} devices within {timeout:.0f}s\n"
                               + self.report_dead(all_procs=not self.dead()))

    def close(self) -> None:
        """SIGTERM every tier (devices first, broker last), close the proxies and collectors."""
        for collector in [*self.extra_collectors, *([self.collector] if self.collector else [])]:
            try:
                collector.close()
            except Exception:       # a collector of a broker already gone
                log.debug("closing a collector failed", exc_info=True)
        for name in [*self.devices, "gateway", *self.workers, "broker"]:
            proc = self.procs.get(name)
            if proc is not None:
                proc.terminate()
            if proc is not None and proc.proxy is not None:
                proc.proxy.close()

    def __enter__(self) -> "Stack":
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- faults -----------------------------------------------------------------------------------
    def kill(self, name: str) -> float:
        """SIGKILL process ``name``; the moment it was killed (epoch seconds)."""
        self.procs[name].kill()
        return time.time()

    def restart(self, name: str) -> float:
        """Start ``name`` again with the same config and state directory; for the broker, return
        once it listens again. The moment it was restarted (epoch seconds)."""
        self.procs[name].start()
        return time.time()

    def terminate(self, name: str, timeout: float = 10.0) -> int | None:
        return self.procs[name].terminate(timeout)

    def partition(self, name: str, seconds: float | None = None) -> None:
        """Cut process ``name`` off the network (sockets left open); heal after ``seconds``."""
        self._proxy(name).partition(seconds)

    def heal(self, name: str) -> float:
        self._proxy(name).heal()
        return time.time()

    def new_collector(self, name: str, *, delay_s: float = 0.0) -> Collector:
        """Another application on the result topic (not started); the stack closes it."""
        collector = make_collector(self.url, self.topics, self.options.cell, client_id=f"{self.options.fleet}-{name}",
                                   delay_s=delay_s, prefer=self.options.collector)
        if name != "app":
            self.extra_collectors.append(collector)
        return collector

    def _proxy(self, name: str) -> TcpProxy:
        proxy = self.procs[name].proxy
        if proxy is None:
            raise ValueError(f"{name} has no proxy")
        return proxy

    # -- figures ----------------------------------------------------------------------------------
    def upstream_bytes(self) -> int:
        """What every tier process has sent towards the broker so far (through its proxy)."""
        return sum(p.proxy.upstream_bytes for p in self.procs.values() if p.proxy is not None)

    def bytes_by_process(self) -> dict[str, dict[str, int]]:
        return {name: p.proxy.bytes() for name, p in self.procs.items() if p.proxy is not None}

    def rss(self) -> dict[str, float | None]:
        """Resident memory of every process now, in MiB (None: not running)."""
        return {name: p.rss_mib() for name, p in self.procs.items()}

    def dead(self) -> list[str]:
        """Processes that should be running and are not: they died on their own."""
        return [name for name, p in self.procs.items() if p.wanted and not p.alive]

    def report_dead(self, lines: int = 20, *, all_procs: bool = False) -> str:
        """The tails of the logs of the processes that died (or of all, ``all_procs``)."""
        names = list(self.procs) if all_procs else self.dead()
        return "\n".join(f"--- {name} (exit {self.procs[name].returncode}), {self.procs[name].log_path}:\n"
                         f"{self.procs[name].log_tail(lines)}" for name in names)

    # -- configs ----------------------------------------------------------------------------------
    def _add_tier(self, name: str, body: dict[str, Any]) -> None:
        role = "device" if name in self.options.replays else "gateway" if name == "gateway" else "cloud"
        home = self.options.workdir / name
        home.mkdir(parents=True, exist_ok=True)
        proxy = TcpProxy(self.url, name=name)
        body["broker"] = {"url": proxy.url, "keepalive": self.options.keepalive}
        config = home / f"{name}.toml"
        config.write_text(toml_text(body))
        self.procs[name] = Proc(name, [*fogsplit_command(), role, "--config", str(config)], home / f"{name}.log",
                                proxy=proxy)

    def _configs(self) -> dict[str, dict[str, Any]]:
        o = self.options
        common = {"bundle": str(o.bundle), "fleet": o.fleet, "allow_unsigned": o.allow_unsigned,
                  "trusted_keys": [str(k) for k in o.trusted_keys]}
        configs: dict[str, dict[str, Any]] = {}
        for worker in self.workers:
            configs[worker] = {**common, "name": worker}
        gateway = {**o.gateway, "journal": str(o.workdir / "gateway" / "journal.sqlite")}
        configs["gateway"] = {**common, "cell": o.cell, "name": "gw0", "gateway": gateway}
        for device, replay in o.replays.items():
            settings: dict[str, Any] = {"rate": o.rate, "spool": str(o.workdir / device / "spool.sqlite")}
            configs[device] = {**common, "cell": o.cell, "name": device, "data": str(replay), "device": settings}
        return configs
