"""Chaos: what an application loses, gets twice, and waits for when one part of a cell fails.

    fogsplit bench faults [--broker mosquitto|embedded|both] [--devices 6] [--rate 10] [--workers 1]
                          [--quick] [--bundle DIR] [--faults NAME,...] [--json F]

Each fault runs on a fresh cell (fogsplit.bench.stack): a real broker, the cloud worker(s), the
gateway and the devices, each a ``fogsplit ... --config FILE`` process behind a TCP proxy of its
own, and an application subscribed to the cell's results. The cell streams at ``--rate`` and
ONE fault is injected: the broker killed (SIGKILL) and restarted on the same port and
persistence directory, the gateway killed and restarted, the only cloud worker killed and
restarted, one of two cloud workers killed, a device killed and restarted, a device cut off
the network through its proxy (sockets left open: only keep-alives notice), or a second
application that is slow to take its results.

Per fault, over the window from ``lead`` seconds before the fault to ``after`` seconds after it
ended (the killed process restarted, the partition healed), with ``settle`` more seconds for
answers to arrive (and on, up to ``settle_max``, while an event of the window has none):

- ``captured``: the events of the window. A device captures slot ``n`` at ``n / rate`` seconds
  since the epoch and ``n`` is the event id, the same on every device of the cell, so the
  window's events are the slots ``ceil(t0 * rate) .. ceil(t1 * rate) - 1`` (some device is
  always alive).
- ``results``: events with at least one answer; ``lost_notices``: events answered only by an
  explicit ``lost`` notice; ``lost``: events with neither, i.e. lost silently, the figure the
  delivery contract holds at 0 (docs/reliability.md); ``duplicates``: messages beyond the first
  per event; ``late``: answers marked ``late``.
- ``recovery_s``: from the fault's end to the first answer to an event captured after it.
- ``bytes_per_event``: what every tier process wrote towards the broker over the window (its
  proxy counts it: packet headers included), divided by ``captured``.
- ``latency_ms_p50``/``_p99``: arrival at the application minus the result's ``captured``, over
  each event's first answer.

The cloud faults send every event to the cloud (the gateway's local exit threshold set to 0),
so that the killed worker has work to lose; the others run with the bundle's thresholds.
"""
from __future__ import annotations

import argparse
import logging
import math
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from fogsplit.bench.embedded import mosquitto_binary
from fogsplit.bench.flags import positive
from fogsplit.bench.report import timed_main
from fogsplit.bench.stack import BROKER_KINDS, Arrival, Collector, Stack, StackOptions, make_replays, small_bundle

log = logging.getLogger(__name__)

FORWARD_ALL = {"local_threshold": 0.0, "edge_threshold": 0.0}   # no early exit: every event to the cloud


@dataclass(frozen=True)
class Timing:
    """Seconds of each phase of a fault."""

    lead_s: float = 5.0           # window before the fault
    after_s: float = 20.0         # window after the fault's end
    settle_s: float = 10.0        # more time for answers to the window's events (and their duplicates)
    settle_max_s: float = 40.0    # ... and on while an event of the window has no answer, up to this
    broker_down_s: float = 3.0
    gateway_down_s: float = 3.0
    cloud_down_s: float = 5.0
    device_down_s: float = 3.0
    partition_s: float = 30.0
    slow_s: float = 20.0
    slow_ms: float = 200.0        # the slow application's time per result: 2 per slot at 10/s


FULL = Timing()
QUICK = Timing(lead_s=1.0, after_s=4.0, settle_s=3.0, settle_max_s=25.0, broker_down_s=2.0, gateway_down_s=2.0,
               cloud_down_s=2.0, device_down_s=2.0, partition_s=4.0, slow_s=3.0)


@dataclass(frozen=True)
class Injected:
    """What a fault did: when it began and ended (epoch seconds), and figures of its own."""

    start: float
    end: float
    extra: dict


@dataclass(frozen=True)
class Fault:
    name: str
    what: str
    inject: "Inject"
    workers: int | None = None      # None: the bench's --workers
    forward_all: bool = False


Inject = Callable[[Stack, Timing], Injected]


def _kill_restart(target: Callable[[Stack], str], down: Callable[[Timing], float]) -> Inject:
    def inject(stack: Stack, timing: Timing) -> Injected:
        name = target(stack)
        start = stack.kill(name)
        time.sleep(down(timing))
        return Injected(start, stack.restart(name), {"target": name})
    return inject


def _kill_only(target: Callable[[Stack], str]) -> Inject:
    def inject(stack: Stack, timing: Timing) -> Injected:
        name = target(stack)
        at = stack.kill(name)
        return Injected(at, at, {"target": name})
    return inject


def _partition(stack: Stack, timing: Timing) -> Injected:
    device = stack.devices[0]
    start = time.time()
    stack.partition(device)
    time.sleep(timing.partition_s)
    return Injected(start, stack.heal(device), {"target": device})


def _slow_application(stack: Stack, timing: Timing) -> Injected:
    """A second application whose handler takes ``slow_ms`` per result: the first must not notice."""
    slow = stack.new_collector("slow-app", delay_s=timing.slow_ms / 1000).start()
    start = time.time()
    time.sleep(timing.slow_s)
    received = len(slow.log)
    slow.close()
    return Injected(start, time.time(), {"slow_ms": timing.slow_ms, "slow_received": received})


FAULTS: dict[str, Fault] = {f.name: f for f in (
    Fault("broker_kill", "broker kill -9, restarted after broker_down_s (same port and persistence)",
          _kill_restart(lambda s: "broker", lambda t: t.broker_down_s)),
    Fault("gateway_kill", "gateway kill -9, restarted after gateway_down_s",
          _kill_restart(lambda s: "gateway", lambda t: t.gateway_down_s)),
    Fault("cloud_kill", "the only cloud worker kill -9, restarted after cloud_down_s",
          _kill_restart(lambda s: s.workers[0], lambda t: t.cloud_down_s), workers=1, forward_all=True),
    Fault("cloud_one_of_two", "one of two cloud workers kill -9, not restarted",
          _kill_only(lambda s: s.workers[0]), workers=2, forward_all=True),
    Fault("device_kill", "one device kill -9, restarted after device_down_s",
          _kill_restart(lambda s: s.devices[0], lambda t: t.device_down_s)),
    Fault("device_partition", "one device cut off the network for partition_s (sockets left open)", _partition),
    Fault("slow_application", "a second application taking slow_ms per result, for slow_s", _slow_application),
)}


# -- one fault -----------------------------------------------------------------------------------

def run_fault(fault: Fault, base: StackOptions, timing: Timing) -> dict:
    """Start a fresh stack, inject ``fault`` once, and tally the window around it."""
    options = replace(base, workdir=base.workdir / fault.name, fleet=f"faults-{fault.name}",
                      workers=fault.workers or base.workers,
                      gateway={**base.gateway, **(FORWARD_ALL if fault.forward_all else {})})
    log.info("fault %s on %s: %s", fault.name, options.broker_kind, fault.what)
    with Stack(options) as stack:
        app = stack.collector
        t0, bytes0, dropped0 = time.time(), stack.upstream_bytes(), app.dropped_duplicates
        time.sleep(timing.lead_s)
        injected = fault.inject(stack, timing)
        time.sleep(timing.after_s)
        t1, bytes1 = time.time(), stack.upstream_bytes()
        settled = settle(app, t0, t1, options.rate, timing)
        arrivals, dropped = app.log.arrivals(), app.dropped_duplicates - dropped0
        died, rss = stack.dead(), stack.rss()
        if died:
            log.warning("fault %s: died on their own: %s\n%s", fault.name, died, stack.report_dead())
    row = tally(arrivals, t0=t0, t1=t1, fault_end=injected.end, rate=options.rate)
    row["duplicates"] += dropped            # the application got them, even if it did not pass them on
    row["bytes_per_event"] = round((bytes1 - bytes0) / row["captured"], 1) if row["captured"] else None
    return {"name": fault.name, **row, "settle_s": settled, "fault_s": round(injected.end - injected.start, 2),
            "lead_s": round(injected.start - t0, 2), "after_s": round(t1 - injected.end, 2),
            "workers": options.workers, "path": "cloud" if fault.forward_all else "bundle thresholds",
            "collector": app.kind, "duplicates_dropped_by_app": dropped, **injected.extra, "died": died, "rss_mb": rss}


def settle(app: Collector, t0: float, t1: float, rate: float, timing: Timing) -> float:
    """Wait ``settle_s``, then on until every event of [t0, t1) has had an answer or a notice, at
    most ``settle_max_s`` in all: a gateway may answer an event long after it was captured (it
    forwards again when the cloud stays silent), and an answer still on its way is not lost.
    The seconds waited."""
    started = time.time()
    wanted = set(range(math.ceil(t0 * rate), math.ceil(t1 * rate)))
    time.sleep(timing.settle_s)
    while time.time() - started < timing.settle_max_s:
        if wanted <= {a.event for a in app.log.arrivals()}:
            break
        time.sleep(0.25)
    return round(time.time() - started, 1)


def tally(arrivals: list[Arrival], *, t0: float, t1: float, fault_end: float, rate: float) -> dict:
    """The figures of the window [t0, t1) from what the application received (see the module doc)."""
    first, stop = math.ceil(t0 * rate), math.ceil(t1 * rate)
    by_event: dict[int, list[Arrival]] = defaultdict(list)
    for a in arrivals:
        if first <= a.event < stop:
            by_event[a.event].append(a)
    answers = {e: min((a for a in xs if not a.lost), key=lambda a: a.at)
               for e, xs in by_event.items() if any(not a.lost for a in xs)}
    notices = [e for e in by_event if e not in answers]
    silent = [e for e in range(first, stop) if e not in by_event]
    after = math.ceil(fault_end * rate)
    recovered = [a.at for e, a in answers.items() if e >= after]
    latencies = [1000 * (a.at - a.captured) for a in answers.values() if a.captured is not None]
    return {
        "captured": stop - first, "results": len(answers), "lost": len(silent), "lost_notices": len(notices),
        "lost_reasons": dict(Counter(a.reason or "?" for e in notices for a in by_event[e][:1])),
        "duplicates": sum(len(xs) - 1 for xs in by_event.values()),
        "late": sum(a.late for xs in by_event.values() for a in xs),
        "recovery_s": round(min(recovered) - fault_end, 3) if recovered else None,
        "latency_ms_p50": _percentile(latencies, 50), "latency_ms_p99": _percentile(latencies, 99),
        "lost_span_s": _span(silent, rate, fault_end),
    }


def _percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values else None


def _span(events: list[int], rate: float, origin: float) -> list[float] | None:
    """When the first and the last of ``events`` were captured, in seconds from ``origin``."""
    if not events:
        return None
    return [round(min(events) / rate - origin, 1), round(max(events) / rate - origin, 1)]


# -- the whole run -------------------------------------------------------------------------------

def run_broker(kind: str, names: list[str], base: StackOptions, timing: Timing) -> dict:
    """Every fault of ``names``, one after another, each on a fresh stack of broker ``kind``."""
    options = replace(base, broker_kind=kind, workdir=base.workdir / kind)
    return {"broker": kind, "faults": [run_fault(FAULTS[n], options, timing) for n in names]}


def prepare(args, workdir: Path) -> StackOptions:
    """The bundle (exported into ``workdir`` when none is given) and a replay file per device."""
    bundle = args.bundle or small_bundle(workdir / "bundle", args.data)
    replays = make_replays(args.data, args.devices, workdir / "replays")
    return StackOptions(bundle=bundle, replays=replays, workdir=workdir, rate=args.rate, workers=args.workers,
                        trusted_keys=list(args.trusted_key), allow_unsigned=args.allow_unsigned or not args.trusted_key,
                        gateway=dict(FORWARD_ALL) if args.all_cloud else {}, collector=args.collector)


def run(args) -> dict:
    kinds = list(BROKER_KINDS) if args.broker == "both" else [args.broker]
    timing = QUICK if args.quick else FULL
    names = args.faults or list(FAULTS)
    with tempfile.TemporaryDirectory(prefix="fogsplit-faults-") as tmp:
        workdir = args.workdir or Path(tmp)
        base = prepare(args, workdir)
        runs = [run_broker(kind, names, base, timing) for kind in kinds]
    settings = {"devices": args.devices, "rate": args.rate, "workers": args.workers, "quick": args.quick,
                "collector": args.collector,
                "all_cloud": args.all_cloud, "bundle": str(base.bundle), "timing": vars(timing)}
    body = {"broker": runs[0]["broker"], "faults": runs[0]["faults"], **settings}
    return {**body, "runs": runs} if len(runs) > 1 else body


COLUMNS = (("fault", "name", 18), ("captured", "captured", 8), ("results", "results", 7), ("lost", "lost", 5),
           ("notices", "lost_notices", 7), ("dup", "duplicates", 5), ("late", "late", 5),
           ("recovery_s", "recovery_s", 10), ("B/event", "bytes_per_event", 8),
           ("p50 ms", "latency_ms_p50", 8), ("p99 ms", "latency_ms_p99", 8))


def format_table(result: dict) -> str:
    lines = []
    for r in result.get("runs") or [result]:
        lines.append(f"faults on {r['broker']}: {result['devices']} devices at {result['rate']:g} events/s"
                     f"{' (quick)' if result['quick'] else ''}")
        lines.append("  ".join(f"{title:>{width}}" if i else f"{title:<{width}}"
                               for i, (title, _, width) in enumerate(COLUMNS)))
        for row in r["faults"]:
            cells = ["-" if row.get(key) is None else str(row[key]) for _, key, width in COLUMNS]
            lines.append("  ".join(f"{c:>{w}}" if i else f"{c:<{w}}"
                                   for i, (c, (_, _, w)) in enumerate(zip(cells, COLUMNS))))
            if row["died"]:
                lines.append(f"  {row['name']}: died on their own: {', '.join(row['died'])}")
    return "\n".join(lines)


def fault_names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in FAULTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown faults {unknown}; choose from {', '.join(FAULTS)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    default_broker = "mosquitto" if mosquitto_binary() else "embedded"
    parser = argparse.ArgumentParser(prog="fogsplit bench faults", description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--broker", choices=(*BROKER_KINDS, "both"), default=default_broker,
        help=f"the broker the cell runs on (default {default_broker}; embedded: rumqttd)")
    add("--devices", type=positive(int), default=6, metavar="N", help="device processes (default 6)")
    add("--rate", type=positive(float), default=10.0, metavar="NUM", help="events per second (default 10)")
    add("--workers", type=positive(int), default=1, metavar="N",
        help="cloud workers of the faults that do not set it (default 1)")
    add("--faults", type=fault_names, metavar="NAMES", help=f"a comma list of faults (default all: {', '.join(FAULTS)})")
    add("--quick", action="store_true", help="a few seconds per phase (tests)")
    add("--all-cloud", action="store_true", help="every fault with every event sent to the cloud (no early exit)")
    add("--collector", choices=("auto", "transport"), default="auto",
        help="the application: auto = fogsplit.core.follow.ResultFollower when it exists, transport = a plain "
             "subscription on a clean session")
    add("--bundle", type=Path, metavar="DIR", help="an exported bundle (default: export a small one)")
    add("--data", default="images", help="the data set of the bundle, for the replays (default images)")
    add("--trusted-key", type=Path, action="append", default=[], metavar="PATH", help="public key of a signed bundle")
    add("--allow-unsigned", action="store_true",
        help="accept an unsigned bundle (the default when no --trusted-key is given)")
    add("--workdir", type=Path, metavar="DIR", help="keep configs, state and logs of every process here")
    add("--json", type=Path, metavar="FILE", help="also write the figures as JSON here")
    return parser


def main(argv: list[str] | None = None) -> int:
    return timed_main(build_parser().parse_args(argv), run, format_table)


if __name__ == "__main__":
    raise SystemExit(main())
