"""``fogsplit watch``: a live terminal dashboard of a fleet, fed by its status, stats and error
topics (docs/monitoring.md).

Three pieces: :class:`WatchState` takes messages (topic, payload, arrival time) and keeps the
newest word of every gateway, device and cloud worker; :func:`render` turns a state into rich
tables, a pure function of the state and the time; :func:`run_watch` subscribes and refreshes
the screen (``rich.live``), or renders one screen to stdout (``--once``, for scripts). rich is
an optional extra (``fogsplit[watch]``): only this module imports it, and only the watch
command imports this module, so a device never loads it.
"""
from __future__ import annotations

import io
import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from fogsplit.core.topics import Topics
from fogsplit.core.transport import Message, Transport

ERROR_WINDOW_S = 60.0
MAX_ERRORS = 10_000
"""Error reports remembered for the per-minute count; older ones fall out first."""

FILTERS = ("cell/+/gateway/+/status", "cell/+/gateway/+/stats", "cell/+/device/+/status", "cell/+/device/+/stats",
           "cloud/+/status", "cloud/+/stats", "error")
"""What the dashboard reads, under the fleet's root: never the data frames."""


@dataclass
class Part:
    """The newest status and stats of one gateway, device or cloud worker."""

    state: str = "?"
    stats: dict = field(default_factory=dict)
    seen: float | None = None


@dataclass
class WatchState:
    """Everything the dashboard shows, built only from messages; ``unreadable`` counts the
    payloads that were not the JSON object their topic promises."""

    topics: Topics
    gateways: dict[tuple[str, str], Part] = field(default_factory=dict)
    devices: dict[tuple[str, str], Part] = field(default_factory=dict)
    workers: dict[str, Part] = field(default_factory=dict)
    errors: deque = field(default_factory=lambda: deque(maxlen=MAX_ERRORS))   # (arrival, cell or None)
    unreadable: int = 0
    last_unreadable: str | None = None

    def feed(self, topic: str, payload: bytes, now: float) -> None:
        root = self.topics.root + "/"
        if not topic.startswith(root):
            return
        levels = topic[len(root):].split("/")
        try:
            body = json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            body = None
        if not isinstance(body, dict):
            self.unreadable += 1
            self.last_unreadable = topic
            return
        if levels == ["error"]:
            self.errors.append((now, _cell_of_error(body)))
            return
        part = self._part(levels)
        if part is None:
            return
        if levels[-1] == "status":
            part.state = str(body.get("state", "?"))
        else:
            part.stats = body
        part.seen = now

    def _part(self, levels: list[str]) -> Part | None:
        if len(levels) == 5 and levels[0] == "cell" and levels[2] == "gateway":
            return self.gateways.setdefault((levels[1], levels[3]), Part())
        if len(levels) == 5 and levels[0] == "cell" and levels[2] == "device":
            return self.devices.setdefault((levels[1], levels[3]), Part())
        if len(levels) == 3 and levels[0] == "cloud":
            return self.workers.setdefault(levels[1], Part())
        return None

    def errors_since(self, since: float, cell: str | None = None) -> int:
        return sum(1 for at, c in self.errors if at >= since and (cell is None or c == cell))


def _cell_of_error(report: dict) -> str | None:
    """The cell an error report is about: from the refused frame's topic, else the reporter's name."""
    topic = report.get("topic")
    if isinstance(topic, str) and "/cell/" in topic:
        rest = topic.split("/cell/", 1)[1]
        return rest.split("/", 1)[0]
    by = report.get("by")
    return by.split("/", 1)[0] if isinstance(by, str) and "/" in by and not by.startswith("cloud/") else None


def _num(value: object, digits: int = 1) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _get(d: dict, *path: str) -> object:
    for key in path:
        d = d.get(key) if isinstance(d, dict) else None
    return d


def _state(part: Part) -> str:
    return {"online": "[green]online[/]", "offline": "[red]offline[/]"}.get(part.state, part.state)


def render(state: WatchState, now: float) -> Group:
    """The dashboard as rich tables: cells (one row per gateway), devices, cloud workers."""
    cells = Table(title=f"fleet {state.topics.fleet}: cells", title_justify="left", expand=False)
    for name in ("cell", "gateway", "state", "events/s", "local", "edge", "cloud", "cache", "p50 ms", "p99 ms",
                 "devices", "errors/min"):
        cells.add_column(name, justify="left" if name in ("cell", "gateway", "state") else "right")
    for (cell, gw), part in sorted(state.gateways.items()):
        s = part.stats
        exits = s.get("exits") if isinstance(s.get("exits"), dict) else {}
        known = [d for (c, d) in state.devices if c == cell]
        online = s.get("online_devices") if isinstance(s.get("online_devices"), list) else None
        devices = "-" if online is None else f"{len(online)}/{max(len(known), len(online))}"
        cells.add_row(cell, gw, _state(part), _num(s.get("events_per_s")),
                      *(_num(exits.get(t)) for t in ("local", "edge", "cloud", "cache")),
                      _num(_get(s, "latency_ms", "local", "p50")), _num(_get(s, "latency_ms", "local", "p99")),
                      devices, str(state.errors_since(now - ERROR_WINDOW_S, cell)))
    devices = Table(title="devices", title_justify="left")
    for name in ("cell", "device", "state", "processed", "dropped", "shard p50 ms", "RSS MiB", "CPU %"):
        devices.add_column(name, justify="left" if name in ("cell", "device", "state") else "right")
    for (cell, dev), part in sorted(state.devices.items()):
        s = part.stats
        devices.add_row(cell, dev, _state(part), _num(s.get("processed")), _num(s.get("dropped_captures")),
                        _num(_get(s, "shard_ms", "p50"), 2), _num(s.get("rss_mb")), _num(s.get("cpu_percent")))
    parts: list = [cells, devices]
    if state.workers:
        workers = Table(title="cloud workers", title_justify="left")
        for name in ("worker", "state", "answered", "events/s", "p50 ms", "p99 ms", "refused"):
            workers.add_column(name, justify="left" if name in ("worker", "state") else "right")
        for worker, part in sorted(state.workers.items()):
            s = part.stats
            workers.add_row(worker, _state(part), _num(s.get("answered")), _num(s.get("events_per_s")),
                            _num(_get(s, "latency_ms", "p50")), _num(_get(s, "latency_ms", "p99")),
                            _num(s.get("refused")))
        parts.append(workers)
    footer = f"errors in the last minute: {state.errors_since(now - ERROR_WINDOW_S)}"
    if state.unreadable:
        footer += f"; unreadable messages: {state.unreadable} (last on {state.last_unreadable})"
    parts.append(footer)
    return Group(*parts)


def render_text(state: WatchState, now: float, width: int = 120) -> str:
    """The dashboard as plain text, no colours: for ``--once``, tests and the README."""
    console = Console(file=io.StringIO(), width=width, color_system=None, force_terminal=False)
    console.print(render(state, now))
    return console.file.getvalue()


def run_watch(transport: Transport, topics: Topics, *, seconds: float | None,
              wait: Callable[[], None], out: Callable[[str], None] = print) -> WatchState:
    """Subscribe and show. ``seconds`` given: listen that long, then print one screen with
    ``out``; otherwise refresh the screen live until ``wait()`` returns (a signal)."""
    state = WatchState(topics)
    lock = threading.Lock()

    def on_message(msg: Message) -> None:
        with lock:
            state.feed(msg.topic, msg.payload, time.monotonic())

    for leaf in FILTERS:
        transport.subscribe(f"{topics.root}/{leaf}", on_message)
    transport.connect()
    if seconds is not None:
        time.sleep(seconds)
        with lock:
            out(render_text(state, time.monotonic()))
        return state
    stop = threading.Event()

    def refresh(live: Live) -> None:
        while not stop.wait(1.0):
            with lock:
                live.update(render(state, time.monotonic()))

    with Live(render(state, time.monotonic()), refresh_per_second=2, screen=False) as live:
        thread = threading.Thread(target=refresh, args=(live,), name="watch:refresh", daemon=True)
        thread.start()
        try:
            wait()
        finally:
            stop.set()
            thread.join(2.0)
    return state
