"""Soak: what every tier's memory does over minutes of steady load, and what is lost meanwhile.

    fogsplit bench soak --minutes M (--rate R | --load load.json) [--fraction 0.8] [--sample-s 30]
                        [--warmup-s 60] [--source devices|synthetic] [--devices 6] [--json F]

One cell (fogsplit.bench.load's: a broker, a cloud worker, the gateway and the devices, each a
process of its own, straight to the broker) streams for ``--minutes`` at ``--fraction`` (0.8)
of a rate: ``--rate``, or the ``max_rate`` of a ``fogsplit bench load`` JSON given with
``--load``. The devices are the real ``fogsplit device`` agents (``--source devices``, the
default: their memory is part of the figure) or bench load's synthetic devices (one process
publishing every device's real frames: the gateway, the broker and the cloud at rates that six
agents could not reach on a small machine; the devices' own memory is then not measured).

Every ``--sample-s`` seconds: the resident memory (VmRSS) of every process, the size of its log
and the gateway's counters. After ``--warmup-s`` (imports done, pools and caches filled),
``rss_growth`` of a process is its last sample over its first sample after the warm-up, less 1;
a tier's is the largest of its processes' (``devices``: every agent). Bounded memories fill
during the warm-up only if it is long enough: the gateway remembers the ids of its last 65,536
answered events (core/assembly.py, about 8 MB), which takes 100 s at 640 events/s but 11 min at
100/s; growth measured before such a bound is reached is that memory filling, not a leak (the
samples show whether it levels off). ``lost``: events captured
from the first result to the end with no answer of any kind after ``--settle-s`` (silence;
explicit ``lost`` notices are counted apart); ``latency_ms_p99_per_minute``: p99 of arrival
minus capture time over the events captured in each minute.
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from fogsplit.bench.flags import positive
from fogsplit.bench.load import Cell, Running, add_cell_flags, log_sizes, make_context, percentiles, tally, \
    window_events
from fogsplit.bench.report import timed_main

log = logging.getLogger(__name__)

GATEWAY_KEYS = ("events", "shed", "degraded", "inbox_dropped", "refused", "late", "reacked", "open_events")


def tier_of(name: str, devices: list[str]) -> str:
    """``devices`` for every agent, ``cloud`` for every worker, else the process's name."""
    if name in devices:
        return "devices"
    if name.startswith("cloud"):
        return "cloud"
    return name


def rss_growth(samples: list[dict], warmup_s: float) -> tuple[dict[str, float | None], dict[str, dict]]:
    """Per process: last RSS over the first RSS sampled at or after ``warmup_s``, less 1."""
    by_process: dict[str, dict] = {}
    names = {n for s in samples for n in s["rss_mb"]}
    for name in sorted(names):
        series = [(s["t_s"], s["rss_mb"].get(name)) for s in samples if s["t_s"] >= warmup_s]
        series = [(t, v) for t, v in series if v is not None]
        if len(series) < 2:
            by_process[name] = {"growth": None, "first_mb": series[0][1] if series else None, "last_mb": None}
            continue
        (t0, first), (t1, last) = series[0], series[-1]
        by_process[name] = {"growth": round(last / first - 1, 4), "first_mb": first, "last_mb": last,
                            "mb_per_min": round((last - first) / ((t1 - t0) / 60), 3) if t1 > t0 else None}
    return {name: info["growth"] for name, info in by_process.items()}, by_process


def per_tier(growth: dict[str, float | None], devices: list[str]) -> dict[str, float | None]:
    tiers: dict[str, list[float]] = defaultdict(list)
    for name, value in growth.items():
        if name in ("bench", "publisher"):       # the bench's own processes, not tiers of the cell
            continue
        tiers.setdefault(tier_of(name, devices), [])
        if value is not None:
            tiers[tier_of(name, devices)].append(value)
    return {tier: (max(values) if values else None) for tier, values in tiers.items()}


def per_minute(arrivals, start: float, end: float) -> list[dict]:
    """p99 latency and counts of the events captured in each minute since ``start``."""
    first: dict[int, object] = {}
    for a in arrivals:
        if a.lost or a.captured is None or not start <= a.captured < end:
            continue
        if a.event not in first or a.at < first[a.event].at:
            first[a.event] = a
    minutes: dict[int, list[float]] = defaultdict(list)
    for a in first.values():
        minutes[int((a.captured - start) // 60)].append(1000 * (a.at - a.captured))
    return [{"minute": m, "answers": len(v), "p99_ms": percentiles(v)["p99"], "p50_ms": percentiles(v)["p50"]}
            for m, v in sorted(minutes.items())]


def sample(running: Running, started: float) -> dict:
    gw = running.monitor.snapshot().get("gateway") or {}
    src = running.publisher.stats() if running.publisher is not None else {}
    return {"t_s": round(time.time() - started, 1), "rss_mb": {k: v for k, v in running.rss().items()},
            "log_bytes": log_sizes(running), "gateway": {k: gw.get(k) for k in GATEWAY_KEYS},
            "journal_rows": (gw.get("journal") or {}).get("rows"),
            "source": {k: src.get(k) for k in ("slots", "skipped", "unacked", "replayed")} if src else None,
            "died": running.dead()}


def base_rate(args) -> tuple[float, str]:
    if args.rate:
        return args.rate, "--rate"
    body = json.loads(args.load.read_text())
    if not body.get("max_rate"):
        raise ValueError(f"{args.load} has no max_rate (no rate was held there): give --rate")
    return float(body["max_rate"]), str(args.load)


def run(args) -> dict:
    rate_of, where = base_rate(args)
    rate = round(args.fraction * rate_of, 1)
    with tempfile.TemporaryDirectory(prefix="fogsplit-soak-") as tmp:
        workdir = args.workdir or Path(tmp)
        ctx = make_context(_load_args(args), workdir)
        log.info("soak: %g events/s (%.0f%% of %g from %s) for %g min, %s source, %d devices", rate,
                 100 * args.fraction, rate_of, where, args.minutes, ctx.source, len(ctx.devices))
        samples: list[dict] = []
        with Cell(ctx, rate, "soak") as running:
            started = time.time()
            end = started + 60 * args.minutes
            while True:
                samples.append(sample(running, started))
                log.info("soak: %s", json.dumps({k: samples[-1][k] for k in ("t_s", "rss_mb", "gateway")}))
                if time.time() >= end:
                    break
                time.sleep(max(0.0, min(args.sample_s, end - time.time())))
            stopped = time.time()
            time.sleep(args.settle_s)
            final = sample(running, started)
            src = running.publisher.stats() if running.publisher is not None else {}
            arrivals = running.stack.collector.log.arrivals()
            died = running.dead()
            devices = running.monitor.snapshot()
            devices.pop("gateway", None)
            source = {"kind": ctx.source, **({k: src.get(k) for k in ("slots", "skipped", "unacked", "replayed",
                                                                         "acked")} if src else {})}
            if not src:
                source.update({key: sum(d.get(key, 0) for d in devices.values())
                               for key in ("dropped_captures", "skipped_slots", "inbox_dropped")})
    events = window_events(rate, started, stopped, src.get("skipped_ranges"))
    counts = tally(arrivals, events)
    growth, by_process = rss_growth(samples, args.warmup_s)
    tiers = per_tier(growth, ctx.devices)
    minutes = per_minute(arrivals, started, stopped)
    logs = {name: {"bytes": final["log_bytes"].get(name), "bytes_per_min": round(
        (final["log_bytes"].get(name, 0) - samples[0]["log_bytes"].get(name, 0)) / max(args.minutes, 1e-9), 1)}
        for name in final["log_bytes"]}
    return {
        "minutes": args.minutes, "rate": rate, "fraction": args.fraction, "of_rate": rate_of, "rate_from": where,
        "source": source, "devices": len(ctx.devices), "broker": ctx.broker_kind,
        "rss_growth": tiers, "rss_growth_by_process": growth, "rss": by_process,
        "rss_growth_ok": all(v is not None and v < 0.10 for v in tiers.values()),
        "lost": counts["lost"], "lost_notices": counts["lost_notices"], "duplicates": counts["duplicates"],
        "captured": counts["captured"], "results": counts["results"], "shed": counts["shed"],
        "latency_ms": counts["latency_ms"], "latency_ms_p99_per_minute": [m["p99_ms"] for m in minutes],
        "per_minute": minutes, "logs": logs, "died": died, "gateway_final": final["gateway"],
        "journal_rows": final["journal_rows"], "samples": samples,
        "settings": {"sample_s": args.sample_s, "warmup_s": args.warmup_s, "settle_s": args.settle_s,
                     "bundle": str(ctx.bundle)},
    }


def _load_args(args) -> argparse.Namespace:
    """What bench load's make_context reads, from the soak's flags."""
    return argparse.Namespace(**{**vars(args), "p99_ms": 1000.0, "warmup_s": 0.0, "window_s": 0.0,
                                 "settle_s": args.settle_s})


def format_table(result: dict) -> str:
    lines = [f"soak on {result['broker']}: {result['minutes']:g} min at {result['rate']:g} events/s "
             f"({100 * result['fraction']:.0f}% of {result['of_rate']:g} from {result['rate_from']}), "
             f"source {result['source']['kind']}, {result['devices']} devices"]
    lines.append(f"{'process':<10} {'first MiB':>9} {'last MiB':>9} {'growth':>8} {'MiB/min':>8} {'log B/min':>10}")
    for name, info in result["rss"].items():
        growth = "-" if info["growth"] is None else f"{100 * info['growth']:+.1f}%"
        lines.append(f"{name:<10} {_n(info['first_mb']):>9} {_n(info['last_mb']):>9} {growth:>8} "
                     f"{_n(info.get('mb_per_min')):>8} {_n((result['logs'].get(name) or {}).get('bytes_per_min')):>10}")
    lines.append("rss_growth per tier: " + ", ".join(
        f"{k} {'-' if v is None else f'{100 * v:+.1f}%'}" for k, v in result["rss_growth"].items())
                 + f" ({'all under 10%' if result['rss_growth_ok'] else 'NOT all under 10%'})")
    lines.append(f"events {result['captured']}, results {result['results']}, lost {result['lost']}, "
                 f"lost notices {result['lost_notices']}, duplicates {result['duplicates']}, shed {result['shed']}")
    lines.append("p99 ms per minute: " + " ".join(_n(v) for v in result["latency_ms_p99_per_minute"]))
    if result["died"]:
        lines.append(f"died on their own: {', '.join(result['died'])}")
    return "\n".join(lines)


def _n(v) -> str:
    return "-" if v is None else f"{v:g}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fogsplit bench soak", description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=positive(float), default=10.0, help="minutes of streaming (10)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--rate", type=positive(float), help="the rate the fraction is taken of (events/s)")
    which.add_argument("--load", type=Path, help="a fogsplit bench load JSON: its max_rate")
    parser.add_argument("--fraction", type=positive(float), default=0.8, help="share of the rate streamed (0.8)")
    parser.add_argument("--sample-s", type=positive(float), default=30.0, help="seconds between samples (30)")
    parser.add_argument("--warmup-s", type=float, default=60.0, help="seconds before the growth's first sample (60)")
    parser.add_argument("--settle-s", type=float, default=5.0, help="seconds for the last answers after (5)")
    parser.add_argument("--source", choices=("devices", "synthetic"), default="devices",
                        help="devices: one fogsplit device process each (default); synthetic: bench load's "
                             "one-process synthetic devices")
    add_cell_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    return timed_main(build_parser().parse_args(argv), run, format_table)


if __name__ == "__main__":
    raise SystemExit(main())
