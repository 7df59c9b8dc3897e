"""``fogsplit health``: is a service alive and connected? For a container's HEALTHCHECK.

A service started with ``health.file`` set writes a small JSON heartbeat there from its own loop
every ``health.period_s`` (:meth:`fogsplit.core.service.Service.heartbeat`)::

    {"time": 1767225600.0, "name": "cell0/gw0", "connected": true, "muted": false}

Healthy means the file was written within ``--max-age`` seconds (the loop is alive), the
transport was connected, and the broker was not refusing the service's status (``muted``: the
account may not publish where it was started, docs/access.md). No extra process and no MQTT
connection: the check reads one file. Runs as ``python -m fogsplit.health`` too, which imports
nothing of fogsplit's heavy dependencies (the image's HEALTHCHECK uses that form).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

__all__ = ["check", "add_parser", "run", "main"]


def check(path: Path, max_age: float, now: float | None = None) -> tuple[bool, str]:
    """``(healthy, why)`` of the heartbeat file at ``path``."""
    now = time.time() if now is None else now
    try:
        beat = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return False, f"no heartbeat at {path}: the service has not started its loop, or health.file is not set"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return False, f"heartbeat {path} is unreadable: {exc}"
    if not isinstance(beat, dict) or not isinstance(beat.get("time"), (int, float)):
        return False, f"heartbeat {path} is not a fogsplit heartbeat (no numeric 'time')"
    name, age = beat.get("name", "?"), now - beat["time"]
    if age > max_age:
        return False, f"{name}: last heartbeat {age:.1f}s ago (more than {max_age:g}s): its loop is stuck or dead"
    if not beat.get("connected"):
        return False, f"{name}: not connected to the broker"
    if beat.get("muted"):
        return False, f"{name}: the broker refuses its status: wrong account for its fleet and cell (docs/access.md)"
    return True, f"{name}: healthy (heartbeat {age:.1f}s ago, connected)"


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def add_parser(sub: argparse._SubParsersAction | None = None) -> argparse.ArgumentParser:
    help = "exit 0 if a service's heartbeat file is fresh and it is connected, else 1 (HEALTHCHECK)"
    p = sub.add_parser("health", help=help) if sub is not None else argparse.ArgumentParser(
        prog="fogsplit health", description=help)
    p.add_argument("--file", type=Path, required=True, help="the service's health.file")
    p.add_argument("--max-age", type=_positive, default=15.0, metavar="S",
                   help="seconds after which a heartbeat is stale (default 15; give 2-3 x health.period_s)")
    p.add_argument("--quiet", action="store_true", help="print nothing when healthy")
    return p


def run(args: argparse.Namespace) -> int:
    healthy, why = check(args.file, args.max_age)
    if not (healthy and args.quiet):
        print(why, file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1


def main(argv: list[str] | None = None) -> int:
    return run(add_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
