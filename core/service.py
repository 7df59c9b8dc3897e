"""One supervisor per component: the thin adapter between a tier's logic and MQTT.

MQTT handlers run on the transport's network thread and only queue the message; the one
service thread hands it to the logic, runs timers (event deadlines) and periodic jobs (stats),
and publishes the actions the logic returns on the topics the topic table names. A handler
that raises never stops the service: a refused frame goes to the error topic and the log,
anything unexpected is logged with its traceback.

Refused frames are reported without amplifying a flood: the first refusal of each rule on each
topic in a ``REPORT_EVERY_S`` interval is logged and published on the error topic in full; the
others of that interval are only counted, and reported as one line and one message per rule
with the count when the interval ends. A flood of bad frames on one topic costs one report per
interval; one spread over many topics at most ``MAX_REPORT_KEYS`` reports, then one per rule.

Bounds: the inbox holds at most ``inbox`` messages. When it is full the oldest message queued
is dropped to make room for the new one (drop-oldest: under overload what is served is the
freshest, and in the reliable mode the devices' spools replay what was dropped), counted in
``inbox_dropped`` (published in the component's stats) and logged at most once per
``LOG_EVERY_S``. A call submitted by the service itself is never dropped to make room.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from typing import Callable, Iterable

from fogsplit.core.actions import Action, Answer, Forward, Refuse, RequestFeatures, Send
from fogsplit.core.clock import SYSTEM_CLOCK, Clock
from fogsplit.core.errors import FrameError
from fogsplit.core.topics import TOPICS, Topics
from fogsplit.core.transport import Message, Transport

LOG_EVERY_S = 10.0
REPORT_EVERY_S = 10.0
MAX_REPORT_KEYS = 1024     # (rule, topic) pairs reported in full per interval; beyond, per rule

Handler = Callable[[Message], "Iterable[Action] | None"]


class Service:
    """Base of the device agent, the gateway and the cloud worker."""

    def __init__(self, transport: Transport, topics: Topics, name: str, *, inbox: int = 10_000,
                 clock: Clock = SYSTEM_CLOCK) -> None:
        if inbox < 1:
            raise ValueError(f"inbox must hold at least one message, got {inbox}")
        self.transport = transport
        self.topics = topics
        self.name = name
        self.clock = clock
        self.log = logging.getLogger(type(self).__module__)
        self._inbox: queue.Queue = queue.Queue(maxsize=inbox)
        self._jobs: list[list] = []          # [period, next_due, fn]
        self._thread: threading.Thread | None = None
        self._loops: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._last_drop_log = -LOG_EVERY_S
        self._status: tuple[str, str, bytes] | None = None
        self.refused = 0
        self.inbox_dropped = 0
        self.waited_s = 0.0          # how long the item in hand waited in the inbox
        self._reported_at: dict[tuple[str, str | None], float] = {}
        self._suppressed: dict[str, int] = {}
        self.every(REPORT_EVERY_S, self._report_suppressed)

    # -- wiring ---------------------------------------------------------------------------
    def route(self, topic_filter: str, handler: Handler) -> None:
        """Subscribe; ``handler`` runs on the service thread and its actions are published."""
        def take(msg: Message) -> None:
            self._enqueue((self._handle, (handler, msg)), message=True)
        self.transport.subscribe(topic_filter, take)

    def presence(self, kind: str, topic: str, online: Callable[[], bytes], offline: bytes) -> None:
        """This component's retained status (a ``*_status`` kind of the topic table): ``online()``
        on every connect, ``offline`` as the will and on a clean stop."""
        self._status = (kind, topic, offline)
        self.transport.set_presence(topic, online, offline)

    def submit(self, fn: Callable[..., object], *args: object) -> bool:
        """Run ``fn(*args)`` on the service thread (from any thread); False if the inbox was full."""
        return self._enqueue((fn, args))

    def spawn(self, name: str, fn: Callable[[], None]) -> None:
        """Run a blocking loop (a sensor's capture loop) beside the service thread."""
        thread = threading.Thread(target=self._guard, args=(fn,), name=f"{self.name}:{name}", daemon=True)
        self._loops.append(thread)
        if self._thread is not None:
            thread.start()

    def every(self, period: float, fn: Callable[[], None]) -> None:
        self._jobs.append([period, self.clock.monotonic() + period, fn])

    def heartbeat(self, path: str, period: float) -> None:
        """Write ``{"time", "name", "connected", "muted"}`` to ``path`` every ``period`` seconds from
        the service thread: a fresh file proves the loop alive (``fogsplit health``, a container's
        HEALTHCHECK). Written to a temporary file and renamed, so a reader never sees half of it."""
        failed = []

        def beat() -> None:
            body = {"time": time.time(), "name": self.name, "connected": self.transport.connected,
                    "muted": bool(getattr(self.transport, "muted", False))}
            try:
                with open(f"{path}.tmp", "w") as f:
                    json.dump(body, f)
                os.replace(f"{path}.tmp", path)
            except OSError as exc:
                if not failed:
                    failed.append(exc)
                    self.log.error("%s: cannot write the heartbeat %s: %s; the health check will fail",
                                   self.name, path, exc)
        self._jobs.append([period, self.clock.monotonic(), beat])

    # -- publishing -----------------------------------------------------------------------
    def send(self, kind: str, topic: str, payload: bytes, events: Iterable[int] = ()) -> int:
        """Publish on a topic of ``kind`` with the QoS and retain flag of the topic table."""
        spec = TOPICS[kind]
        return self.transport.publish(topic, payload, qos=spec.qos, retain=spec.retain, events=events)

    def apply(self, actions: Iterable[Action] | None) -> None:
        for action in actions or ():
            if isinstance(action, Answer):
                # The answer itself is charged to no event: bytes per event count what it takes
                # to reach an answer, the same for every system compared (docs/communication.md).
                self.send(action.kind, self.topics.topic(action.kind, cell=action.cell), action.result.to_json())
            elif isinstance(action, RequestFeatures):
                self.send("request", self.topics.request(action.cell), action.payload, action.events)
            elif isinstance(action, Forward):
                self.send("forward", self.topics.forward(action.cell), action.payload, [action.event])
            elif isinstance(action, Send):
                self.send(action.kind, self.topics.topic(action.kind, cell=action.cell, device=action.device), action.payload,
                          action.events)
            elif isinstance(action, Refuse):
                self.refuse(action.error)
            else:
                raise TypeError(f"unknown action {action!r}")

    def refuse(self, err: FrameError) -> None:
        """Count a refused frame; report it on the error topic and in the log unless its rule
        was reported less than ``REPORT_EVERY_S`` ago (then it joins the interval's count)."""
        self.refused += 1
        now = self.clock.monotonic()
        key = (err.rule, err.topic) if len(self._reported_at) < MAX_REPORT_KEYS else (err.rule, None)
        if now - self._reported_at.get(key, -REPORT_EVERY_S) < REPORT_EVERY_S:
            self._suppressed[err.rule] = self._suppressed.get(err.rule, 0) + 1
            return
        self._reported_at[key] = now
        report = {"by": self.name, **err.as_report()}
        self.log.warning("%s: refused frame on %s from %s event %s: %s", self.name, err.topic,
                         err.device, err.event, err)
        self.send("error", self.topics.error, json.dumps(report).encode())

    def _report_suppressed(self) -> None:
        counts, self._suppressed = self._suppressed, {}
        now = self.clock.monotonic()
        self._reported_at = {k: t for k, t in self._reported_at.items() if now - t < REPORT_EVERY_S}
        for rule, count in counts.items():
            self.log.warning("%s: %d more frames refused by rule %r in the last %.0fs (first one reported above)",
                             self.name, count, rule, REPORT_EVERY_S)
            self.send("error", self.topics.error, json.dumps(
                {"by": self.name, "rule": rule, "detail": f"{count} more frames refused in {REPORT_EVERY_S:.0f}s",
                 "device": None, "event": None, "topic": None, "count": count,
                 "interval_s": REPORT_EVERY_S}).encode())

    # -- hooks for subclasses -------------------------------------------------------------
    def next_timer(self) -> float | None:
        """Monotonic time at which :meth:`on_timer` must run next, or None."""
        return None

    def on_timer(self, now: float) -> None:
        pass

    def on_stop(self) -> None:
        pass

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> "Service":
        self._stopping.clear()
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self._thread.start()
        for loop in self._loops:
            loop.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the loops, run :meth:`on_stop`, publish ``offline`` (a clean stop fires no will)."""
        if self._thread is None:
            return
        self._stopping.set()
        self._wake()
        self._thread.join(timeout)
        self._thread = None
        for loop in self._loops:
            loop.join(timeout)
        if self._status is not None:
            self.send(*self._status)

    def drain(self, timeout: float = 5.0) -> None:
        """Wait until everything queued so far has been handled (tests, shutdown)."""
        done = threading.Event()
        deadline = time.monotonic() + timeout
        while not self.submit(done.set) and time.monotonic() < deadline:
            time.sleep(0.01)
        done.wait(max(0.0, deadline - time.monotonic()))

    def _enqueue(self, item: tuple, *, message: bool = False) -> bool:
        """Queue ``item``; in a full inbox a new message takes the place of the oldest message
        queued (a submitted call is never dropped to make room). False if ``item`` was dropped."""
        item = (*item, time.monotonic())
        try:
            self._inbox.put_nowait(item)
            return True
        except queue.Full:
            pass
        oldest = self._replace_oldest_message(item) if message else None
        self._count_dropped(oldest if oldest is not None else item)
        return oldest is not None

    def _replace_oldest_message(self, item: tuple) -> tuple | None:
        """Put ``item`` in place of the oldest message queued, at once (under the queue's lock);
        that message, or None if only calls are queued."""
        with self._inbox.mutex:
            for i, queued in enumerate(self._inbox.queue):
                if queued[0] == self._handle:
                    del self._inbox.queue[i]
                    self._inbox.queue.append(item)
                    self._inbox.not_empty.notify()
                    return queued
        return None

    def _count_dropped(self, dropped: tuple) -> None:
        self.inbox_dropped += 1
        msg = dropped[1][1] if dropped[0] == self._handle else None
        if isinstance(msg, Message) and msg.ack is not None:
            msg.ack()          # dropped by the inbox's policy: counted, not left in flight
        now = time.monotonic()
        if now - self._last_drop_log >= LOG_EVERY_S:
            self._last_drop_log = now
            self.log.warning("%s: inbox full (%d messages): dropping the oldest; %d dropped so far", self.name,
                             self._inbox.maxsize, self.inbox_dropped)

    def _wake(self) -> None:
        try:
            self._inbox.put_nowait((None, (), 0.0))
        except queue.Full:
            pass   # the loop is busy and will see the stop flag after the item in hand

    def _handle(self, handler: Handler, msg: Message) -> None:
        """Handle a message and publish what it asks; a manual ack goes after those publishes."""
        try:
            self.apply(handler(msg))
        finally:
            if msg.ack is not None:
                msg.ack()

    def _loop(self) -> None:
        while not self._stopping.is_set():
            now = self.clock.monotonic()
            due = [t for t in (self.next_timer(), *(j[1] for j in self._jobs)) if t is not None]
            wait = max(0.0, min(due) - now) if due else 0.5
            try:
                fn, args, queued_at = self._inbox.get(timeout=min(wait, 0.5))
                self.waited_s = time.monotonic() - queued_at
            except queue.Empty:
                fn, args = None, ()
            if fn is not None and not self._stopping.is_set():
                self._guard(fn, *args)
            now = self.clock.monotonic()
            timer = self.next_timer()
            if timer is not None and timer <= now:
                self._guard(self.on_timer, now)
            for job in self._jobs:
                if job[1] <= now:
                    job[1] = now + job[0]
                    self._guard(job[2])
        self._guard(self.on_stop)

    def _guard(self, fn: Callable[..., object], *args: object) -> None:
        try:
            fn(*args)
        except FrameError as err:
            self.refuse(err)
        except Exception:
            self.log.exception("%s: unexpected error in %s; still serving", self.name,
                               getattr(fn, "__name__", fn))


def status_payload(state: str, **extra: object) -> bytes:
    return json.dumps({"state": state, "time": time.time(), **extra}).encode()
