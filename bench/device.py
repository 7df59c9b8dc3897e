"""What a device agent costs: the real ``fogsplit device`` process against the bare import floor.

    fogsplit bench device --bundle DIR [--device cam0] [--replay cam0.npz] [--runs 3] [--json out.json]

Each run starts an agent in a fresh interpreter, with a replay file, against an embedded broker,
and watches it from outside: a subscriber on its scores topic timestamps the first scores
(cold start: from just before the process is started), ``/proc/<pid>/status`` gives its
resident memory after ``--stream-s`` seconds of streaming, ``/proc/<pid>/stat`` its CPU time
(user + system) over the events it published in that window, and on exit it writes the
top-level packages it imported. The floor is a process that only does ``import onnxruntime,
numpy, paho.mqtt.client, msgpack``, measured in the same run. Figures are medians over runs.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from fogsplit.bench.embedded import EmbeddedBroker
from fogsplit.bench.flags import name, positive
from fogsplit.bench.report import write_json
from fogsplit.core.dataset import save_replay
from fogsplit.core.mqtt import MqttTransport, wait_until
from fogsplit.core.topics import Topics

FLOOR = "import onnxruntime, numpy, paho.mqtt.client, msgpack"
CELL = "cell0"
MIB = 1024 * 1024

# The console script's two lines, plus a note of the top-level packages loaded, written at exit
# (the agent leaves through main() on SIGTERM, so atexit runs).
AGENT = """
import atexit, sys
def _note():
    with open({out!r}, "w") as f:
        f.write("\\n".join(sorted({{m.split(".")[0] for m in sys.modules}})))
atexit.register(_note)
from fogsplit.cli import main
sys.exit(main())
"""


def rss_mib(pid: int) -> float:
    """Resident memory now (VmRSS) of a live process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / MIB
    raise RuntimeError(f"no VmRSS for process {pid}")


def cpu_s(pid: int) -> float:
    """utime + stime of a process, in seconds (fields 14 and 15 of /proc/<pid>/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()     # after "pid (comm) "
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def floor_rss() -> float:
    """RSS in MiB of an interpreter that only imports what every device needs."""
    code = f"{FLOOR}; print(open('/proc/self/status').read())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    line = next(x for x in out.stdout.splitlines() if x.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024 / MIB


def third_party(modules: list[str]) -> list[str]:
    return sorted(m for m in modules if m and m not in sys.stdlib_module_names and not m.startswith("_")
                  and m != "__main__")


def run_agent(url: str, bundle: Path, device: str, replay: Path, *, rate: float, stream_s: float,
              run: int, workdir: Path, trust: tuple[str, ...] = ()) -> dict:
    """One agent from process start to SIGTERM; its figures."""
    topics = Topics(f"bench-device-{run}")
    arrivals: list[float] = []
    lock = threading.Lock()

    def on_scores(_msg) -> None:
        with lock:
            arrivals.append(time.time())

    watcher = MqttTransport(url, f"bench-device-watch-{run}")
    watcher.subscribe(topics.scores(CELL, device), on_scores)
    watcher.connect()
    modules_file = workdir / f"modules-{run}.txt"
    argv = [sys.executable, "-c", AGENT.format(out=str(modules_file)), "device", "--bundle", str(bundle),
            "--device", device, "--data", str(replay), "--broker", url, "--fleet", topics.fleet, "--cell", CELL,
            "--rate", str(rate), *trust]
    started = time.time()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        if not wait_until(lambda: bool(arrivals) or proc.poll() is not None, timeout=60) or not arrivals:
            raise RuntimeError(f"the agent published no scores (exit {proc.poll()}): {_stderr(proc)}")
        first = arrivals[0]
        cpu_first, published_first = cpu_s(proc.pid), len(arrivals)
        time.sleep(max(0.0, first + stream_s - time.time()))
        rss, cpu_end = rss_mib(proc.pid), cpu_s(proc.pid)
        with lock:
            events = len(arrivals) - published_first
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        watcher.close()
    modules = modules_file.read_text().split("\n") if modules_file.exists() else []
    return {"cold_start_s": round(first - started, 3), "rss_mb": round(rss, 1),
            "cpu_ms_per_event": round(1000 * (cpu_end - cpu_first) / events, 3) if events else None,
            "events": events, "imports": third_party(modules)}


def _stderr(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        return "(still running)"
    return (proc.stderr.read() if proc.stderr else "")[-2000:]


def measure(bundle: Path, device: str, replay: Path, *, runs: int, rate: float, stream_s: float,
            url: str | None = None, trust: tuple[str, ...] = ()) -> dict:
    """Medians of ``runs`` agents (on ``url``, or an embedded broker) and the floor.
    ``trust``: the device's signature flags (``--trusted-key K`` or ``--allow-unsigned``)."""
    floors = [floor_rss() for _ in range(runs)]
    with tempfile.TemporaryDirectory(prefix="fogsplit-bench-device-") as tmp, \
            (contextlib.nullcontext(url) if url else EmbeddedBroker()) as broker:
        rows = [run_agent(broker, bundle, device, replay, rate=rate, stream_s=stream_s, run=i, workdir=Path(tmp),
                          trust=trust) for i in range(runs)]
    per_event = [r["cpu_ms_per_event"] for r in rows if r["cpu_ms_per_event"] is not None]
    return {
        "device": device, "replay": str(replay), "runs": runs, "rate": rate, "stream_s": stream_s,
        "imports": sorted(set().union(*(r["imports"] for r in rows))),
        "rss_mb": statistics.median(r["rss_mb"] for r in rows),
        "floor_rss_mb": round(statistics.median(floors), 1),
        "cold_start_s": statistics.median(r["cold_start_s"] for r in rows),
        "cpu_ms_per_event": statistics.median(per_event) if per_event else None,
        "per_run": rows,
    }


def _replay_for(bundle: Path, device: str, data: str, workdir: Path) -> Path:
    from fogsplit.export.datasets import load_data      # generates: only when no replay file is given
    out = workdir / f"{device}.npz"
    save_replay(load_data(data), device, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fogsplit bench device", description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", type=Path, required=True, help="an exported bundle")
    parser.add_argument("--device", type=name, default="cam0", help="the sensor to run (default cam0)")
    parser.add_argument("--replay", type=Path,
                        help="replay file of that sensor (fogsplit data replay); default: made from --data")
    parser.add_argument("--data", default="images", help="without --replay: images, series or a .npz data set")
    parser.add_argument("--runs", type=positive(int), default=3, help="agents started one after another (default 3)")
    parser.add_argument("--rate", type=positive(float), default=10.0, help="captures per second (default 10)")
    parser.add_argument("--stream-s", type=positive(float), default=10.0,
                        help="seconds of streaming before memory is read (default 10)")
    parser.add_argument("--broker", help="an MQTT URL to use instead of an embedded broker")
    parser.add_argument("--trusted-key", type=Path, help="public key that checks the bundle's signature")
    parser.add_argument("--allow-unsigned", action="store_true", help="run an unsigned bundle")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fogsplit-replay-") as tmp:
        replay = args.replay or _replay_for(args.bundle, args.device, args.data, Path(tmp))
        trust = (("--trusted-key", str(args.trusted_key)) if args.trusted_key else ()) + \
            (("--allow-unsigned",) if args.allow_unsigned else ())
        report = measure(args.bundle, args.device, replay, runs=args.runs, rate=args.rate, stream_s=args.stream_s,
                         url=args.broker, trust=trust)
    print(f"device {report['device']}, {report['runs']} runs at {report['rate']:g} captures/s (medians):")
    print(f"  cold start to first scores  {report['cold_start_s']:.3f} s")
    print(f"  resident memory after {report['stream_s']:g} s  {report['rss_mb']:.1f} MiB "
          f"(floor {report['floor_rss_mb']:.1f} MiB: {FLOOR})")
    if report["cpu_ms_per_event"] is not None:
        print(f"  CPU per event               {report['cpu_ms_per_event']:.2f} ms")
    print(f"  imports                     {' '.join(report['imports'])}")
    write_json(args.json, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
