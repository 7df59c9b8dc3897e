"""What hostile frames do to a running cell: crashes, refusals, lost real events, memory, and the
volume of log and error reports a flood makes.

    fogsplit bench fuzz --frames N [--json F] [--bundle DIR] [--flood-rate R] [--seed S]

Seeds are real frames (bench/mutate.py): made by the bundle's own shards with the encoders of
core/frames.py, and captured off the running stack for a few seconds. From them a seeded fast
mutator and Hypothesis make N frames for every input topic (scores, feature, request, forward,
result, device status, cmd, and the reliable-delivery topics late, ack, cloud result, replay
and gateway status where core/topics.py has them; raw and fog with ``--kinds``).

1. **Stack.** A cell as real processes (bench/stack.py: a private Mosquitto on a free port, a
   cloud worker, the gateway and one agent per sensor of the bundle, each ``fogsplit ROLE
   --config FILE``) streams real events at ``--rate`` while the N frames are published at QoS 0
   at ``--flood-rate`` frames/s, straight to the broker. Measured, from outside:
   ``crashes`` (tier processes that died, or that did not answer real events after the flood:
   the gateway's results for new events, each device's scores in them, the cloud worker's answer
   to a probe forward), ``refused`` (the sum of the tiers' ``refused`` counters on their stats
   topics, minus the value before the flood), ``real_events`` (events the real devices captured
   during the flood, from their scores frames; forged frames are known by their bytes) and
   ``real_lost`` (those with no result by the end of ``--settle-s``), ``rss_growth`` per tier
   process (VmRSS after the flood over before, minus 1), ``error_reports`` (messages on the
   fleet's error topic during the flood and the settle time) and their ratio to ``frames``,
   ``log_bytes`` each tier process wrote during the flood, and the tracebacks in those logs
   (a tier that caught an exception and went on: not a dead process, but a bug).
2. **In process.** The same services on the in-memory broker (core/loopback.py), not started:
   ``--inprocess-frames`` frames, every message handled on this thread, so that each exception
   comes with the frame that raised it. Crashes are grouped by where they broke, each with a
   reproducer: topic, payload (hex) and traceback; for one raised later (in a capture or a
   timer), the earlier frame that set it off is searched for.

The stack part needs Mosquitto (``--broker embedded``: rumqttd); ``--inprocess-only`` needs no
broker. A bundle is exported (a small one, 200 training steps) when ``--bundle`` is not given.
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import re
import tempfile
import logging
import queue
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fogsplit.bench.report import write_json
from fogsplit.core.clock import FakeClock
from fogsplit.core.errors import FrameError

from fogsplit.bench.mutate import INPUT_KINDS, Context, Fuzzed, Mutator, Seed, bundle_seeds, classify, context_of


@dataclass
class Crash:
    """A handler, timer or job of a tier that raised something other than a refusal."""

    tier: str
    handler: str
    frame: Fuzzed
    error: str
    traceback: str
    recent: tuple[Fuzzed, ...] = ()      # the frames fed before it, newest last (a crash in a timer or capture)

    @property
    def signature(self) -> str:
        """Where it broke: the exception type and the innermost fogsplit line."""
        lines = [ln.strip() for ln in self.traceback.splitlines() if ln.strip().startswith('File "')]
        ours = [ln for ln in lines if "/work/main/" in ln or "fogsplit" in ln] or lines
        where = ours[-1].split("/")[-1] if ours else "?"
        return f"{self.error.split(':')[0]} at {where}"

    def report(self) -> dict:
        return {"tier": self.tier, "handler": self.handler, "signature": self.signature, "error": self.error,
                **self.frame.describe(), "traceback": self.traceback}

    @property
    def direct(self) -> bool:
        """Raised while handling the frame itself (not a later capture or timer)."""
        return bool(self.frame.topic)


@dataclass
class Tally:
    frames: int = 0
    calls: int = 0
    refused: int = 0
    crashes: list[Crash] = field(default_factory=list)


class _NoSource:
    """A device source that captures nothing by itself: the harness hands captures in."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.skipped = 0

    def captures(self):
        return iter(())


class InProcess:
    """One cell's real services (gateway, device agents, a cloud worker) on an in-memory broker
    (core/loopback.py), not started: :meth:`feed` publishes a frame, and every message the
    broker queued for a service is then handled on the caller's thread, the way the service
    loop would (``Service._inbox``), except that anything raised is recorded as a
    :class:`Crash` with its frame, not only logged. A refusal (:class:`FrameError`) is counted.
    So the routing is the services' own: a new topic a tier subscribes to is fuzzed as soon as
    frames are sent to it. The clock is a :class:`FakeClock` moved by :meth:`tick`."""

    def __init__(self, bundle, *, cell: str, topics, clock: FakeClock | None = None, rate: float = 10.0,
                 gateway_settings=None, device_settings=None, cloud_settings=None) -> None:
        from fogsplit.cloud.worker import CloudWorker
        from fogsplit.core.loopback import LoopbackBroker, LoopbackTransport
        from fogsplit.core.settings import CacheSettings, DeviceCacheSettings, DeviceSettings, GatewaySettings
        from fogsplit.device.agent import DeviceAgent
        from fogsplit.gateway.gateway import Gateway

        self.bundle, self.cell, self.topics, self.rate = bundle, cell, topics, rate
        self.clock = clock or FakeClock()
        m = bundle.manifest
        self.broker = LoopbackBroker()
        gateway_settings = gateway_settings or GatewaySettings(
            cache=CacheSettings(max_entries=256), deadline_ms=200, feature_deadline_ms=300, discovery=False)
        device_settings = device_settings or DeviceSettings(cache=DeviceCacheSettings(max_entries=64), rate=rate)
        self.services: dict[str, object] = {
            "gateway": Gateway(LoopbackTransport(self.broker, "gw0"), topics, bundle, cell=cell,
                               settings=gateway_settings, clock=self.clock)}
        for d in m.sensor_names:
            self.services[f"device:{d}"] = DeviceAgent(LoopbackTransport(self.broker, f"dev-{d}"), topics, bundle,
                                                       cell=cell, device=d, source=_NoSource(rate),
                                                       settings=device_settings, clock=self.clock)
        self.services["cloud"] = CloudWorker(LoopbackTransport(self.broker, "cloud0"), topics, bundle,
                                             settings=cloud_settings, clock=self.clock)
        self.outside = LoopbackTransport(self.broker, "fuzzer")
        self.results: list[bytes] = []
        self.errors = 0
        self.outside.subscribe(topics.result(cell), lambda msg: self.results.append(msg.payload))
        self.outside.subscribe(topics.error, lambda msg: self._count_error())
        self.outside.connect()
        for svc in self.services.values():
            svc.transport.connect()
        self.tally = Tally()
        self.recent: deque[Fuzzed] = deque(maxlen=64)
        self.pump(Fuzzed("start", "", b"", "start"))

    def _count_error(self) -> None:
        self.errors += 1

    def feed(self, frame: Fuzzed) -> None:
        """Publish ``frame`` (QoS 0, not retained) and handle what it set off, in every tier."""
        self.tally.frames += 1
        self.recent.append(frame)
        try:
            self.outside.publish(frame.topic, frame.payload, qos=0)
        except ValueError:          # a topic no broker takes (a wildcard): nothing reaches a tier
            return
        self.pump(frame)

    def pump(self, frame: Fuzzed, limit: int = 100_000) -> None:
        """Handle every queued message, and what handling it publishes, until all inboxes are empty."""
        for _ in range(limit):
            busy = False
            for name, svc in self.services.items():
                try:
                    item = svc._inbox.get_nowait()      # (fn, args, ...): what the service loop takes
                except queue.Empty:
                    continue
                fn, args = item[0], item[1]
                if hasattr(svc, "waited_s"):
                    svc.waited_s = 0.0                  # no overload here: nothing is shed
                busy = True
                if fn is not None:
                    self._call(name, getattr(fn, "__name__", str(fn)), frame, svc, fn, *args)
            if not busy:
                return

    def _call(self, tier: str, name: str, frame: Fuzzed, svc, fn, *args) -> None:
        self.tally.calls += 1
        if args and hasattr(args[0], "__qualname__"):
            name = args[0].__qualname__.replace(".<locals>", "")
        try:
            fn(*args)
        except FrameError as err:        # a refusal raised past the logic: the service refuses it too
            self.tally.refused += 1
            svc.refuse(err)
        except Exception as exc:  # noqa: BLE001 - anything else is what we look for
            self.tally.crashes.append(Crash(tier, name, frame, f"{type(exc).__name__}: {exc}"[:500],
                                            traceback.format_exc(limit=14),
                                            () if frame.topic else tuple(self.recent)))

    def capture(self, event: int, samples: dict[str, np.ndarray] | None = None, *, seed: int = 0) -> None:
        """Every device captures ``event`` (random samples unless given), as its capture loop would."""
        from fogsplit.device.sources import Capture
        rng = np.random.default_rng(seed + event)
        for sensor in self.bundle.manifest.sensors:
            sample = samples[sensor.name] if samples else (
                rng.integers(0, 256, tuple(sensor.shape)).astype(np.float32) if sensor.dtype == "uint8"
                else rng.standard_normal(tuple(sensor.shape)).astype(np.float32))
            svc = self.services[f"device:{sensor.name}"]
            label = Fuzzed("capture", "", b"", f"capture {event}")
            self._call(f"device:{sensor.name}", "on_capture", label, svc,
                       lambda s=svc, c=Capture(event=event, captured=event / self.rate, sample=sample):
                       s.apply(s.logic.on_capture(c)))
        self.pump(Fuzzed("capture", "", b"", f"capture {event}"))

    def tick(self, seconds: float, frame: Fuzzed | None = None) -> None:
        """Move the clock; run every timer and periodic job that is due (a crash there is charged
        to ``frame``, the last one fed)."""
        self.clock.advance(seconds)
        now = self.clock.monotonic()
        label = Fuzzed("timer", "", b"", f"timer after {frame.kind} {frame.mutation}" if frame else "timer")
        for name, svc in self.services.items():
            due = svc.next_timer()
            if due is not None and due <= now:
                self._call(name, "on_timer", label, svc, svc.on_timer, now)
            for job in svc._jobs:
                if job[1] <= now:
                    job[1] = now + job[0]
                    self._call(name, getattr(job[2], "__name__", "job"), label, svc, job[2])
        self.pump(label)

    def close(self) -> None:
        for svc in self.services.values():
            close = getattr(getattr(svc, "journal", None), "close", None)
            if close:
                close()


def quiet_tiers() -> None:
    """The services log a WARNING per refused frame: keep a flood of them off the console."""
    for name in ("fogsplit", "fogsplit.core.service", "fogsplit.gateway", "fogsplit.device", "fogsplit.cloud"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


# -- generating ----------------------------------------------------------------------------------

def hypothesis_batch(seeds: list[Seed], ctx: Context, n: int, *, seed: int = 0,
                     kinds: list[str] | None = None) -> list[Fuzzed]:
    """``n`` frames drawn by Hypothesis from :func:`~fogsplit.bench.mutate.hypothesis_frames`
    (generation only: no shrinking, no example database). Empty when Hypothesis is missing."""
    if n <= 0:
        return []
    try:
        from hypothesis import HealthCheck, Phase, given, settings
    except ImportError:
        logging.getLogger(__name__).warning("hypothesis is not installed: every frame comes from the seeded mutator")
        return []
    from fogsplit.bench.mutate import hypothesis_frames

    out: list[Fuzzed] = []
    strategy = hypothesis_frames(seeds, ctx, kinds=kinds)

    @settings(max_examples=n, database=None, deadline=None, phases=[Phase.generate], derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(frame: Fuzzed) -> None:
        out.append(frame)

    import random as _random
    state = _random.getstate()
    _random.seed(seed)
    try:
        collect()
    finally:
        _random.setstate(state)
    return out[:n]


def frame_stream(mutator: Mutator, extra: list[Fuzzed], n: int, *, seed: int = 0):
    """``n`` frames: ``extra`` (Hypothesis's) spread evenly among the mutator's."""
    import random as _random
    rng = _random.Random(seed)
    every = n / len(extra) if extra else 0
    extra = list(extra)
    rng.shuffle(extra)
    k = 0
    for i in range(n):
        if extra and k < len(extra) and i >= k * every:
            k += 1
            yield extra[k - 1]
        else:
            yield mutator.next()


# -- in process ----------------------------------------------------------------------------------

def reproduce(crash: Crash, make, *, tries: int = 48) -> list[Fuzzed] | None:
    """The shortest frame sequence found that makes fresh tiers (``make()``) raise as ``crash``
    did: its own frame alone, else one of the frames fed before it and then its own (a status
    that poisons the roster, say, and the frame that then breaks). A crash raised in a capture
    or a timer is tried with the captures and timers that follow each candidate."""
    def raises(frames: list[Fuzzed]) -> bool:
        harness = make()
        try:
            for frame in frames:
                harness.feed(frame)
            event = round(harness.clock.time() * harness.rate)
            for i in range(3):
                harness.capture(event + i)
                harness.tick(0.4)
            return any(c.signature == crash.signature for c in harness.tally.crashes)
        finally:
            harness.close()

    own = [crash.frame] if crash.direct else []
    if own and raises(own):
        return own
    seen = {(crash.frame.topic, crash.frame.payload)}
    for frame in reversed(crash.recent[-tries:]):
        if (frame.topic, frame.payload) in seen:
            continue
        seen.add((frame.topic, frame.payload))
        if raises([frame, *own]):
            return [frame, *own]
    return None


def run_inprocess(bundle, seeds: list[Seed], ctx: Context, *, frames: int, seed: int = 0, hypothesis_share: float,
                  kinds: list[str], rate: float, spoof: bool = True, triggers: int = 25) -> dict:
    """Feed ``frames`` frames to the in-process tiers (a capture every 20 frames, the clock moving
    0.1 s); crashes grouped by signature, each with a reproducer."""
    quiet_tiers()
    start_wall = time.time()

    def make() -> InProcess:
        return InProcess(bundle, cell=ctx.cell, topics=ctx.topics, clock=FakeClock(wall=start_wall), rate=rate)

    harness = make()
    mutator = Mutator(seeds, ctx, seed=seed + 1, kinds=kinds, spoof=spoof, clock=harness.clock.time)
    extra = hypothesis_batch(seeds, ctx, int(frames * hypothesis_share), seed=seed + 1, kinds=kinds)
    started = time.perf_counter()
    by_kind: collections.Counter = collections.Counter()
    for i, frame in enumerate(frame_stream(mutator, extra, frames, seed=seed)):
        by_kind[frame.kind] += 1
        harness.feed(frame)
        if i % 20 == 19:
            harness.tick(0.1, frame)
            harness.capture(round(harness.clock.time() * rate))
    elapsed = time.perf_counter() - started
    groups: dict[str, list[Crash]] = {}
    for crash in harness.tally.crashes:
        groups.setdefault(crash.signature, []).append(crash)
    crashes = []
    for signature, group in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        direct = [c for c in group if c.direct]
        first = min(direct or group, key=lambda c: len(c.frame.payload))
        row = {"signature": signature, "count": len(group), **first.report()}
        if len(crashes) < triggers:
            found = next((r for c in sorted(direct, key=lambda c: len(c.frame.payload))[:3] + group[:2]
                          if (r := reproduce(c, make)) is not None), None)
            row["reproducer"] = [f.describe() for f in found] if found is not None else None
        crashes.append(row)
    harness.close()
    return {"frames": frames, "seconds": round(elapsed, 1), "frames_per_s": round(frames / elapsed) if elapsed else None,
            "handler_calls": harness.tally.calls, "results": len(harness.results), "error_reports": harness.errors,
            "crashes": sum(len(g) for g in groups.values()), "crash_kinds": len(groups), "by_kind": dict(by_kind),
            "hypothesis_frames": len(extra), "crash_list": crashes}


# -- the stack -----------------------------------------------------------------------------------

TRACEBACK = re.compile(r"^Traceback \(most recent call last\):$")


def log_exceptions(text: str) -> collections.Counter:
    """The exceptions in a tier's log text: each traceback's last line with its innermost
    fogsplit location."""
    out: collections.Counter = collections.Counter()
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if TRACEBACK.match(lines[i]):
            where = "?"
            j = i + 1
            while j < len(lines) and (lines[j].startswith(" ") or lines[j].startswith("\t")):
                if lines[j].strip().startswith('File "') and ("fogsplit" in lines[j] or "/work/main/" in lines[j]):
                    where = lines[j].strip().split("/")[-1]
                j += 1
            last = lines[j] if j < len(lines) else "?"
            out[f"{last.split(':')[0]} at {where}"] += 1
            i = j
        else:
            i += 1
    return out


class Watcher:
    """An application beside the stack, straight on the broker: the cell's results, the fleet's
    error reports, every tier's stats, the real devices' scores (to know which events were
    captured) and a probe cell's cloud answers. Frames this bench forged are known by their
    bytes (``forged``) and are not counted as real."""

    def __init__(self, url: str, topics, cell: str, ctx: Context, devices: list[str], probe_cell: str) -> None:
        from fogsplit.core.frames import decode_frame, unwrap_slot
        from fogsplit.core.mqtt import MqttTransport

        self.decode_frame, self.unwrap_slot = decode_frame, unwrap_slot
        self.ctx, self.devices, self.topics, self.cell = ctx, devices, topics, cell
        self.lock = threading.Lock()
        self.forged: set[bytes] = set()
        self.results: dict[int, list[tuple[float, dict]]] = {}
        self.forged_results = 0
        self.malformed_results = 0
        self.errors: list[float] = []
        self.stats: dict[str, dict] = {}
        self.stats_at: dict[str, float] = {}
        self.captured: dict[int, tuple[float, set[str]]] = {}     # event -> (first seen, devices)
        self.last_scores: dict[str, float] = {}
        self.probe: dict[int, float] = {}
        self.transport = t = MqttTransport(url, f"{topics.fleet}-fuzz-watch")
        t.subscribe(topics.result(cell), self._on_result)
        t.subscribe(topics.error, self._on_error)
        t.subscribe(topics.gateway_stats(cell, "+"), lambda m: self._on_stats("gateway", m))
        t.subscribe(topics.device_stats(cell, "+"), lambda m: self._on_stats("device", m))
        t.subscribe(topics.cloud_stats("+"), lambda m: self._on_stats("cloud", m))
        for d in devices:
            t.subscribe(topics.scores(cell, d), self._on_scores)
        for kind in ("result", "cloud_result"):
            try:
                t.subscribe(topics.topic(kind, cell=probe_cell), self._on_probe)
            except KeyError:
                pass

    def start(self) -> "Watcher":
        self.transport.connect()
        return self

    def close(self) -> None:
        self.transport.close()

    @staticmethod
    def key(topic: str, payload: bytes) -> bytes:
        return hashlib.blake2b(topic.encode() + b"\0" + payload, digest_size=16).digest()

    def forge(self, frame: Fuzzed) -> None:
        """Note a frame before it is published, so that its echo is not taken for a real one."""
        if frame.kind in ("result", "scores"):
            with self.lock:
                self.forged.add(self.key(frame.topic, frame.payload))

    def _is_forged(self, msg) -> bool:
        with self.lock:
            return self.key(msg.topic, msg.payload) in self.forged

    def _on_result(self, msg) -> None:
        at = time.time()
        if self._is_forged(msg):
            self.forged_results += 1
            return
        try:
            body = json.loads(msg.payload)
            event = body["event"]
            if not isinstance(event, int) or isinstance(event, bool):
                raise TypeError("event")
        except Exception:  # noqa: BLE001 - a real result that is not JSON with an integer event
            self.malformed_results += 1
            return
        with self.lock:
            self.results.setdefault(event, []).append((at, body))

    def _on_error(self, msg) -> None:
        with self.lock:
            self.errors.append(time.time())

    def _on_stats(self, tier: str, msg) -> None:
        name = f"{tier}:{msg.topic.rsplit('/', 2)[-2]}"
        try:
            body = json.loads(msg.payload)
        except ValueError:
            return
        with self.lock:
            self.stats[name] = body
            self.stats_at[name] = time.time()

    def _on_scores(self, msg) -> None:
        at = time.time()
        if self._is_forged(msg):
            return
        device = msg.topic.rsplit("/", 2)[-2]
        try:
            frame = self.decode_frame(msg.payload, "scores", self.expect)
        except Exception:  # noqa: BLE001 - not a real device's frame
            return
        event = self.unwrap_slot(frame.slot, round(at * self.ctx.rate))
        with self.lock:
            seen = self.captured.setdefault(event, (at, set()))
            seen[1].add(device)
            self.last_scores[device] = at

    def _on_probe(self, msg) -> None:
        try:
            event = json.loads(msg.payload)["event"]
        except Exception:  # noqa: BLE001
            return
        with self.lock:
            self.probe.setdefault(event, time.time())

    def refused(self) -> dict[str, int]:
        with self.lock:
            return {name: int(body.get("refused") or 0) for name, body in self.stats.items()}

    def errors_between(self, t0: float, t1: float) -> int:
        with self.lock:
            return sum(t0 <= t < t1 for t in self.errors)


def _pace(count: int, started: float, rate: float | None) -> None:
    if rate:
        ahead = started + count / rate - time.perf_counter()
        if ahead > 0:
            time.sleep(ahead)


class Flooder:
    """A paho client straight on the broker that publishes frames at QoS 0, never retained."""

    def __init__(self, url: str, client_id: str) -> None:
        import paho.mqtt.client as paho
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=paho.MQTTv5)
        self.client.max_queued_messages_set(0)
        self.client.connect(parts.hostname, parts.port or 1883, keepalive=30)
        self.client.loop_start()
        self.sent = 0
        self.failed = 0

    def publish(self, frame: Fuzzed) -> bool:
        try:
            info = self.client.publish(frame.topic, frame.payload, qos=0, retain=False)
        except ValueError:         # a topic paho will not send (not UTF-8, a wildcard)
            self.failed += 1
            return False
        if info.rc != 0:
            self.failed += 1
            return False
        self.sent += 1
        return True

    def backlog(self) -> int:
        return len(getattr(self.client, "_out_packet", ()))

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def capture_frames(url: str, topics, seconds: float) -> list[Seed]:
    """What flows on the fleet's input topics for ``seconds``, as seeds (at most 16 per kind)."""
    from fogsplit.core.mqtt import MqttTransport

    got: dict[str, list[Seed]] = {}
    lock = threading.Lock()

    def on_message(msg) -> None:
        kind = classify(msg.topic, topics)
        if kind is None:
            return
        with lock:
            bucket = got.setdefault(kind, [])
            if len(bucket) < 16:
                bucket.append(Seed(kind, msg.topic, bytes(msg.payload)))

    transport = MqttTransport(url, f"{topics.fleet}-fuzz-capture")
    transport.subscribe(f"{topics.root}/#", on_message)
    transport.connect()
    time.sleep(seconds)
    transport.close()
    return [s for bucket in got.values() for s in bucket]


def log_sizes(stack) -> dict[str, int]:
    return {name: (p.log_path.stat().st_size if p.log_path.exists() else 0) for name, p in stack.procs.items()}


def _read_from(path: Path, offset: int) -> str:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def make_stack(options, *, device_settings: dict, cloud_settings: dict):
    """A :class:`~fogsplit.bench.stack.Stack` whose devices and workers get extra settings too
    (a device cache, so that devices read results and commands; short stats periods), and whose
    configs may hold nested tables (``[device.cache]``)."""
    from fogsplit.bench import stack as stack_module

    class FuzzStack(stack_module.Stack):
        def _configs(self):
            configs = super()._configs()
            for name, body in configs.items():
                if name in self.devices:
                    body.setdefault("device", {}).update(device_settings)
                elif name in self.workers:
                    body.setdefault("cloud", {}).update(cloud_settings)
            return configs

        def _add_tier(self, name, body):
            nested = {}
            for table, values in body.items():
                if isinstance(values, dict):
                    for key in [k for k, v in values.items() if isinstance(v, dict)]:
                        nested[f"{table}.{key}"] = values.pop(key)
            super()._add_tier(name, body)
            if nested:
                config = self.options.workdir / name / f"{name}.toml"
                with config.open("a") as f:
                    for table, values in nested.items():
                        f.write(f"\n[{table}]\n")
                        f.writelines(f"{k} = {stack_module._toml_value(v)}\n" for k, v in values.items()
                                     if v is not None)

    return FuzzStack(options)


def probe_forward(ctx: Context, bundle, event: int) -> bytes:
    """A real forward frame (the gateway shard's edge feature of zeros) for ``event``."""
    from fogsplit.core.frames import encode_forward_frame
    m = bundle.manifest
    return encode_forward_frame(model=m.model_id, event=event, captured=time.time(), devices=ctx.sensors,
                                sensors=ctx.sensors, tensor=np.zeros(m.forward_shape, np.float32),
                                codec=m.codecs["forward"])


def run_stack(args, bundle, bundle_dir: Path, workdir: Path) -> dict:
    """Start the stack, flood it, measure it; the ``stack`` part of the report."""
    from fogsplit.bench.stack import StackOptions
    from fogsplit.core.dataset import save_replay
    from fogsplit.core.manifest import expect_frames
    from fogsplit.core.topics import Topics
    from fogsplit.export.datasets import load_data

    m = bundle.manifest
    devices = m.sensor_names[: args.devices] if args.devices else m.sensor_names
    data = load_data(args.data)
    replays = {d: save_replay(data, d, workdir / "replays" / f"{d}.npz") for d in devices}
    fleet = f"fuzz{os.getpid() % 100000}"
    options = StackOptions(bundle=bundle_dir, replays=replays, workdir=workdir / "stack", broker_kind=args.broker,
                           rate=args.rate, fleet=fleet, cell="cell0", allow_unsigned=args.allow_unsigned,
                           trusted_keys=[Path(k) for k in args.trusted_key], collector="transport",
                           gateway={"stats_period_s": 2.0, "discovery": False,
                                    **({"cache": {"max_entries": 256}} if args.caches else {})})
    device_settings = {"stats_period_s": 2.0, **({"cache": {"max_entries": 64}} if args.caches else {})}
    stack = make_stack(options, device_settings=device_settings, cloud_settings={"stats_period_s": 2.0})
    topics = Topics(fleet)
    ctx = context_of(m, topics, "cell0", rate=args.rate)
    probe_cell = "fuzzprobe"
    out: dict = {"broker": args.broker, "devices": devices, "rate": args.rate}
    print(f"starting the stack: {args.broker}, cloud0, gateway, {len(devices)} devices at {args.rate:g} events/s",
          flush=True)
    with stack:
        # The stack's own application logs a traceback for each forged result it cannot parse
        # (bench/stack.py parse_arrival): not a tier's failure, and not ours to count.
        logging.getLogger("fogsplit.core.mqtt").setLevel(logging.CRITICAL)
        watcher = Watcher(stack.url, topics, "cell0", ctx, devices, probe_cell)
        watcher.expect = expect_frames(m)
        watcher.start()
        captured = capture_frames(stack.url, topics, args.capture_s)
        seeds = bundle_seeds(bundle, topics, "cell0", rate=args.rate) + captured
        kinds = [k for k in args.kinds if any(s.kind == k for s in seeds)]
        mutator = Mutator(seeds, ctx, seed=args.seed, kinds=kinds, spoof=not args.no_spoof,
                          max_bytes=args.max_bytes)
        extra = hypothesis_batch(seeds, ctx, int(args.frames * args.hypothesis), seed=args.seed, kinds=kinds)
        time.sleep(max(0.0, args.warmup_s - args.capture_s))
        rss_before = stack.rss()
        logs_before = log_sizes(stack)
        wire_before = stack.bytes_by_process()
        refused_before = watcher.refused()
        flooder = Flooder(stack.url, f"{fleet}-fuzzer")
        by_kind: collections.Counter = collections.Counter()
        by_family: collections.Counter = collections.Counter()
        dead_during: dict[str, float] = {}
        fuzz_bytes = 0
        print(f"flooding {args.frames} frames at {args.flood_rate or 'full'} frames/s "
              f"({len(extra)} from Hypothesis) on {', '.join(kinds)}", flush=True)
        t_flood = time.time()
        started = time.perf_counter()
        for i, frame in enumerate(frame_stream(mutator, extra, args.frames, seed=args.seed)):
            watcher.forge(frame)
            if flooder.publish(frame):
                fuzz_bytes += len(frame.payload) + len(frame.topic)
                by_kind[frame.kind] += 1
                by_family[frame.mutation.split(":")[0]] += 1
            _pace(i + 1, started, args.flood_rate)
            if i % 2000 == 1999:
                while flooder.backlog() > 5000:
                    time.sleep(0.01)
                for name in stack.dead():
                    dead_during.setdefault(name, time.time() - t_flood)
                if i % 20000 == 19999:
                    print(f"  {i + 1} frames in {time.perf_counter() - started:.0f} s", flush=True)
        while flooder.backlog() and time.perf_counter() - started < args.frames / 100 + 60:
            time.sleep(0.05)
        t_end = time.time()
        flood_s = t_end - t_flood
        print(f"flood done in {flood_s:.1f} s; settling {args.settle_s:g} s", flush=True)
        time.sleep(args.settle_s)
        # -- after the flood: is every tier alive and answering? ------------------------------
        t_post = time.time()
        probes = list(range(10**15, 10**15 + 3))
        for event in probes:
            flooder.publish(Fuzzed("forward", topics.forward(probe_cell), probe_forward(ctx, bundle, event), "probe"))
        time.sleep(args.post_s)
        t_check = time.time()
        rss_after = stack.rss()
        logs_after = log_sizes(stack)
        wire_after = stack.bytes_by_process()
        flooder.close()
        refused_after = watcher.refused()
        with watcher.lock:
            results = {e: list(r) for e, r in watcher.results.items()}
            captured_events = {e: (at, set(ds)) for e, (at, ds) in watcher.captured.items()}
            last_scores = dict(watcher.last_scores)
            probe_answers = dict(watcher.probe)
            stats_at = dict(watcher.stats_at)
        dead = stack.dead()
        n = len(devices)
        post_events = [e for e, (at, _) in captured_events.items() if t_post <= at < t_check - 2.0]
        post_answered = [e for e in post_events if e in results]
        full = [e for e in post_answered if any(len(b.get("devices") or ()) >= n for _, b in results[e])]
        unresponsive = {}
        if "gateway" not in dead and not post_answered:
            unresponsive["gateway"] = f"no result for the {len(post_events)} events captured after the flood"
        for d in devices:
            if d in dead:
                continue
            in_results = any(d in (b.get("devices") or ()) for e in post_answered for _, b in results[e])
            if last_scores.get(d, 0) < t_post or not in_results:
                unresponsive[d] = "no scores since the flood" if last_scores.get(d, 0) < t_post else \
                    "its scores are in no result since the flood"
        for w in stack.workers:
            if w not in dead and not probe_answers:
                unresponsive[w] = "no answer to a probe forward"
        for name in stack.tiers:
            tier = "gateway" if name == "gateway" else "cloud" if name in stack.workers else "device"
            if name not in dead and name not in unresponsive and stats_at.get(f"{tier}:{name if tier != 'gateway' else 'gw0'}", 0) < t_post:
                unresponsive[name] = "no stats since the flood"
        # -- real events during the flood -----------------------------------------------------
        during = [e for e, (at, _) in captured_events.items() if t_flood <= at <= t_end]
        lost = sorted(e for e in during if e not in results)
        answered = [e for e in during if e in results]
        duplicates = sum(len(results[e]) > 1 for e in answered)
        premature = sum(any(isinstance(b.get("latency_ms"), (int, float)) and b["latency_ms"] < 0
                            for _, b in results[e]) for e in answered)
        partial = sum(min(len(b.get("devices") or ()) for _, b in results[e]) < len(captured_events[e][1])
                      for e in answered)
        lost_notices = sum(all(b.get("exit") == "lost" for _, b in results[e]) for e in answered)
        exceptions = {}
        for name, p in stack.procs.items():
            if name == "broker":
                continue
            found = log_exceptions(_read_from(p.log_path, logs_before.get(name, 0)))
            if found:
                exceptions[name] = dict(found.most_common(20))
        errors = watcher.errors_between(t_flood, t_post)
        refused = {k: refused_after.get(k, 0) - refused_before.get(k, 0) for k in refused_after}
        stats_now = dict(watcher.stats)
        watcher.close()
    tiers = [t for t in rss_before if t != "broker"]
    out.update({
        "frames": sum(by_kind.values()), "frames_failed": flooder.failed, "flood_s": round(flood_s, 1),
        "flood_rate": round(sum(by_kind.values()) / flood_s) if flood_s else None,
        "crashes": len(set(dead) | set(unresponsive)), "dead": sorted(set(dead) | set(dead_during)),
        "unresponsive": unresponsive,
        "refused": sum(refused.values()), "refused_by_tier": refused,
        "real_events": len(during), "real_lost": len(lost), "real_lost_events": lost[:50],
        "real_duplicates": duplicates, "real_premature": premature, "real_partial": partial,
        "real_lost_notices": lost_notices,
        "post_flood": {"events": len(post_events), "answered": len(post_answered), "with_every_device": len(full),
                       "probe_answers": len(probe_answers)},
        "rss_mb_before": {t: rss_before[t] for t in tiers}, "rss_mb_after": {t: rss_after.get(t) for t in tiers},
        "rss_growth": {t: (round(rss_after[t] / rss_before[t] - 1, 4) if rss_before.get(t) and rss_after.get(t)
                           else None) for t in tiers},
        "error_reports": errors, "error_ratio": round(errors / max(1, sum(by_kind.values())), 5),
        "log_bytes": {t: logs_after.get(t, 0) - logs_before.get(t, 0) for t in [*tiers, "broker"]},
        "exceptions": exceptions, "exceptions_total": sum(sum(v.values()) for v in exceptions.values()),
        # what the tiers put on the wire from the flood's start to the liveness check, against the
        # flood's own bytes: a tier that answers a small frame with many is an amplifier
        "fuzz_bytes": fuzz_bytes,
        "upstream_bytes": {t: wire_after.get(t, {}).get("up", 0) - wire_before.get(t, {}).get("up", 0) for t in tiers},
        "amplification": round(sum(wire_after.get(t, {}).get("up", 0) - wire_before.get(t, {}).get("up", 0)
                                   for t in tiers) / max(1, fuzz_bytes), 3),
        "inbox_dropped": {k: v.get("inbox_dropped") for k, v in stats_now.items()},
        "by_kind": dict(by_kind), "by_family": dict(by_family), "hypothesis_frames": len(extra),
        "captured_seeds": len(captured), "seeds": len(seeds),
        "logs": {name: str(p.log_path) for name, p in stack.procs.items()},
    })
    return out


# -- the command ---------------------------------------------------------------------------------

def format_table(report: dict) -> str:
    lines = []
    st = report.get("stack")
    if st:
        lines += [
            f"fuzz: {st['frames']} frames in {st['flood_s']} s ({st['flood_rate']} frames/s) at "
            f"{len(st['by_kind'])} input topics, {st['real_events']} real events at the same time",
            f"  crashes           {st['crashes']}  (dead {st['dead'] or 'none'}, "
            f"not answering {sorted(st['unresponsive']) or 'none'})",
            f"  refused           {st['refused']}  {st['refused_by_tier']}",
            f"  real events       {st['real_events']}, lost {st['real_lost']}, duplicated {st['real_duplicates']}, "
            f"answered before capture {st['real_premature']}, with fewer devices {st['real_partial']}",
            f"  after the flood   {st['post_flood']}",
            f"  error reports     {st['error_reports']} ({st['error_ratio']:.4f} per frame)",
            f"  wire              the tiers sent {sum(st['upstream_bytes'].values())} bytes for the flood's "
            f"{st['fuzz_bytes']} (x{st['amplification']})",
            "  tier          RSS before  after  growth   log bytes  tracebacks  bytes sent",
        ]
        for t in st["rss_growth"]:
            g = st["rss_growth"][t]
            lines.append(f"  {t:<12} {st['rss_mb_before'][t] or 0:>9.1f} {st['rss_mb_after'][t] or 0:>6.1f} "
                         f"{'' if g is None else f'{g:+.1%}':>7} {st['log_bytes'].get(t, 0):>11} "
                         f"{sum(st['exceptions'].get(t, {}).values()):>11} {st['upstream_bytes'].get(t, 0):>11}")
        for t, found in st["exceptions"].items():
            for sig, count in list(found.items())[:5]:
                lines.append(f"    {t}: {count} x {sig}")
    ip = report.get("inprocess")
    if ip and "error" in ip:
        lines.append(f"in process: failed: {ip['error']}")
    elif ip:
        lines.append(f"in process: {ip['frames']} frames in {ip['seconds']} s, {ip['crashes']} crashes of "
                     f"{ip['crash_kinds']} kinds")
        for row in ip["crash_list"]:
            lines.append(f"  {row['count']:>6} x {row['signature']}  [{row['tier']} {row['handler']}, "
                         f"{row['kind']} {row['mutation']}]")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fogsplit bench fuzz", description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=10_000, help="frames to publish at the stack (default 10000)")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    parser.add_argument("--bundle", type=Path, help="an exported bundle (default: export a small one)")
    parser.add_argument("--trusted-key", action="append", default=[], help="public key the bundle is signed with")
    parser.add_argument("--broker", choices=("mosquitto", "embedded"), default="mosquitto")
    parser.add_argument("--devices", type=int, help="run only the first N sensors' agents (default: all)")
    parser.add_argument("--data", default="images", help="what the devices replay (default images)")
    parser.add_argument("--rate", type=float, default=10.0, help="real events per second (default 10)")
    parser.add_argument("--flood-rate", type=float, default=1000.0,
                        help="fuzzed frames per second, 0: as fast as possible (default 1000)")
    parser.add_argument("--hypothesis", type=float, default=0.05,
                        help="share of the frames drawn by Hypothesis, the rest by the seeded mutator (default 0.05)")
    parser.add_argument("--kinds", default=",".join(INPUT_KINDS),
                        help="input kinds to fuzz, comma-separated (default: every input topic; add raw, fog_*)")
    parser.add_argument("--no-spoof", action="store_true",
                        help="never name a real device in a device topic (robustness without impersonation)")
    parser.add_argument("--no-caches", dest="caches", action="store_false",
                        help="run without the gateway's and devices' caches (they subscribe results and commands)")
    parser.add_argument("--max-bytes", type=int, default=4096, help="cap of a mutated frame (default 4096)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup-s", type=float, default=8.0, help="streaming before the flood (default 8)")
    parser.add_argument("--capture-s", type=float, default=4.0, help="seconds of real frames captured as seeds")
    parser.add_argument("--settle-s", type=float, default=10.0, help="wait after the flood (default 10)")
    parser.add_argument("--post-s", type=float, default=8.0, help="liveness window after settling (default 8)")
    parser.add_argument("--inprocess-frames", type=int,
                        help="frames for the in-process part (default: as many as --frames, at most 20000)")
    parser.add_argument("--inprocess-only", action="store_true", help="skip the stack (no broker needed)")
    parser.add_argument("--stack-only", action="store_true", help="skip the in-process part")
    parser.add_argument("--allow-unsigned", action="store_true", help="accept an unsigned bundle (default when "
                        "the bench exports its own)")
    parser.add_argument("--workdir", type=Path, help="keep the stack's configs and logs here (default: a temp dir)")
    args = parser.parse_args(argv)
    args.kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from fogsplit.core.manifest import load_bundle
    from fogsplit.core.topics import Topics

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fogsplit-fuzz-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        bundle_dir = args.bundle
        if bundle_dir is None:
            from fogsplit.bench.stack import small_bundle
            bundle_dir = small_bundle(workdir / "bundle")
            args.allow_unsigned = True
        bundle = load_bundle(bundle_dir, trusted_keys=[Path(k) for k in args.trusted_key],
                             allow_unsigned=args.allow_unsigned)
        report: dict = {"bundle": str(bundle_dir), "model": bundle.manifest.model_id, "seed": args.seed}
        if not args.inprocess_only:
            report["stack"] = run_stack(args, bundle, bundle_dir, workdir)
            _headline(report)
            write_json(args.json, report, "stack results")      # kept if the in-process part fails
        if not args.stack_only:
            topics = Topics("fuzzinproc")
            ctx = context_of(bundle.manifest, topics, "cell0", rate=args.rate)
            seeds = bundle_seeds(bundle, topics, "cell0", rate=args.rate)
            kinds = [k for k in args.kinds if any(s.kind == k for s in seeds)]
            frames = args.inprocess_frames if args.inprocess_frames is not None else min(args.frames, 20_000)
            print(f"in process: {frames} frames", flush=True)
            try:
                report["inprocess"] = run_inprocess(bundle, seeds, ctx, frames=frames, seed=args.seed,
                                                    hypothesis_share=args.hypothesis, kinds=kinds, rate=args.rate,
                                                    spoof=not args.no_spoof)
            except Exception as exc:  # noqa: BLE001 - the tree is edited while we run: keep the stack's figures
                report["inprocess"] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    _headline(report)
    report["seconds"] = round(time.perf_counter() - started, 1)
    print(format_table(report))
    write_json(args.json, report, "results")
    return 0


def _headline(report: dict) -> None:
    """The figures of issue 11 part 8 at the top level of the report."""
    st = report.get("stack", {})
    for key in ("frames", "crashes", "refused", "real_events", "real_lost", "rss_growth", "error_reports",
                "error_ratio", "log_bytes"):
        if key in st:
            report[key] = st[key]
    if "stack" not in report and "frames" in report.get("inprocess", {}):
        report["frames"] = report["inprocess"]["frames"]
    report["inprocess_crashes"] = report.get("inprocess", {}).get("crashes")


if __name__ == "__main__":
    raise SystemExit(main())
