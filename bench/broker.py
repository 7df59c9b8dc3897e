"""Broker throughput and latency on loopback: the evidence behind the embedded broker choice.

    fogsplit bench broker [--messages 20000] [--json out.json] [--mosquitto]

One publisher, one subscriber, fogsplit's own transport; the same run measures every broker
so the ratios hold on a noisy machine. Prints msgs/s (QoS 0 and QoS 1), loss, and one-way
latency percentiles of paced messages.
"""
from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import numpy as np

from fogsplit.bench.embedded import EmbeddedBroker, mosquitto_binary
from fogsplit.core.mqtt import MqttTransport, wait_until


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
    sub.connect()       # returns once the broker has acknowledged the subscription
    pub.connect()
    payload = b"x" * size
    start = time.perf_counter()
    for _ in range(messages):
        pub.publish("bench/t", payload, qos=qos)
    done.wait(60)
    elapsed = (got[-1] if got else time.perf_counter()) - start
    lat = []
    sub2_got: list[float] = []
    sub.subscribe("bench/lat", lambda m: sub2_got.append(time.perf_counter() - float(m.payload)))
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fogsplit bench broker")
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    rows = {}
    kinds = ["rumqttd"] + (["mosquitto"] if mosquitto_binary() else [])
    for kind in kinds:
        with EmbeddedBroker(kind=kind) as url:
            rows[kind] = [measure(url, args.messages, q) for q in (0, 1)]
    for name, results in rows.items():
        for r in results:
            print(f"{name:<28} QoS{r['qos']}  {r['msgs_per_s']:>8.0f} msg/s  lost {r['lost']:>5}  "
                  f"latency p50 {r['latency_ms']['p50']} ms p99 {r['latency_ms']['p99']} ms")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
