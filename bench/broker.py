"""Broker throughput and latency on loopback: the evidence behind the embedded broker choice.

    python -m fogsplit.bench.broker [--messages 20000] [--json out.json] [--mosquitto]

One publisher, one subscriber, fogsplit's own transport; the same run measures every broker
so the ratios hold on a noisy machine. Prints msgs/s (QoS 0 and QoS 1), loss, and one-way
latency percentiles of paced messages.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from fogsplit.broker import EmbeddedBroker, free_port
from fogsplit.mqtt import MqttTransport, wait_until


def measure(url: str, messages: int, qos: int, size: int = 64) -> dict:
    got = []
    done = threading.Event()
    sub = MqttTransport(url, f"bench-sub-{qos}")
    pub = MqttTransport(url, f"bench-pub-{qos}")

    def on_message(msg) -> None:
        got.append(time.perf_counter())
        if len(got) == messages:
            done.set()

    sub.subscribe("bench/t", on_message)
    sub.connect()
    pub.connect()
    time.sleep(0.3)
    payload = b"x" * size
    start = time.perf_counter()
    for _ in range(messages):
        pub.publish("bench/t", payload, qos=qos)
    done.wait(60)
    elapsed = (got[-1] if got else time.perf_counter()) - start
    lat = []
    sub2_got: list[float] = []
    sub.subscribe("bench/lat", lambda m: sub2_got.append(time.perf_counter() - float(m.payload)))
    time.sleep(0.3)
    for _ in range(200):
        pub.publish("bench/lat", str(time.perf_counter()).encode(), qos=1)
        time.sleep(0.005)
    wait_until(lambda: len(sub2_got) >= 200, timeout=10)
    lat = np.array(sub2_got) * 1000
    pub.close()
    sub.close()
    return {"qos": qos, "messages": messages, "received": len(got), "lost": messages - len(got),
            "msgs_per_s": round(len(got) / elapsed, 0) if elapsed > 0 else None,
            "latency_ms": {"p50": round(float(np.median(lat)), 3), "p99": round(float(np.percentile(lat, 99)), 3)}
            if len(lat) else None}


def start_mosquitto() -> tuple[subprocess.Popen, str, tempfile.TemporaryDirectory]:
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    tmp = tempfile.TemporaryDirectory()
    port = free_port()
    conf = Path(tmp.name) / "m.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n"
                    "max_queued_messages 1000000\n")
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    return proc, f"mqtt://127.0.0.1:{port}", tmp


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fogsplit.bench.broker")
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    rows = {}
    with EmbeddedBroker() as url:
        rows["embedded (iotcore/rumqttd)"] = [measure(url, args.messages, q) for q in (0, 1)]
    if shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists():
        proc, url, tmp = start_mosquitto()
        try:
            rows["mosquitto"] = [measure(url, args.messages, q) for q in (0, 1)]
        finally:
            proc.terminate()
            tmp.cleanup()
    for name, results in rows.items():
        for r in results:
            print(f"{name:<28} QoS{r['qos']}  {r['msgs_per_s']:>8.0f} msg/s  lost {r['lost']:>5}  "
                  f"latency p50 {r['latency_ms']['p50']} ms p99 {r['latency_ms']['p99']} ms")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
