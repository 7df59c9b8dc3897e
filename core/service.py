"""One supervisor per component: a single thread owns the component's state.

MQTT handlers run on paho's network thread and only queue the message; the service thread
dispatches it, runs timers (event deadlines) and periodic jobs (stats). A handler that
raises never stops the service: a refused frame goes to the error topic and the log, and
anything unexpected is logged with its traceback.
"""
from __future__ import annotations

import json
import logging
import queue
import threading
import time
from typing import Callable

from fogsplit.core.errors import FrameError
from fogsplit.core.transport import Message, Transport
from fogsplit.core.topics import Topics

_STOP = object()


class Service:
    """Base of the device agent, the gateway and the cloud worker."""

    def __init__(self, transport: Transport, topics: Topics, name: str) -> None:
        self.transport = transport
        self.topics = topics
        self.name = name
        self.log = logging.getLogger(f"fogsplit.{type(self).__name__.lower()}")
        self._inbox: queue.Queue = queue.Queue()
        self._jobs: list[list] = []          # [period, next_due, fn]
        self._thread: threading.Thread | None = None
        self._loops: list[threading.Thread] = []
        self.refused = 0

    # -- wiring ---------------------------------------------------------------------------
    def route(self, topic_filter: str, handler: Callable[[Message], None]) -> None:
        """Subscribe; ``handler`` will run on the service thread."""
        self.transport.subscribe(topic_filter, lambda msg: self._inbox.put((handler, msg)))

    def submit(self, fn: Callable[..., None], *args: object) -> None:
        """Run ``fn(*args)`` on the service thread (from any thread)."""
        self._inbox.put((fn, args))

    def spawn(self, name: str, fn: Callable[[], None]) -> None:
        """Run a blocking loop (a sensor's capture loop) beside the service thread."""
        thread = threading.Thread(target=self._guard, args=(fn,), name=f"{self.name}:{name}", daemon=True)
        self._loops.append(thread)
        if self._thread is not None:
            thread.start()

    def every(self, period: float, fn: Callable[[], None]) -> None:
        self._jobs.append([period, time.monotonic() + period, fn])

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
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self._thread.start()
        for loop in self._loops:
            loop.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        if self._thread is None:
            return
        self._inbox.put(_STOP)
        self._thread.join(timeout)
        self._thread = None
        for loop in self._loops:
            loop.join(timeout)

    def drain(self, timeout: float = 5.0) -> None:
        """Wait until everything queued so far has been handled (tests, shutdown)."""
        done = threading.Event()
        self.submit(done.set)
        done.wait(timeout)

    def _loop(self) -> None:
        while True:
            now = time.monotonic()
            due = [t for t in (self.next_timer(), *(j[1] for j in self._jobs)) if t is not None]
            wait = max(0.0, min(due) - now) if due else 0.5
            try:
                item = self._inbox.get(timeout=min(wait, 0.5))
            except queue.Empty:
                item = None
            if item is _STOP:
                self._guard(self.on_stop)
                return
            if item is not None:
                fn, arg = item
                self._guard(fn, *(arg if isinstance(arg, tuple) else (arg,)))
            now = time.monotonic()
            timer = self.next_timer()
            if timer is not None and timer <= now:
                self._guard(self.on_timer, now)
            for job in self._jobs:
                if job[1] <= now:
                    job[1] = now + job[0]
                    self._guard(job[2])

    def _guard(self, fn: Callable[..., None], *args: object) -> None:
        try:
            fn(*args)
        except FrameError as err:
            self.refuse(err)
        except Exception:
            self.log.exception("%s: unexpected error in %s; still serving", self.name,
                               getattr(fn, "__name__", fn))

    def refuse(self, err: FrameError) -> None:
        """Report a refused frame on the error topic and in the log."""
        self.refused += 1
        report = {"by": self.name, **err.as_report()}
        self.log.warning("%s: refused frame on %s from %s event %s: %s", self.name, err.topic,
                         err.device, err.event, err)
        self.transport.publish(self.topics.error, json.dumps(report).encode(), qos=1)


def status_payload(state: str, **extra: object) -> bytes:
    return json.dumps({"state": state, "time": time.time(), **extra}).encode()
