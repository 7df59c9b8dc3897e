"""Load: the highest event rate one gateway holds, against the bare ceiling of its broker.

    fogsplit bench load [--bundle DIR] [--replays DIR] [--devices 6] [--source synthetic|devices]
                        [--p99-ms 1000] [--window-s 15] [--start-rate 50] [--rates R,...] [--json F]

A cell runs as real processes (fogsplit.bench.stack): a broker, a cloud worker and the gateway,
each a ``fogsplit ... --config FILE`` process, connected straight to the broker (``--proxies``
puts the stack's per-process TCP relays back, which run in this process and cost CPU at high
rates). Its devices are either:

- ``synthetic`` (the default): ONE process publishing, for every device of the cell over that
  device's own MQTT connection (client id, retained status with its model and rate, will,
  topic aliases: what ``fogsplit device`` does), real scores frames: the device shards of the
  bundle are run once on the device's replay samples and their outputs encoded with the
  bundle's codecs (``core.frames.encode_slot_frame``), and slot ``n`` is published at
  ``n / rate`` seconds since the epoch. It answers the gateway's feature requests from the
  same outputs and keeps every event until the gateway acks it, replaying what is not acked
  as ``late`` frames as the device spool does (``--no-spool``: send once). No shard runs, so
  what is measured is the gateway and the broker, not six onnxruntime processes sharing
  the cores with them;
- ``devices``: the real ``fogsplit device`` agents, one process per device.

Every rate is a fresh cell (new processes, new journal, new spools): ``--warmup-s`` after its
first result, a window of ``--window-s`` seconds, then ``--settle-s`` more for its events'
answers. An event of the window is a slot published in it (synthetic: the publisher reports
the slots it had to skip, which are left out and make the step invalid; devices: every slot).
Per step: ``captured``, ``results`` (events with an answer), ``lost`` (events with no message
at all: silence), ``lost_notices`` (events answered only by an explicit ``lost`` notice),
``shed`` (answers whose ``reason`` starts with "shed", and the gateway's own ``shed`` counter
from its stats), latency (arrival at an application subscribed to the result topic minus the
result's ``captured``) and the CPU each process used over the window. A rate is *held* when
nothing is lost, nothing is shed, nothing died, the source kept its schedule, and p99 latency
is under ``--p99-ms``. The search doubles from ``--start-rate`` until a rate is not held, then
bisects to ``--tolerance``; ``max_rate`` is the highest rate held.

In the same run, on a broker of the same kind and configuration (bench.stack's):

- ``bare_ceiling``: the highest rate of bare "events" that a paho publisher (a process of its
  own) and a paho subscriber (this process) pass end to end without loss, one event being the
  cell's traffic with nothing computed: one scores-sized QoS 0 message per device (MQTT 5
  topic aliases, as the devices) and one result-sized QoS 1 message, each of the byte size
  the real frames and results have; searched as the cell's rate is;
- ``bare_rtt_ms_p50``: a paho client publishes a scores-sized QoS 0 message, a second client
  echoes it as a result-sized QoS 1 message, the first receives it: the two broker hops of a
  local exit (device -> gateway -> application) with nothing computed, at 20 messages/s;
- ``local_latency_ms_p50``: the median latency of the cell's local exits at ``--latency-rate``.

Then ``overload``: the cell at twice ``max_rate`` for a window, then SIGTERM to the gateway,
timed (``sigterm_s``; killed after ``--sigterm-timeout``), then the drain: the gateway is
started again (same journal), the devices stop capturing, and the bench waits (at most
``--drain-s``) until every event of the window has a message: answered live (``live_latency_ms``),
answered late from a spool (the events the devices held back, as the busy gateway asked, and
the frames it shed), or reported lost. ``graceful``: live p99 within ``--p99-ms``, no event of
the window silent or answered twice after the drain, SIGTERM obeyed, nothing died
(docs/reliability.md, "Overload"). ``--profile`` records the gateway
with py-spy over the overload window (``pip install py-spy``) and lists where its time goes,
twice: ``all`` (every thread not idle; a thread waiting for the GIL is counted where it waits)
and ``gil`` (only the thread holding the GIL: where the interpreter's one core goes).

``cpu``: user+system time of each process over the top window (``/proc/<pid>/stat``), in cores
(1.0 = one core busy), its share of what the bench's processes used, the gateway's threads,
and the machine's busy cores from ``/proc/stat`` (other people's processes included: on a
shared machine they compete for the same cores).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, OrderedDict, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from fogsplit.bench.embedded import free_port, mosquitto_binary, wait_for_port
from fogsplit.bench.flags import positive
from fogsplit.bench.report import timed_main
from fogsplit.bench.stack import BROKER_KINDS, Arrival, Proc, Stack, StackOptions, broker_process, make_replays, \
    rss_mib, small_bundle
from fogsplit.core.mqtt import MqttTransport, parse_broker_url, wait_until
from fogsplit.core.topics import Topics
from fogsplit.device.agent import REPLAY_PERIOD_S           # the synthetic devices replay as the agents do
from fogsplit.device.logic import KEEP_FOR_S, REPLAY_BATCH
from fogsplit.device.spool import MAX_REOFFER_S

log = logging.getLogger(__name__)

CELL = "cell0"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PUBLISHER = "from fogsplit.bench.load import publisher_main; import sys; sys.exit(publisher_main(sys.argv[1:]))"
BARE_PUBLISHER = ("from fogsplit.bench.load import bare_publisher_main; import sys; "
                  "sys.exit(bare_publisher_main(sys.argv[1:]))")
MAX_UNACKED = 100_000      # the synthetic spool's bound (events)
SCAN_UNACKED = 4096        # events looked at per replay tick


# -- CPU and memory of processes ---------------------------------------------------------------

def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process so far (fields 14 and 15 of /proc/<pid>/stat); None once gone."""
    return _stat_cpu(Path(f"/proc/{pid}/stat"))


def _stat_cpu(path: Path) -> float | None:
    try:
        stat = path.read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def thread_seconds(pid: int) -> dict[int, float]:
    """CPU seconds of each thread of a process, by thread id."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        cpu = _stat_cpu(Path(f"/proc/{pid}/task/{tid}/stat"))
        if cpu is not None:
            out[int(tid)] = cpu
    return out


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all cores so far, from the first line of /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    total = sum(values[:8])
    return total - idle, total


class CpuSampler:
    """CPU each named process used between :meth:`start` and :meth:`stop`; ``threads_of``: the
    processes whose threads are listed too."""

    def __init__(self, pids: dict[str, int], threads_of: tuple[str, ...] = ("gateway",)) -> None:
        self.pids = {name: pid for name, pid in pids.items() if pid is not None}
        self.threads_of = threads_of

    def start(self) -> "CpuSampler":
        self.t0 = time.monotonic()
        self.cpu0 = {n: cpu_seconds(p) for n, p in self.pids.items()}
        self.threads0 = {n: thread_seconds(self.pids[n]) for n in self.threads_of if n in self.pids}
        self.machine0 = machine_busy()
        return self

    def stop(self) -> dict:
        wall = time.monotonic() - self.t0
        busy1, total1 = machine_busy()
        processes = {}
        for name, pid in self.pids.items():
            before, after = self.cpu0.get(name), cpu_seconds(pid)
            if before is None or after is None:
                continue
            processes[name] = {"cpu_s": round(after - before, 2), "cores": round((after - before) / wall, 3)}
        ours = sum(p["cpu_s"] for p in processes.values())
        for p in processes.values():
            p["share"] = round(p["cpu_s"] / ours, 3) if ours else None
        for name, before in self.threads0.items():
            after = thread_seconds(self.pids[name])
            used = sorted(((after[t] - before.get(t, 0.0)) / wall for t in after), reverse=True)
            if name in processes:
                processes[name]["threads_cores"] = [round(u, 3) for u in used if u >= 0.005][:8]
        ncpu = os.cpu_count() or 1
        busy = (busy1 - self.machine0[0]) / CLK_TCK / wall
        total_cores = (total1 - self.machine0[1]) / CLK_TCK / wall
        return {"window_s": round(wall, 2), "processes": processes, "bench_cores": round(ours / wall, 3),
                "machine": {"cpus": ncpu, "busy_cores": round(busy, 3),
                            "others_cores": round(max(0.0, busy - ours / wall), 3),
                            "seen_cores": round(total_cores, 2), "loadavg": _loadavg()}}


def _loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def bottleneck(cpu: dict, rate: float | None = None) -> str:
    """Where the time went in a window, in one sentence, from a :class:`CpuSampler` report."""
    processes = {n: p for n, p in (cpu.get("processes") or {}).items() if n != "bench"}
    if not processes:
        return "no CPU figures"
    top = max(processes, key=lambda n: processes[n]["cores"])
    p = processes[top]
    machine = cpu["machine"]
    parts = [f"{top} is the busiest process: {p['cores']:.2f} cores"
             + (f", {1000 * p['cores'] / rate:.2f} ms of CPU per event" if rate else "")
             + f" ({100 * (p['share'] or 0):.0f}% of the bench's CPU)"]
    if rate:
        parts.append("the others per event: " + ", ".join(
            f"{n} {1000 * q['cores'] / rate:.2f} ms" for n, q in sorted(processes.items(), key=lambda kv: -kv[1]["cores"])
            if n != top))
    threads = p.get("threads_cores") or []
    if threads:
        parts.append(f"its threads {' + '.join(f'{t:.2f}' for t in threads[:3])} cores")
    parts.append(f"the machine's {machine['cpus']} cores were {machine['busy_cores']:.2f} busy "
                 f"({machine['others_cores']:.2f} by processes outside the bench)")
    if machine["busy_cores"] >= 0.9 * machine["cpus"]:
        parts.append("so the cores are saturated: every process waits for CPU")
    elif threads and sum(threads[:2]) >= 0.8:
        parts.append(f"so {top}'s Python threads are near one core between them: GIL-bound, more cores would not "
                     "help it")
    return "; ".join(parts)


# -- the synthetic devices (a process of its own) ------------------------------------------------

def _device_outputs(bundle, replays: dict[str, Path], samples: int) -> dict[str, tuple[list[bytes], list[bytes]]]:
    """Per device: its shard's scores and feature on its first ``samples`` replay samples, each
    encoded as the device encodes them for the wire; checked against encode_slot_frame."""
    import msgpack

    from fogsplit.core.codecs import encode_tensor
    from fogsplit.core.dataset import load_sensor
    from fogsplit.core.frames import SCORES, encode_slot_frame, frame_tag
    from fogsplit.core.runner import ShardRunner
    from fogsplit.device.logic import run_device_shard
    m = bundle.manifest
    codecs, tag = m.codecs, frame_tag(m.model_id)
    out = {}
    for device, replay in replays.items():
        runner = ShardRunner(bundle.shard_path(m.device_shard(device)))
        scores_b, feature_b = [], []
        for i, sample in enumerate(load_sensor(replay, device)[:samples]):
            scores, feature = run_device_shard(runner, sample)
            s = encode_tensor(scores, codecs["scores"])
            if i == 0 and msgpack.packb([tag, 7, s], use_bin_type=True) != encode_slot_frame(
                    SCORES, model=m.model_id, event=7, tensor=scores, codec=codecs["scores"]):
                raise RuntimeError("the synthetic scores frame differs from core.frames.encode_slot_frame's")
            scores_b.append(s)
            feature_b.append(encode_tensor(feature, codecs["feature"]))
        out[device] = (scores_b, feature_b)
    return out


class DeviceLink:
    """One synthetic device's MQTT connection: a bare paho client with the agent's client id, its
    retained status (online on every connect, offline as the will), and topic aliases for its
    QoS 0 frames (MQTT 5), without fogsplit's transport around it (its per-packet accounting
    would make the synthetic devices, not the gateway, what limits the rate)."""

    def __init__(self, url: str, client_id: str, status_topic: str, online: Callable[[], bytes], offline: bytes,
                 *, mqtt5: bool) -> None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties
        self.Properties, self.PacketTypes = Properties, PacketTypes
        self.url, self.mqtt5 = url, mqtt5
        self.client = _paho(client_id, mqtt5)
        self.client.will_set(status_topic, offline, qos=1, retain=True)
        self.status_topic, self.online, self.offline = status_topic, online, offline
        self.subscriptions: list[tuple[str, Callable]] = []
        self.aliases: dict[str, tuple[int, object]] = {}     # topic -> (alias, properties)
        self.announced: set[str] = set()                      # aliased topics sent once in full on this connection
        self.alias_max = 0
        self.connected = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *a, **k: self.connected.clear()

    def subscribe(self, topic: str, handler: Callable) -> None:
        self.subscriptions.append((topic, handler))
        self.client.message_callback_add(topic, lambda _c, _u, msg: handler(msg))

    def _on_connect(self, client, _userdata, _flags, reason_code, properties=None) -> None:
        if getattr(reason_code, "is_failure", False):
            return
        self.alias_max = int(getattr(properties, "TopicAliasMaximum", 0) or 0) if self.mqtt5 else 0
        self.announced.clear()
        client.publish(self.status_topic, self.online(), qos=1, retain=True)
        for topic, _ in self.subscriptions:
            client.subscribe(topic, qos=0)
        self.connected.set()

    def connect(self, timeout: float = 30.0) -> None:
        target = parse_broker_url(self.url)
        self.client.connect(target.host, target.port, keepalive=15)
        self.client.loop_start()
        if not self.connected.wait(timeout):
            raise ConnectionError(f"{self.url} did not accept a synthetic device within {timeout}s")

    def publish0(self, topic: str, payload: bytes) -> None:
        """QoS 0 under a topic alias when the broker grants one (the topic in full the first time)."""
        alias = self.aliases.get(topic)
        if alias is None and len(self.aliases) < self.alias_max:
            props = self.Properties(self.PacketTypes.PUBLISH)
            props.TopicAlias = len(self.aliases) + 1
            alias = self.aliases[topic] = (props.TopicAlias, props)
        if alias is None or alias[0] > self.alias_max:
            self.client.publish(topic, payload, qos=0)
        elif topic in self.announced:
            self.client.publish("", payload, qos=0, properties=alias[1])
        else:
            self.client.publish(topic, payload, qos=0, properties=alias[1])
            self.announced.add(topic)

    def publish1(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain)

    def close(self) -> None:
        info = self.client.publish(self.status_topic, self.offline, qos=1, retain=True)
        try:
            info.wait_for_publish(5)
        except (RuntimeError, ValueError):
            pass
        self.client.disconnect()
        self.client.loop_stop()


class SyntheticDevices:
    """The devices of one cell in one process: pre-encoded scores at the cell's slot rate, feature
    requests answered, a spool of unacked events replayed as late frames (see the module doc)."""

    def __init__(self, url: str, topics: Topics, cell: str, bundle, outputs: dict, *, rate: float,
                 spool: bool = True, reoffer_s: float = 3.0, feature_ttl_s: float = 10.0, mqtt5: bool = True) -> None:
        import msgpack

        from fogsplit.core.frames import frame_tag
        from fogsplit.core.manifest import expect_frames
        from fogsplit.core.service import status_payload
        self.packb = lambda body: msgpack.packb(body, use_bin_type=True)
        self.topics, self.cell, self.rate = topics, cell, rate
        self.model = bundle.manifest.model_id
        self.tag = frame_tag(self.model)
        self.expect = expect_frames(bundle.manifest)
        self.outputs = outputs
        self.devices = list(outputs)
        self.samples = min(len(s) for s, _ in outputs.values())
        self.spool, self.reoffer_s, self.feature_ttl_s = spool, reoffer_s, feature_ttl_s
        self.lock = threading.Lock()
        self.unacked: OrderedDict[int, list] = OrderedDict()    # event -> [captured, offers, next_offer]
        self.last_ack: float | None = None
        self.keep, self.keep_until, self.hold_until = 1, 0.0, 0.0    # a busy gateway's word, as DeviceLogic's
        self.capturing = threading.Event()
        self.capturing.set()             # cleared (SIGUSR1): no new slots, the spool still replays
        self.latest = -1
        self.stats = Counter()
        self.skipped_ranges: list[list[int]] = []
        self.lags: list[float] = []
        self.first_slot: int | None = None
        self.stop_flag = threading.Event()
        self.links: dict[str, DeviceLink] = {}
        identity = {"model": self.model, "policy": "request", "rate": rate}
        for i, device in enumerate(self.devices):
            link = DeviceLink(url, f"{topics.fleet}-{cell}-{device}", topics.device_status(cell, device),
                              lambda: status_payload("online", **identity), status_payload("offline", **identity),
                              mqtt5=mqtt5)
            link.subscribe(topics.request(cell), lambda msg, d=device: self._on_request(d, msg))
            if spool:
                link.subscribe(topics.ack(cell), self._on_ack if i == 0 else (lambda msg: None))
            self.links[device] = link
        self.scores_topics = {d: topics.scores(cell, d) for d in self.devices}

    def connect(self) -> None:
        for link in self.links.values():
            link.connect()

    def close(self) -> None:
        for link in self.links.values():
            link.close()

    # -- the gateway's messages (on the network threads) --------------------------------------
    def _on_request(self, device: str, msg) -> None:
        from fogsplit.core.frames import GONE, FrameError, decode_frame, encode_events_frame, unwrap_slot
        try:
            frame = decode_frame(bytes(msg.payload), "request", self.expect, topic=msg.topic)
        except FrameError:
            self.stats["bad_requests"] += 1
            return
        if device not in frame.devices:
            return
        link, latest = self.links[device], self.latest
        keep = self.feature_ttl_s * self.rate
        gone = []
        for slot in frame.events:
            event = unwrap_slot(slot, latest)
            if event > latest or latest - event > keep:
                gone.append(event)
                continue
            feature = self.outputs[device][1][event % self.samples]
            link.publish0(self.topics.feature(self.cell, device), self.packb([self.tag, slot, feature]))
            self.stats["features"] += 1
        if gone:
            self.stats["gone"] += len(gone)
            link.publish0(self.topics.feature(self.cell, device),
                          encode_events_frame(GONE, model=self.model, events=gone))

    def _on_ack(self, msg) -> None:
        from fogsplit.core.frames import FrameError, decode_frame
        try:
            frame = decode_frame(bytes(msg.payload), "ack", self.expect, topic=msg.topic)
        except FrameError:
            self.stats["bad_acks"] += 1
            return
        now = time.time()
        if frame.busy:
            self.hold_until = now + self.reoffer_s
        self.keep, self.keep_until = (frame.keep if frame.busy else 1), now + KEEP_FOR_S
        with self.lock:
            removed = sum(self.unacked.pop(e, None) is not None for e in frame.events)
        if removed:
            self.stats["acked"] += removed
            self.last_ack = now

    # -- the capture schedule (this thread) ---------------------------------------------------
    def run(self, stats_file: Path | None = None) -> None:
        rate = self.rate
        slot = math.ceil(time.time() * rate)
        self.first_slot = slot
        next_replay = time.monotonic() + REPLAY_PERIOD_S
        next_stats = time.monotonic()
        while not self.stop_flag.is_set():
            if not self.capturing.is_set():
                self.stop_flag.wait(REPLAY_PERIOD_S)
                if self.spool:
                    self._replay(time.time())
                if stats_file is not None:
                    self.write_stats(stats_file)
                continue
            due = slot / rate
            delay = due - time.time()
            if delay > 0:
                self.stop_flag.wait(delay)
                continue
            if -delay > max(1.0, 2 / rate):         # as ReplaySource: skip ahead, never burst
                now_slot = math.floor(time.time() * rate)
                self.stats["skipped"] += now_slot - slot
                if len(self.skipped_ranges) < 1000:
                    self.skipped_ranges.append([slot, now_slot])
                slot = now_slot
                continue
            self._publish_slot(slot, due)
            if len(self.lags) < 200_000:
                self.lags.append(-delay)
            slot += 1
            mono = time.monotonic()
            if self.spool and mono >= next_replay:
                next_replay = mono + REPLAY_PERIOD_S
                self._replay(time.time())
            if stats_file is not None and mono >= next_stats:
                next_stats = mono + 1.0
                self.write_stats(stats_file)
        if stats_file is not None:
            self.write_stats(stats_file)

    def _publish_slot(self, slot: int, captured: float) -> None:
        index = slot % self.samples
        slot16 = slot % 65536
        keep = self.keep if self.spool and time.time() < self.keep_until else 1
        if keep > 1 and slot % keep:
            self.stats["held_back"] += 1           # a busy gateway asked for 1 slot in keep: the spool has it
        else:
            for device, link in self.links.items():
                link.publish0(self.scores_topics[device],
                              self.packb([self.tag, slot16, self.outputs[device][0][index]]))
        self.latest = slot
        self.stats["slots"] += 1
        if self.spool:
            with self.lock:
                self.unacked[slot] = [captured, 0, captured + self.reoffer_s]
                while len(self.unacked) > MAX_UNACKED:
                    self.unacked.popitem(last=False)
                    self.stats["dropped_full"] += 1

    def _replay(self, now: float) -> None:
        """As Spool.due: what is past its re-offer time, oldest first, as late frames; while no
        ack comes at all, only the oldest (a probe)."""
        from fogsplit.core.frames import encode_late_frame
        if now < self.hold_until:
            return                                 # the gateway is busy
        silent = self.stats["replayed"] > 0 and (self.last_ack is None or now - self.last_ack > self.reoffer_s)
        limit = 1 if silent else REPLAY_BATCH
        due = []
        with self.lock:
            for n, (event, rec) in enumerate(self.unacked.items()):
                if n >= SCAN_UNACKED or rec[0] + self.reoffer_s > now or len(due) >= limit:
                    break
                if rec[2] <= now:
                    due.append((event, rec[0]))
                    rec[1] += 1
                    rec[2] = now + min(self.reoffer_s * 2 ** rec[1], MAX_REOFFER_S)
        for event, captured in due:
            index = event % self.samples
            for device, link in self.links.items():
                scores, features = self.outputs[device]
                link.publish1(self.topics.late(self.cell, device),
                              encode_late_frame(model=self.model, event=event, captured=captured, scores=scores[index],
                                                feature=features[index]))
        self.stats["replayed"] += len(due)

    def snapshot(self) -> dict:
        lags = sorted(self.lags[-20000:])
        with self.lock:
            unacked = len(self.unacked)
        return {"pid": os.getpid(), "time": time.time(), "rate": self.rate, "first_slot": self.first_slot,
                "last_slot": self.latest, **self.stats, "skipped_ranges": self.skipped_ranges[:1000],
                "unacked": unacked, "keep": self.keep, "capturing": self.capturing.is_set(), "lag_ms_p99": round(1000 * lags[int(0.99 * (len(lags) - 1))], 2) if lags else None,
                "lag_ms_max": round(1000 * lags[-1], 2) if lags else None}

    def write_stats(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.snapshot()))
        os.replace(tmp, path)


def publisher_main(argv: list[str] | None = None) -> int:
    """The synthetic devices' process: ``python -c PUBLISHER --url U --bundle B --replays DIR ...``."""
    from fogsplit.core.manifest import load_bundle
    p = argparse.ArgumentParser(prog="fogsplit-load-publisher")
    p.add_argument("--url", required=True)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--replays", type=Path, required=True)
    p.add_argument("--devices", required=True, help="comma list of the cell's devices")
    p.add_argument("--fleet", required=True)
    p.add_argument("--cell", default=CELL)
    p.add_argument("--rate", type=float, required=True)
    p.add_argument("--stats", type=Path, required=True)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--no-spool", action="store_true")
    p.add_argument("--mqtt311", action="store_true", help="speak MQTT 3.1.1 (default: 5 if the broker does)")
    p.add_argument("--trusted-key", type=Path, action="append", default=[])
    p.add_argument("--allow-unsigned", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    devices = args.devices.split(",")
    bundle = load_bundle(args.bundle, shards=None, trusted_keys=args.trusted_key,
                         allow_unsigned=args.allow_unsigned)
    outputs = _device_outputs(bundle, {d: args.replays / f"{d}.npz" for d in devices}, args.samples)
    target = parse_broker_url(args.url)
    wait_for_port(target.host, target.port, timeout=120)
    mqtt5 = not args.mqtt311 and speaks_mqtt5(args.url)
    cell = SyntheticDevices(args.url, Topics(args.fleet), args.cell, bundle, outputs, rate=args.rate,
                            spool=not args.no_spool, mqtt5=mqtt5)
    cell.stop_flag = stop
    signal.signal(signal.SIGUSR1, lambda *_: cell.capturing.clear())     # stop capturing, keep replaying
    cell.connect()
    log.info("synthetic devices %s of %s/%s at %g events/s on %s (MQTT %s)", devices, args.fleet, args.cell,
             args.rate, args.url, "5" if mqtt5 else "3.1.1")
    try:
        cell.run(args.stats)
    finally:
        cell.close()
        log.info("synthetic devices stopping: %s", json.dumps({k: v for k, v in cell.snapshot().items()
                                                               if k != "skipped_ranges"}))
    return 0


@dataclass
class Publisher(Proc):
    """The bench's handle on a synthetic-devices process: a :class:`Proc` that also reads the
    figures the process writes to ``stats_path``."""

    stats_path: Path | None = None

    @classmethod
    def make(cls, url: str, *, bundle: Path, replays: Path, devices: list[str], fleet: str, rate: float,
             workdir: Path, trust: list[str], spool: bool = True, mqtt5: bool = True) -> "Publisher":
        workdir.mkdir(parents=True, exist_ok=True)
        stats = workdir / "publisher.json"
        argv = [sys.executable, "-c", PUBLISHER, "--url", url, "--bundle", str(bundle), "--replays", str(replays),
                "--devices", ",".join(devices), "--fleet", fleet, "--rate", str(rate), "--stats", str(stats),
                *trust, *([] if spool else ["--no-spool"]), *([] if mqtt5 else ["--mqtt311"])]
        return cls("publisher", argv, workdir / "publisher.log", stats_path=stats)

    def start(self) -> "Publisher":
        self.stats_path.unlink(missing_ok=True)
        super().start()
        return self

    def pause(self) -> None:
        """Stop capturing new slots; the synthetic spool goes on replaying what is not acked."""
        if self.alive:
            os.kill(self.pid, signal.SIGUSR1)

    def stats(self) -> dict:
        try:
            return json.loads(self.stats_path.read_text())
        except (OSError, ValueError):
            return {}

    def stop(self) -> dict:
        self.terminate(15.0)
        return self.stats()


# -- the cell under load -------------------------------------------------------------------------

class LoadStack(Stack):
    """bench.stack's Stack, its tiers connected straight to the broker unless ``proxies``: its
    TCP relays run in the bench's process, one recv and one send per packet, which at a few
    thousand packets a second costs the CPU and the latency this bench measures."""

    def __init__(self, options: StackOptions, *, proxies: bool = False) -> None:
        super().__init__(options)
        self.proxies = proxies

    def _add_tier(self, name: str, body: dict[str, Any]) -> None:
        super()._add_tier(name, body)
        proc = self.procs[name]
        if self.proxies or proc.proxy is None:
            return
        if len(proc.argv) < 2 or proc.argv[-2] != "--config":
            raise RuntimeError(f"bench.stack's command for {name} no longer ends with --config FILE: {proc.argv}")
        config = Path(proc.argv[-1])
        text = config.read_text()
        if proc.proxy.url not in text:
            raise RuntimeError(f"bench.stack's config {config} does not name the proxy {proc.proxy.url}")
        config.write_text(text.replace(proc.proxy.url, self.url))
        proc.proxy.close()
        proc.proxy = None


class StatsMonitor:
    """The gateway's and the devices' stats snapshots, as they are published (the last of each)."""

    def __init__(self, url: str, topics: Topics, cell: str) -> None:
        self.latest: dict[str, dict] = {}
        self.first: dict[str, dict] = {}
        self.lock = threading.Lock()
        self.transport = MqttTransport(url, f"{topics.fleet}-load-monitor-{os.getpid()}")
        self.transport.subscribe(topics.gateway_stats(cell, "+"), lambda m: self._take("gateway", m))
        self.transport.subscribe(topics.device_stats(cell, "+"), lambda m: self._take(m.topic.split("/")[-2], m))

    def _take(self, name: str, msg) -> None:
        try:
            body = json.loads(msg.payload)
        except ValueError:
            return
        with self.lock:
            self.latest[name] = body
            self.first.setdefault(name, body)

    def start(self) -> "StatsMonitor":
        self.transport.connect()
        return self

    def snapshot(self) -> dict[str, dict]:
        with self.lock:
            return dict(self.latest)

    def close(self) -> None:
        self.transport.close()


GATEWAY_KEYS = ("events", "shed", "degraded", "inbox_dropped", "refused", "late", "reacked", "requests",
                "forwarded", "cloud_timeouts", "duplicate_answers", "acks_sent")


def _gateway_delta(before: dict | None, after: dict | None) -> dict:
    if not after:
        return {}
    before = before or {}
    out = {k: after.get(k, 0) - before.get(k, 0) for k in GATEWAY_KEYS if isinstance(after.get(k), (int, float))}
    out["open_events"] = after.get("open_events")
    out["admission"] = after.get("admission")
    failed = (after.get("transport") or {}).get("failed_publishes")
    out["transport_failed_publishes"] = None if failed is None else \
        failed - ((before.get("transport") or {}).get("failed_publishes") or 0)
    return out


@dataclass
class Context:
    """What every step shares."""

    bundle: Path
    replays: dict[str, Path]
    workdir: Path
    broker_kind: str
    source: str                    # synthetic | devices
    trusted_keys: list[Path]
    allow_unsigned: bool
    p99_ms: float
    warmup_s: float
    window_s: float
    settle_s: float
    proxies: bool = False
    spool: bool = True
    workers: int = 1
    gateway: dict = field(default_factory=dict)
    steps: int = 0

    @property
    def devices(self) -> list[str]:
        return list(self.replays)

    def trust_flags(self) -> list[str]:
        return [f for k in self.trusted_keys for f in ("--trusted-key", str(k))] + \
            (["--allow-unsigned"] if self.allow_unsigned else [])


@dataclass
class Running:
    """A cell running at one rate: the stack, its synthetic source (if any), and its monitor."""

    stack: LoadStack
    publisher: Publisher | None
    monitor: StatsMonitor
    rate: float

    def pids(self) -> dict[str, int]:
        pids = {name: p.pid for name, p in self.stack.procs.items() if p.alive}
        if self.publisher is not None and self.publisher.alive:
            pids["publisher"] = self.publisher.pid
        pids["bench"] = os.getpid()
        return pids

    def dead(self) -> list[str]:
        dead = self.stack.dead()
        if self.publisher is not None and not self.publisher.alive:
            dead.append("publisher")
        return dead

    def rss(self) -> dict[str, float | None]:
        rss = self.stack.rss()
        if self.publisher is not None:
            rss["publisher"] = rss_mib(self.publisher.pid) if self.publisher.alive else None
        return rss


class Cell:
    """Start a fresh cell at ``rate`` (``with Cell(ctx, rate, tag) as running:``)."""

    def __init__(self, ctx: Context, rate: float, tag: str, *, gateway: dict | None = None) -> None:
        self.ctx, self.rate, self.tag = ctx, rate, tag
        ctx.steps += 1
        fleet = f"load{ctx.steps}"
        synthetic = ctx.source == "synthetic"
        self.options = StackOptions(
            bundle=ctx.bundle, replays={} if synthetic else dict(ctx.replays),
            workdir=ctx.workdir / f"{ctx.steps:02d}-{tag}", broker_kind=ctx.broker_kind, workers=ctx.workers,
            rate=rate, fleet=fleet, cell=CELL, trusted_keys=list(ctx.trusted_keys), allow_unsigned=ctx.allow_unsigned,
            gateway={"stats_period_s": 1.0, **ctx.gateway, **(gateway or {})}, collector="transport")
        self.running: Running | None = None

    def __enter__(self) -> Running:
        ctx = self.ctx
        stack = LoadStack(self.options, proxies=ctx.proxies)
        publisher = None
        if ctx.source == "synthetic":
            replay_dir = {p.parent for p in ctx.replays.values()}
            if len(replay_dir) != 1 or any(p.name != f"{d}.npz" for d, p in ctx.replays.items()):
                raise ValueError("the synthetic devices read <dir>/<device>.npz: give the replays in one folder")
            publisher = Publisher.make(stack.url, bundle=ctx.bundle, replays=replay_dir.pop(), devices=ctx.devices,
                                       fleet=self.options.fleet, rate=self.rate,
                                       workdir=self.options.workdir / "publisher", trust=ctx.trust_flags(),
                                       spool=ctx.spool).start()
        try:
            stack.start()
            monitor = StatsMonitor(stack.url, stack.topics, CELL).start()
        except BaseException:
            if publisher is not None:
                publisher.stop()
                log.error("publisher log:\n%s", publisher.log_tail())
            stack.close()
            raise
        self.running = Running(stack, publisher, monitor, self.rate)
        return self.running

    def __exit__(self, *exc: object) -> None:
        r = self.running
        if r is None:
            return
        r.monitor.close()
        if r.publisher is not None:
            r.publisher.stop()
        r.stack.close()


def window_events(rate: float, t0: float, t1: float, skipped: list[list[int]] | None = None) -> list[int]:
    """The slots captured in [t0, t1) at ``rate``, less those the source skipped."""
    first, stop = math.ceil(t0 * rate), math.ceil(t1 * rate)
    out = set(range(first, stop))
    for a, b in skipped or ():
        out.difference_update(range(max(a, first), min(b, stop)))
    return sorted(out)


def tally(arrivals: list[Arrival], events: list[int]) -> dict:
    """What an application got for ``events``: per event its first answer (not a ``lost`` notice)."""
    wanted = set(events)
    by_event: dict[int, list[Arrival]] = defaultdict(list)
    for a in arrivals:
        if a.event in wanted:
            by_event[a.event].append(a)
    answers = {}
    for e, xs in by_event.items():
        real = [a for a in xs if not a.lost]
        if real:
            answers[e] = min(real, key=lambda a: a.at)
    notices = [e for e in by_event if e not in answers]
    lat = [1000 * (a.at - a.captured) for a in answers.values() if a.captured is not None]
    live = [1000 * (a.at - a.captured) for a in answers.values() if a.captured is not None and not a.late]
    # of a live answer's latency, the part after the gateway answered: publishing, the broker, the application
    delivery = [1000 * (a.at - a.captured) - a.answer_ms for a in answers.values()
                if a.captured is not None and not a.late and a.answer_ms is not None]
    local = [1000 * (a.at - a.captured) for a in answers.values()
             if a.captured is not None and a.exit == "local" and a.reason is None]
    return {
        "captured": len(events), "results": len(answers), "lost": len(wanted) - len(by_event),
        "lost_notices": len(notices),
        "lost_reasons": dict(Counter(by_event[e][0].reason or "?" for e in notices)),
        "duplicates": sum(len(xs) - 1 for xs in by_event.values()),
        "shed": sum(1 for a in answers.values() if (a.reason or "").startswith("shed")),
        "degraded_reasons": dict(Counter(a.reason for a in answers.values() if a.reason)),
        "exits": dict(Counter(a.exit or "?" for a in answers.values())),
        "late": sum(1 for a in answers.values() if a.late),
        "latency_ms": percentiles(lat), "live_latency_ms": percentiles(live),
        "live_delivery_ms": percentiles(delivery), "local_latency_ms": percentiles(local),
    }


def percentiles(values: list[float], qs=(50, 95, 99)) -> dict[str, float | None]:
    if not values:
        return {**{f"p{q}": None for q in qs}, "max": None, "n": 0}
    arr = np.asarray(values)
    return {**{f"p{q}": round(float(np.percentile(arr, q)), 1) for q in qs}, "max": round(float(arr.max()), 1),
            "n": len(values)}


def measure_window(running: Running, ctx: Context, *, profile: Path | None = None,
                   after: Callable[[Running, list[int]], dict] | None = None) -> dict:
    """Warm up, sample one window of the running cell, wait for its answers; the step's row."""
    time.sleep(ctx.warmup_s)
    stack, rate = running.stack, running.rate
    sampler = CpuSampler(running.pids(), threads_of=("gateway", "publisher", "bench")).start()
    gw0 = running.monitor.snapshot().get("gateway")
    spy = start_profile(stack.procs["gateway"].pid, ctx.window_s, profile) if profile is not None else []
    t0 = time.time()
    time.sleep(ctx.window_s)
    t1 = time.time()
    cpu = sampler.stop()
    gw_t1 = running.monitor.snapshot().get("gateway")
    time.sleep(ctx.settle_s)
    src = running.publisher.stats() if running.publisher is not None else {}
    devices = running.monitor.snapshot()
    gw1 = devices.pop("gateway", None)
    arrivals = stack.collector.log.arrivals()
    events = window_events(rate, t0, t1, src.get("skipped_ranges"))
    row = {"rate": rate, "window_s": round(t1 - t0, 2), **tally(arrivals, events)}
    first = max(src.get("first_slot") or 0, math.ceil((stack.started_at or t0) * rate))
    whole = tally(arrivals, window_events(rate, first / rate, t1, src.get("skipped_ranges")))
    row["whole_run"] = {k: whole[k] for k in ("captured", "results", "lost", "lost_notices", "shed", "duplicates",
                                               "latency_ms")}      # from the tiers' start, warm-up included
    row["gateway"] = _gateway_delta(gw0, gw1)
    row["gateway_shed_total"] = (gw1 or {}).get("shed")
    # the gateway's own view: answer time minus capture time, over its newest local exits
    row["gateway_local_latency_ms"] = ((gw1 or {}).get("latency_ms") or {}).get("local")
    row["source"] = _source_row(src, devices, running.monitor)
    row["cpu"] = cpu
    gw_cores = cpu["processes"].get("gateway", {}).get("cores")
    answered = (gw_t1 or {}).get("events", 0) - (gw0 or {}).get("events", 0)     # stats come every second
    row["gateway_cpu_ms_per_event"] = round(1000 * gw_cores * cpu["window_s"] / answered, 3) \
        if gw_cores is not None and answered else None
    row["rss_mb"] = running.rss()
    row["died"] = running.dead()
    if profile is not None:
        row["profile"] = finish_profile(spy)
    if after is not None:
        row.update(after(running, events))
    if row["died"]:
        log.warning("died on their own: %s\n%s", row["died"], stack.report_dead())
    return row


def _source_row(src: dict, devices: dict[str, dict], monitor: StatsMonitor) -> dict:
    if src:
        keys = ("slots", "skipped", "lag_ms_p99", "lag_ms_max", "features", "gone", "replayed", "acked", "unacked",
                "dropped_full", "held_back", "keep")
        return {"kind": "synthetic", **{k: src.get(k, 0) for k in keys}}
    first = monitor.first
    out = {"kind": "devices", "dropped_captures": 0, "skipped_slots": 0, "inbox_dropped": 0, "cpu_percent": {}}
    for name, body in devices.items():
        for key in ("dropped_captures", "skipped_slots", "inbox_dropped"):
            out[key] += body.get(key, 0) - first.get(name, {}).get(key, 0)
        out["cpu_percent"][name] = body.get("cpu_percent")
    return out


def judge(row: dict, p99_ms: float) -> dict:
    """Whether the step's rate was held, and if not why."""
    why = []
    if row["captured"] == 0:
        why.append("no events")
    if row["lost"]:
        why.append(f"{row['lost']} lost")
    if row["lost_notices"]:
        why.append(f"{row['lost_notices']} lost notices")
    shed = max(row["shed"], (row.get("gateway") or {}).get("shed", 0) or 0)
    if shed:
        why.append(f"{shed} shed")
    p99 = row["latency_ms"]["p99"]
    if p99 is None or p99 > p99_ms:
        why.append(f"p99 {p99} ms over {p99_ms:g}")
    src = row["source"]
    if src.get("held_back"):
        why.append(f"{src['held_back']} events held back by the devices (the gateway was behind and thinned the stream)")
    if src.get("skipped") or src.get("skipped_slots") or src.get("dropped_captures"):
        why.append("the source fell behind its schedule")
    if row["died"]:
        why.append(f"died: {','.join(row['died'])}")
    return {"holds": not why, "why": why}


def run_step(ctx: Context, rate: float, tag: str = "step", **kw) -> dict:
    log.info("load: %s at %g events/s (%s source, %d devices)", tag, rate, ctx.source, len(ctx.devices))
    with Cell(ctx, rate, tag) as running:
        row = measure_window(running, ctx, **kw)
    row.update(judge(row, ctx.p99_ms))
    log.info("load: %g events/s %s: lost %d, shed %d, p99 %s ms, gateway %.2f cores%s", rate,
             "held" if row["holds"] else "NOT held", row["lost"], row["shed"], row["latency_ms"]["p99"],
             row["cpu"]["processes"].get("gateway", {}).get("cores", float("nan")),
             "" if row["holds"] else f" ({'; '.join(row['why'])})")
    return row


def search(ctx: Context, *, start: float, ceiling: float, tolerance: float, max_steps: int,
           rates: list[float] | None = None) -> tuple[float | None, list[dict]]:
    """Double from ``start`` until a rate is not held, then bisect between the highest held and
    the lowest not held until they are within ``tolerance``; or try exactly ``rates``."""
    steps: list[dict] = []

    def held(rate: float) -> bool:
        steps.append(run_step(ctx, round(rate, 1)))
        return steps[-1]["holds"]

    if rates:
        for rate in rates:
            held(rate)
        good = [s["rate"] for s in steps if s["holds"]]
        return (max(good) if good else None), steps
    good, _ = double_then_bisect(held, start=start, ceiling=ceiling, tolerance=tolerance,
                                 tries=lambda: len(steps) < max_steps)
    return (round(good, 1) if good is not None else None), steps


def double_then_bisect(held: Callable[[float], bool], *, start: float, ceiling: float, tolerance: float,
                       tries: Callable[[], bool]) -> tuple[float | None, float | None]:
    """The highest rate ``held`` says is held: double from ``start`` (up to ``ceiling``) until
    one is not, then bisect until the highest held and the lowest not held are within
    ``tolerance`` of each other, while ``tries()`` allows. Returns (highest held, lowest not)."""
    good, bad, rate = None, None, start
    while tries():
        if held(rate):
            good = rate
            if rate >= ceiling:
                break
            rate = min(rate * 2, ceiling)
        else:
            bad = rate
            break
    while bad is not None and tries() and (good is None or bad / good > 1 + tolerance) and (good or bad > 1):
        rate = (good + bad) / 2 if good is not None else bad / 2
        if held(rate):
            good = rate
        else:
            bad = rate
    return good, bad


# -- profile (py-spy) ------------------------------------------------------------------------------

def py_spy() -> str | None:
    for candidate in (Path(sys.executable).parent / "py-spy", Path("/usr/local/bin/py-spy")):
        if candidate.exists():
            return str(candidate)
    return None


def start_profile(pid: int, seconds: float, out: Path) -> list[tuple[str, subprocess.Popen, Path]]:
    """py-spy on ``pid`` for ``seconds``, twice at once: every thread that is not idle (``all``:
    a thread waiting for the GIL is counted where it waits), and only the thread holding the
    GIL (``gil``: where the interpreter's one core goes)."""
    spy = py_spy()
    if spy is None:
        log.warning("no py-spy here (pip install py-spy): no profile")
        return []
    out.parent.mkdir(parents=True, exist_ok=True)
    runs = []
    for mode, extra in (("all", []), ("gil", ["--gil"])):
        path = out.with_name(f"{out.stem}.{mode}{out.suffix}")
        runs.append((mode, subprocess.Popen(
            [spy, "record", "--pid", str(pid), "--duration", str(max(1, int(seconds))), "--rate", "100",
             "--format", "raw", "--threads", "--nonblocking", *extra, "--output", str(path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True), path))
    return runs


def finish_profile(runs: list[tuple[str, subprocess.Popen, Path]], top: int = 25) -> dict:
    if not runs:
        return {"error": "py-spy is not installed (pip install py-spy)"}
    out = {}
    for mode, spy, path in runs:
        try:
            _, err = spy.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            spy.kill()
            out[mode] = {"error": "py-spy did not finish"}
            continue
        if spy.returncode != 0 or not path.exists():
            out[mode] = {"error": f"py-spy failed ({spy.returncode}): {err.strip()[-500:]}"}
            continue
        out[mode] = summarize_profile(path.read_text(), top=top) | {"file": str(path)}
    return out


WRAPPERS = ("Thread.run ", "Thread._bootstrap ", "Thread._bootstrap_inner ")
# Leaf frames that wait rather than work: the service's inbox, paho's select() (its own time in
# Client._loop), sleeps and joins. Counted as ``waiting``, left out of ``own``.
WAITING = ("Condition.wait ", "Event.wait ", "Client._loop ", "Thread.join ", "_wait_for_tstate_lock ")


def summarize_profile(text: str, top: int = 15) -> dict:
    """Top functions of py-spy's raw (collapsed) stacks: by own samples (working: a leaf that
    waits counts as ``waiting``) and by samples they were on the stack for, each as a share of
    all samples; and the share of each thread (by name)."""
    own: Counter = Counter()
    waiting = 0
    inclusive: Counter = Counter()
    threads: Counter = Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        heads = [f for f in frames if f.startswith(("thread ", "process "))]
        frames = [f for f in frames if not f.startswith(("thread ", "process ")) and not f.startswith(WRAPPERS)]
        thread = next((h for h in heads if h.startswith("thread ")), "thread ?")
        threads[thread.split(": ", 1)[-1] if ": " in thread else thread] += n
        total += n
        if not frames:
            continue
        if frames[-1].startswith(WAITING):
            waiting += n
        else:
            own[_short(frames[-1])] += n
        for f in {_short(f) for f in frames}:
            inclusive[f] += n
    share = lambda c: [[name, round(v / total, 3)] for name, v in c.most_common(top)]  # noqa: E731
    return {"samples": total, "waiting": round(waiting / total, 3) if total else None, "own": share(own),
            "inclusive": share(inclusive), "threads": share(threads)}


def _short(frame: str) -> str:
    """``fn (path/to/file.py:12)`` -> ``fn (file.py:12)``."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit('/', 1)[-1]}" if where else name


# -- the bare broker -------------------------------------------------------------------------------

def frame_sizes(bundle: Path, replays: dict[str, Path], trust: dict) -> dict[str, int]:
    """Bytes of a real scores frame and of a real result JSON of this bundle."""
    from fogsplit.core.manifest import load_bundle
    from fogsplit.core.results import make_result
    b = load_bundle(bundle, shards=None, **trust)
    outputs = _device_outputs(b, dict(list(replays.items())[:1]), 1)
    scores = next(iter(outputs.values()))[0][0]
    import msgpack

    from fogsplit.core.frames import frame_tag
    scores_frame = msgpack.packb([frame_tag(b.manifest.model_id), 40000, scores], use_bin_type=True)
    m = b.manifest
    now = time.time()
    result = make_result(np.linspace(0, 1, m.num_classes).astype(np.float32), event=int(now * 100), exit="local",
                         classes=m.classes, devices=list(replays), captured=now - 0.01, model=m.model_id, now=now)
    return {"scores": len(scores_frame), "result": len(result.to_json())}


def _paho(client_id: str, mqtt5: bool = True):
    """A bare paho client: MQTT 5 (Mosquitto), or 3.1.1 for a broker that speaks only that (rumqttd)."""
    import paho.mqtt.client as paho
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=paho.MQTTv5 if mqtt5 else paho.MQTTv311)
    client.max_queued_messages_set(10000)
    client.max_inflight_messages_set(100)       # as fogsplit's transport (core/mqtt.py)
    return client


def speaks_mqtt5(url: str, timeout: float = 5.0) -> bool:
    """Whether the broker accepts an MQTT 5 CONNECT (Mosquitto; rumqttd when configured for it);
    else the bare clients speak 3.1.1, as fogsplit's transport falls back to."""
    client = _paho(f"bare-probe-{os.getpid()}-{time.monotonic_ns()}", True)
    try:
        _connect(client, url, timeout)
        return True
    except (ConnectionError, OSError):
        return False
    finally:
        client.disconnect()
        client.loop_stop()


def _connect(client, url: str, timeout: float = 10.0) -> None:
    target = parse_broker_url(url)
    ready = threading.Event()

    def on_connect(_c, _u, _flags, reason_code, *_rest) -> None:
        if not getattr(reason_code, "is_failure", False):
            ready.set()
    client.on_connect = on_connect
    client.connect(target.host, target.port, keepalive=30)
    client.loop_start()
    if not ready.wait(timeout):
        raise ConnectionError(f"{url} did not accept a bare client within {timeout}s")


def bare_publisher_main(argv: list[str] | None = None) -> int:
    """A bare publisher: per event, one scores-sized QoS 0 message for each of ``--device-ids``
    (topic aliases) and, with ``--results``, one result-sized QoS 1 message, at ``rate`` events/s
    for ``seconds``; prints what it sent and the CPU it used."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties
    p = argparse.ArgumentParser(prog="fogsplit-load-bare")
    for name in ("--url", "--prefix", "--device-ids"):
        p.add_argument(name, required=True)
    for name in ("--scores-bytes", "--result-bytes"):
        p.add_argument(name, type=int, required=True)
    p.add_argument("--results", action="store_true")
    p.add_argument("--mqtt311", action="store_true", help="MQTT 3.1.1: full topics, no aliases")
    p.add_argument("--rate", type=float, required=True)
    p.add_argument("--seconds", type=float, required=True)
    args = p.parse_args(argv)
    ids = [int(i) for i in args.device_ids.split(",") if i]
    client = _paho(f"bare-pub-{os.getpid()}", mqtt5=not args.mqtt311)
    _connect(client, args.url)
    topics, props = [], []
    for n, i in enumerate(ids):
        topics.append(f"{args.prefix}/device/cam{i}/scores")
        pr = None
        if not args.mqtt311:
            pr = Properties(PacketTypes.PUBLISH)
            pr.TopicAlias = n + 1
        props.append(pr)
    scores = b"s" * args.scores_bytes
    result = b"r" * args.result_bytes
    result_topic = f"{args.prefix}/result"
    cpu0 = os.times()
    start = time.time()
    slot = math.ceil(start * args.rate)
    end_slot = slot + int(args.seconds * args.rate)
    sent, failed, lag_max, first = 0, 0, 0.0, True
    last = None
    while slot < end_slot:
        delay = slot / args.rate - time.time()
        if delay > 0:
            time.sleep(delay)
        else:
            lag_max = max(lag_max, -delay)
        for n in range(len(ids)):
            info = client.publish(topics[n] if first or args.mqtt311 else "", scores, qos=0, properties=props[n])
            failed += info.rc != 0
        first = False
        if args.results:
            last = client.publish(result_topic, result, qos=1)
            failed += last.rc != 0
        sent += 1
        slot += 1
    elapsed = time.time() - start
    if last is not None:
        try:
            last.wait_for_publish(30)
        except (RuntimeError, ValueError):
            pass
    time.sleep(0.2)
    cpu1 = os.times()
    client.disconnect()
    client.loop_stop()
    print(json.dumps({"events": sent, "devices": len(ids), "results": sent if args.results else 0, "failed": failed,
                      "lag_max_s": round(lag_max, 3), "elapsed_s": round(elapsed, 3),
                      "cores": round((cpu1.user + cpu1.system - cpu0.user - cpu0.system) / max(elapsed, 1e-3), 3)}),
          flush=True)
    return 0


class BareSubscriber:
    """Counts what arrives on a bare prefix: scores (QoS 0) and results (QoS 1)."""

    def __init__(self, url: str, prefix: str, mqtt5: bool = True) -> None:
        self.counts = Counter()
        self.client = _paho(f"bare-sub-{os.getpid()}-{time.monotonic_ns()}", mqtt5)
        self.prefix = prefix
        subscribed = threading.Event()

        def on_connect(client, *_a, **_k):
            client.subscribe([(f"{prefix}/device/+/scores", 0), (f"{prefix}/result", 1)])

        def on_message(_c, _u, msg):
            self.counts["result" if msg.topic.endswith("/result") else "scores"] += 1

        self.client.on_message = on_message
        self.client.on_subscribe = lambda *a, **k: subscribed.set()
        target = parse_broker_url(url)
        self.client.on_connect = on_connect
        self.client.connect(target.host, target.port, keepalive=30)
        self.client.loop_start()
        if not subscribed.wait(10):
            raise ConnectionError(f"{url}: the bare subscriber was not subscribed within 10s")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def bare_trial(url: str, rate: float, *, devices: int, sizes: dict, seconds: float, n: int,
               publishers: int = 2, mqtt5: bool = True) -> dict:
    """One bare run at ``rate`` events/s: ``publishers`` processes share the devices' topics (the
    first also publishes the results); what was sent, what arrived, what each used."""
    prefix = f"bare/t{n}"
    sub = BareSubscriber(url, prefix, mqtt5)
    groups = [list(range(devices))[i::publishers] for i in range(min(publishers, devices))]
    cpu0 = cpu_seconds(os.getpid())
    started = time.monotonic()
    try:
        procs = [subprocess.Popen([sys.executable, "-c", BARE_PUBLISHER, "--url", url, "--prefix", prefix,
                                   "--device-ids", ",".join(map(str, ids)), "--scores-bytes", str(sizes["scores"]),
                                   "--result-bytes", str(sizes["result"]), "--rate", str(rate), "--seconds",
                                   str(seconds), *(["--results"] if i == 0 else []),
                                   *([] if mqtt5 else ["--mqtt311"])],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for i, ids in enumerate(groups)]
        sent = []
        for proc in procs:
            out, err = proc.communicate(timeout=seconds + 120)
            if proc.returncode != 0:
                raise RuntimeError(f"a bare publisher failed: {err[-2000:]}")
            sent.append(json.loads(out.strip().splitlines()[-1]))
        expect = {"scores": sum(s["events"] * s["devices"] for s in sent), "result": sum(s["results"] for s in sent)}
        wait_until(lambda: sub.counts["scores"] >= expect["scores"] and sub.counts["result"] >= expect["result"],
                   timeout=5, interval=0.05)
        got = dict(sub.counts)
        bench_cores = (cpu_seconds(os.getpid()) - cpu0) / (time.monotonic() - started)
    finally:
        sub.close()
    lost = {k: expect[k] - got.get(k, 0) for k in expect}
    lag = max(s["lag_max_s"] for s in sent)
    failed = sum(s["failed"] for s in sent)
    # kept up: every publisher sent its events at 95% of the rate or better, on average (a stall
    # of the shared machine that it caught up from does not void the trial: it offered a burst)
    achieved = min(s["events"] / max(s["elapsed_s"], 1e-3) for s in sent)
    kept_up = achieved >= 0.95 * rate and failed == 0
    return {"rate": rate, "events": sent[0]["events"], "msgs_per_s": round(rate * (devices + 1), 1),
            "lost_scores": lost["scores"], "lost_results": lost["result"], "publisher_lag_max_s": lag,
            "achieved_rate": round(achieved, 1),
            "publisher_failed": failed, "holds": kept_up and lost["scores"] <= 0 and lost["result"] <= 0,
            "publisher_kept_up": kept_up, "publishers": len(groups),
            "cores": {"publishers": [s["cores"] for s in sent], "subscriber_process": round(bench_cores, 3)}}


def bare_ceiling(url: str, *, devices: int, sizes: dict, seconds: float, start: float, ceiling: float,
                 tolerance: float, max_trials: int, publishers: int = 2, mqtt5: bool = True) -> dict:
    """The highest bare event rate passed without loss: doubling, then bisecting."""
    trials: list[dict] = []

    def held(rate: float) -> bool:
        trials.append(bare_trial(url, round(rate, 1), devices=devices, sizes=sizes, seconds=seconds, n=len(trials),
                                 publishers=publishers, mqtt5=mqtt5))
        log.info("bare: %g events/s (%g msgs/s): %s", rate, rate * (devices + 1),
                 "passed" if trials[-1]["holds"] else f"lost {trials[-1]['lost_scores']} scores, "
                 f"{trials[-1]['lost_results']} results, publisher lag {trials[-1]['publisher_lag_max_s']}s")
        return trials[-1]["holds"]

    good, bad = double_then_bisect(held, start=start, ceiling=ceiling, tolerance=tolerance,
                                   tries=lambda: len(trials) < max_trials)
    first_bad = next((t for t in trials if not t["holds"] and t["rate"] == bad), None)
    limited_by = None
    if first_bad is not None:
        limited_by = (
            "the publisher's QoS 1 queue: paho refused publishes (10000 queued behind 100 in flight, each "
            "waiting for its PUBACK)" if first_bad["publisher_failed"] else
            "the Python publishers (they fell behind their schedule)" if not first_bad["publisher_kept_up"] else
            "loss between the publishers and the subscriber (broker or subscriber)")
    return {"events_per_s": round(good, 1) if good is not None else None,
            "msgs_per_s": round(good * (devices + 1), 1) if good is not None else None,
            "devices": devices, "scores_bytes": sizes["scores"], "result_bytes": sizes["result"],
            "first_not_held": bad, "limited_by": limited_by, "trials": trials}


def bare_rtt(url: str, sizes: dict, *, count: int = 200, rate: float = 20.0, mqtt5: bool = True) -> dict:
    """Round trips: A publishes a scores-sized QoS 0 message, B echoes a result-sized QoS 1 one, A
    receives it; also the one-way time A -> B (same clock: one process)."""
    prefix = f"bare/rtt{time.monotonic_ns()}"
    sent: dict[int, float] = {}
    one_way, rtt = [], []
    lock = threading.Lock()
    a, b = _paho(f"bare-rtt-a-{os.getpid()}", mqtt5), _paho(f"bare-rtt-b-{os.getpid()}", mqtt5)
    subscribed = threading.Semaphore(0)
    a.on_subscribe = b.on_subscribe = lambda *x, **k: subscribed.release()
    pad_scores = max(0, sizes["scores"] - 8)
    pad_result = max(0, sizes["result"] - 8)

    def on_b(client, _u, msg):
        seq = int.from_bytes(msg.payload[:8], "big")
        with lock:
            if seq in sent:
                one_way.append(1000 * (time.perf_counter() - sent[seq]))
        client.publish(f"{prefix}/result", msg.payload[:8] + b"r" * pad_result, qos=1)

    def on_a(_c, _u, msg):
        seq = int.from_bytes(msg.payload[:8], "big")
        with lock:
            if seq in sent:
                rtt.append(1000 * (time.perf_counter() - sent[seq]))

    a.on_message, b.on_message = on_a, on_b
    _connect(a, url)
    _connect(b, url)
    try:
        a.subscribe(f"{prefix}/result", qos=1)
        b.subscribe(f"{prefix}/scores", qos=0)
        subscribed.acquire(timeout=10)
        subscribed.acquire(timeout=10)
        time.sleep(0.2)
        for seq in range(count):
            with lock:
                sent[seq] = time.perf_counter()
            a.publish(f"{prefix}/scores", seq.to_bytes(8, "big") + b"s" * pad_scores, qos=0)
            time.sleep(1 / rate)
        wait_until(lambda: len(rtt) >= count, timeout=5)
    finally:
        for c in (a, b):
            c.disconnect()
            c.loop_stop()
    return {"rtt_ms": percentiles(rtt), "one_way_ms": percentiles(one_way), "sent": count, "rate": rate}


class BareBroker:
    """A broker of the stack's kind and configuration on a free port, for the bare measurements."""

    def __init__(self, kind: str, workdir: Path) -> None:
        self.port = free_port()
        self.proc = broker_process(kind, self.port, workdir)
        self.url = f"mqtt://127.0.0.1:{self.port}"

    def __enter__(self) -> "BareBroker":
        self.proc.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()


def measure_bare(ctx: Context, sizes: dict, args) -> tuple[dict, dict]:
    with BareBroker(ctx.broker_kind, ctx.workdir / "bare-broker") as broker:
        mqtt5 = speaks_mqtt5(broker.url)      # else 3.1.1: full topics, as the tiers fall back to
        rtt = bare_rtt(broker.url, sizes, count=args.rtt_count, mqtt5=mqtt5)
        ceiling = bare_ceiling(broker.url, devices=len(ctx.devices), sizes=sizes, seconds=args.bare_seconds,
                               start=args.bare_start_rate, ceiling=args.max_rate * 4, tolerance=args.tolerance,
                               max_trials=args.bare_trials, publishers=args.bare_publishers, mqtt5=mqtt5)
    ceiling["mqtt"] = "5" if mqtt5 else "3.1.1"
    return ceiling, rtt


# -- the whole run ---------------------------------------------------------------------------------

def make_context(args, workdir: Path) -> Context:
    bundle = args.bundle or small_bundle(workdir / "bundle", args.data)
    replays = replay_files(args.replays, args.data, args.devices, workdir / "replays")
    trusted = list(args.trusted_key)
    sensors = _bundle_sensors(bundle)
    if len(replays) < len(sensors):
        log.warning("%d of the bundle's %d sensors run: the gateway counts the others online until a status says "
                    "otherwise, so every event waits for its deadline (deadline_ms) and latency is that "
                    "deadline, not the cell's", len(replays), len(sensors))
    gateway = {}
    if args.delivery:
        gateway["delivery"] = args.delivery
    if args.delivery == "lean" and args.source == "devices":
        raise ValueError("--delivery lean with --source devices: the agents would still spool and replay every "
                         "event (bench.stack cannot set the devices' delivery); use the synthetic source")
    return Context(bundle=bundle, replays=replays, workdir=workdir, broker_kind=args.broker, source=args.source,
                   trusted_keys=trusted, allow_unsigned=args.allow_unsigned or not trusted, p99_ms=args.p99_ms,
                   warmup_s=args.warmup_s, window_s=args.window_s,
                   settle_s=args.settle_s or max(3.0, 2 * args.p99_ms / 1000),
                   proxies=args.proxies, spool=not args.no_spool and args.delivery != "lean", workers=args.workers,
                   gateway=gateway)


def _bundle_sensors(bundle: Path) -> list[str]:
    try:
        return [s["name"] for s in json.loads((bundle / "manifest.json").read_text())["sensors"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def replay_files(folder: Path | None, data: str, devices: int, out: Path) -> dict[str, Path]:
    """``<folder>/<sensor>.npz`` of the first ``devices`` sensors, made from ``data`` when no
    folder is given (or it lacks them)."""
    if folder is not None:
        found = sorted(folder.glob("*.npz"), key=lambda p: p.stem)
        if len(found) < devices:
            raise ValueError(f"{folder} holds {len(found)} replay files; --devices {devices} needs that many")
        return {p.stem: p for p in found[:devices]}
    return make_replays(data, devices, out)


def trust_kwargs(ctx: Context) -> dict:
    return {"trusted_keys": list(ctx.trusted_keys), "allow_unsigned": ctx.allow_unsigned}


def sigterm_gateway(running: Running, timeout: float) -> dict:
    """SIGTERM the gateway while the cell streams; how long it took to exit."""
    proc = running.stack.procs["gateway"]
    started = time.monotonic()
    code = proc.terminate(timeout)
    took = time.monotonic() - started
    return {"sigterm_s": round(took, 2), "sigterm_exit": code, "sigterm_killed": took >= timeout,
            "gateway_final": _final_stats(proc.log_path)}


def stop_then_drain(running: Running, events: list[int], *, sigterm_timeout: float, drain_s: float) -> dict:
    """The overload's end: SIGTERM the gateway while the cell still streams at the overload rate
    (timed), start it again (same journal), stop the devices capturing, and wait until every
    event of the window has a message (an answer, live or late, or a lost notice): how long
    that took and what the held-back and shed events got. Only the synthetic source can stop
    capturing; with real agents the drain is skipped."""
    out = sigterm_gateway(running, sigterm_timeout)
    if running.publisher is None:
        return {**out, "drain": None}
    running.stack.restart("gateway")
    running.publisher.pause()
    started = time.time()
    log.info("load: overload over: the gateway restarted, the devices stopped capturing; draining their spools")
    while True:
        got = tally(running.stack.collector.log.arrivals(), events)
        if got["lost"] == 0 or time.time() - started > drain_s or running.dead():
            break
        time.sleep(1.0)
    src = running.publisher.stats()
    return {**out, "drain": {
        "seconds": round(time.time() - started, 1), "timed_out": got["lost"] > 0, "captured": got["captured"],
        "results": got["results"], "late": got["late"], "lost_notices": got["lost_notices"], "silent": got["lost"],
        "duplicates": got["duplicates"], "latency_ms": got["latency_ms"], "held_back": src.get("held_back", 0),
        "replayed": src.get("replayed", 0), "unacked": src.get("unacked")}}


def judge_overload(row: dict, p99_ms: float) -> dict:
    """Overload is graceful when the events answered live stay within the latency bound, every
    event of the window is answered or reported lost once the gateway caught up (none silent,
    none twice), the gateway stopped on SIGTERM and nothing died."""
    why = []
    p99 = row["live_latency_ms"]["p99"]
    if p99 is None or p99 > p99_ms:
        why.append(f"live p99 {p99} ms over {p99_ms:g}")
    drain = row.get("drain")
    if drain is None:
        why.append("no drain (the real device agents cannot stop capturing)")
    elif drain["silent"] or drain["duplicates"]:
        why.append(f"after {drain['seconds']} s of drain: {drain['silent']} events silent, "
                   f"{drain['duplicates']} answered twice")
    if row.get("sigterm_killed"):
        why.append("the gateway ignored SIGTERM")
    if row["died"]:
        why.append(f"died: {','.join(row['died'])}")
    return {"graceful": not why, "why_not_graceful": why}


def _final_stats(log_path: Path) -> dict | None:
    """The stats JSON the gateway logs when it stops ("stopping; {...}")."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        if "stopping; {" in line:
            try:
                body = json.loads(line.split("stopping; ", 1)[1])
            except ValueError:
                return None
            keep = ("events", "exits", "shed", "degraded", "inbox_dropped", "refused", "late", "reacked",
                    "open_events", "journal", "latency_ms", "transport")
            return {k: body.get(k) for k in keep}
    return None


def log_sizes(running: Running) -> dict[str, int]:
    sizes = {}
    for name, proc in running.stack.procs.items():
        try:
            sizes[name] = proc.log_path.stat().st_size
        except OSError:
            pass
    return sizes


def run(args) -> dict:
    with tempfile.TemporaryDirectory(prefix="fogsplit-load-") as tmp:
        workdir = args.workdir or Path(tmp)
        ctx = make_context(args, workdir)
        sizes = frame_sizes(ctx.bundle, ctx.replays, trust_kwargs(ctx))
        bare, rtt = measure_bare(ctx, sizes, args)
        latency = run_step(ctx, args.latency_rate, "latency")
        max_rate, steps = search(ctx, start=args.start_rate, ceiling=args.max_rate, tolerance=args.tolerance,
                                 max_steps=args.steps, rates=args.rates)
        top = max((s for s in steps if s["holds"]), key=lambda s: s["rate"], default=None)
        over_rate = args.overload_rate or 2 * (max_rate or args.start_rate)
        profile = workdir / "gateway-overload.txt" if args.profile else None
        overload = run_step(ctx, over_rate, "overload", profile=profile,
                            after=lambda r, events: stop_then_drain(r, events, sigterm_timeout=args.sigterm_timeout,
                                                                    drain_s=args.drain_s))
        overload.update(judge_overload(overload, ctx.p99_ms))
    cpu = (top or overload)["cpu"]
    body = {
        "broker": ctx.broker_kind, "source": ctx.source, "devices": len(ctx.devices), "p99_bound_ms": ctx.p99_ms,
        "max_rate": max_rate,
        "bare_ceiling": bare["events_per_s"],
        "ratio_to_bare": round(max_rate / bare["events_per_s"], 3) if max_rate and bare["events_per_s"] else None,
        "local_latency_ms_p50": latency["local_latency_ms"]["p50"],
        "bare_rtt_ms_p50": rtt["rtt_ms"]["p50"],
        "bottleneck": bottleneck(cpu, (top or overload)["rate"])
        + ("" if top else " (the overload window: no rate was held)"),
        "cpu": {"rate": (top or overload)["rate"], **cpu},
        "overload": overload_row(overload),
        "bare": bare, "bare_rtt": rtt, "local_latency": latency,
        "steps": [compact(s) for s in steps],
        "settings": {"window_s": ctx.window_s, "warmup_s": ctx.warmup_s, "settle_s": ctx.settle_s,
                     "latency_rate": args.latency_rate, "proxies": ctx.proxies, "spool": ctx.spool,
                     "workers": ctx.workers, "bundle": str(ctx.bundle), "frame_bytes": sizes,
                     "gateway": ctx.gateway, "tolerance": args.tolerance},
    }
    if max_rate is None:
        body["note"] = "no rate was held: see steps[].why"
    return body


def overload_row(row: dict) -> dict:
    keys = ("rate", "captured", "results", "lost", "lost_notices", "lost_reasons", "duplicates", "shed",
            "gateway_shed_total", "gateway_local_latency_ms", "gateway_cpu_ms_per_event", "degraded_reasons", "exits", "late", "latency_ms", "gateway", "source", "sigterm_s",
            "sigterm_exit", "sigterm_killed", "gateway_final", "died", "rss_mb", "holds", "why", "whole_run",
            "profile", "live_latency_ms", "live_delivery_ms", "drain", "graceful", "why_not_graceful")
    out = {k: row.get(k) for k in keys if k in row}
    out["events"] = row["captured"]
    out["p99_ms"] = row["latency_ms"]["p99"]
    out["cpu_cores"] = {k: v["cores"] for k, v in row["cpu"]["processes"].items()}
    return out


def compact(row: dict) -> dict:
    """A step without the bulky parts (its CPU in cores per process)."""
    out = {k: v for k, v in row.items() if k not in ("cpu", "profile")}
    out["cpu_cores"] = {k: v["cores"] for k, v in row["cpu"]["processes"].items()}
    out["machine_busy_cores"] = row["cpu"]["machine"]["busy_cores"]
    return out


def format_table(result: dict) -> str:
    lines = [f"load on {result['broker']}: one gateway, {result['devices']} {result['source']} devices, "
             f"p99 bound {result['p99_bound_ms']:g} ms"]
    lines.append(f"{'rate/s':>8}  {'held':>4}  {'captured':>8}  {'results':>7}  {'lost':>5}  {'shed':>5}  "
                 f"{'p50 ms':>7}  {'p99 ms':>7}  {'gw cores':>8}  {'busy':>5}  why")
    for s in [*result["steps"], compact_overload(result["overload"])]:
        lat = s["latency_ms"]
        lines.append(f"{s['rate']:>8g}  {'yes' if s.get('holds') else 'no':>4}  {s['captured']:>8}  {s['results']:>7}  "
                     f"{s['lost']:>5}  {s['shed']:>5}  {_num(lat['p50']):>7}  {_num(lat['p99']):>7}  "
                     f"{_num(s['cpu_cores'].get('gateway')):>8}  {_num(s.get('machine_busy_cores')):>5}  "
                     f"{'; '.join(s.get('why') or [])}")
    bare = result["bare"]
    lines.append(f"max_rate {result['max_rate']} events/s; bare ceiling {result['bare_ceiling']} events/s "
                 f"({bare['msgs_per_s']} msgs/s of {bare['scores_bytes']} B QoS 0 x{bare['devices']} + "
                 f"{bare['result_bytes']} B QoS 1; "
                 f"{'limited by ' + bare['limited_by'] if bare['limited_by'] else 'no loss up to the last trial'}); "
                 f"ratio {result['ratio_to_bare']}")
    lines.append(f"local exit latency p50 {result['local_latency_ms_p50']} ms at "
                 f"{result['settings']['latency_rate']:g}/s; bare round trip p50 {result['bare_rtt_ms_p50']} ms")
    o = result["overload"]
    w = o.get("whole_run") or {}
    lines.append(f"overload at {o['rate']:g}/s, its window: {o['events']} events, {o['results']} results, shed "
                 f"{o['shed']}, lost {o['lost']}, notices {o['lost_notices']}, p99 {o['p99_ms']} ms; the whole run: "
                 f"{w.get('captured')} events, {w.get('results')} results, shed {w.get('shed')} (gateway counter "
                 f"{o.get('gateway_shed_total')}), lost {w.get('lost')}; frames dropped at the gateway's inbox "
                 f"{(o.get('gateway') or {}).get('inbox_dropped')}; SIGTERM: exit {o.get('sigterm_exit')} after "
                 f"{o.get('sigterm_s')} s")
    live, d = o.get("live_latency_ms") or {}, o.get("drain") or {}
    lines.append(f"overload: answered live {live.get('n')} (p50 {live.get('p50')} ms, p99 {live.get('p99')} ms), "
                 f"held back by the devices {(o.get('source') or {}).get('held_back')}, gateway keep "
                 f"{((o.get('gateway') or {}).get('admission') or {}).get('keep')}; drain after the gateway's "
                 f"restart: {d.get('seconds')} s, {d.get('results')} of {d.get('captured')} answered "
                 f"({d.get('late')} late), {d.get('lost_notices')} lost notices, {d.get('silent')} silent, "
                 f"{d.get('duplicates')} twice; graceful: {o.get('graceful')} {'; '.join(o.get('why_not_graceful') or [])}")
    lines.append(f"bottleneck: {result['bottleneck']}")
    cpu = result["cpu"]
    lines.append(f"CPU at {cpu['rate']:g}/s (cores): " + ", ".join(
        f"{k} {v['cores']:.2f}" for k, v in sorted(cpu["processes"].items(), key=lambda kv: -kv[1]["cores"])))
    for mode, prof in (o.get("profile") or {}).items():
        if prof.get("own"):
            lines.append(f"gateway profile at overload ({mode}, own time): " + ", ".join(
                f"{n} {100 * s:.0f}%" for n, s in prof["own"][:6]))
    return "\n".join(lines)


def compact_overload(o: dict) -> dict:
    return {**o, "machine_busy_cores": None, "why": ["overload run"] + (o.get("why") or [])}


def _num(v) -> str:
    return "-" if v is None else f"{v:g}" if isinstance(v, (int, float)) else str(v)


def rate_list(text: str) -> list[float]:
    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of rates") from None
    if not rates or any(r <= 0 for r in rates):
        raise argparse.ArgumentTypeError(f"{text!r}: rates are positive numbers")
    return rates


def add_cell_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of a cell that bench load and bench soak share."""
    default_broker = "mosquitto" if mosquitto_binary() else "embedded"
    parser.add_argument("--broker", choices=BROKER_KINDS, default=default_broker,
                        help=f"the broker (default {default_broker}; embedded: rumqttd)")
    parser.add_argument("--devices", type=positive(int), default=6, help="devices of the cell (default 6)")
    parser.add_argument("--workers", type=positive(int), default=1, help="cloud workers (default 1)")
    parser.add_argument("--bundle", type=Path, help="an exported bundle (default: export a small one, ~1 min)")
    parser.add_argument("--replays", type=Path, help="folder of <sensor>.npz replay files (default: made from --data)")
    parser.add_argument("--data", default="images", help="the data set of the bundle and replays (default images)")
    parser.add_argument("--no-spool", action="store_true",
                        help="synthetic devices send each event once (no spool, no late replays)")
    parser.add_argument("--delivery", choices=("reliable", "lean"), help="the gateway's delivery mode")
    parser.add_argument("--proxies", action="store_true",
                        help="tiers through bench.stack's TCP relays (in this process) instead of straight")
    parser.add_argument("--trusted-key", type=Path, action="append", default=[], help="public key of a signed bundle")
    parser.add_argument("--allow-unsigned", action="store_true",
                        help="accept an unsigned bundle (the default when no --trusted-key is given)")
    parser.add_argument("--workdir", type=Path, help="keep configs, state and logs of every process here")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fogsplit bench load", description=__doc__.split("\n")[0])
    parser.add_argument("--source", choices=("synthetic", "devices"), default="synthetic",
                        help="synthetic: one process publishing every device's real frames (default); "
                             "devices: one fogsplit device process each")
    parser.add_argument("--p99-ms", type=positive(float), default=1000.0, help="latency bound of a held rate (1000)")
    parser.add_argument("--start-rate", type=positive(float), default=50.0, help="first rate tried (events/s, 50)")
    parser.add_argument("--max-rate", type=positive(float), default=5000.0, help="highest rate tried (5000)")
    parser.add_argument("--rates", type=rate_list, help="try exactly these rates (comma list) instead of searching")
    parser.add_argument("--tolerance", type=positive(float), default=0.15,
                        help="bisect until the rates held and not held are within this fraction (0.15)")
    parser.add_argument("--steps", type=positive(int), default=8, help="most rates tried by the search (8)")
    parser.add_argument("--window-s", type=positive(float), default=15.0, help="seconds measured per rate (15)")
    parser.add_argument("--warmup-s", type=float, default=3.0, help="seconds from the first result to the window (3)")
    parser.add_argument("--settle-s", type=float, help="seconds for the window's answers (default 2x the bound, >= 3)")
    parser.add_argument("--latency-rate", type=positive(float), default=10.0,
                        help="the low rate of the local-exit latency (10)")
    parser.add_argument("--overload-rate", type=positive(float), help="default: twice max_rate")
    parser.add_argument("--sigterm-timeout", type=positive(float), default=30.0,
                        help="seconds the gateway gets to stop on SIGTERM before it is killed (30)")
    parser.add_argument("--drain-s", type=positive(float), default=300.0,
                        help="most seconds, after the overload, for every event of its window to be answered (300)")
    parser.add_argument("--profile", action="store_true", help="py-spy the gateway over the overload window")
    parser.add_argument("--bare-seconds", type=positive(float), default=5.0, help="seconds per bare trial (5)")
    parser.add_argument("--bare-start-rate", type=positive(float), default=200.0,
                        help="first bare rate tried (events/s, 200)")
    parser.add_argument("--bare-trials", type=positive(int), default=8, help="most bare trials (8)")
    parser.add_argument("--rtt-count", type=positive(int), default=200, help="bare round trips, at 20/s (200)")
    parser.add_argument("--bare-publishers", type=positive(int), default=2,
                        help="bare publisher processes sharing the devices' topics (2)")
    add_cell_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    return timed_main(build_parser().parse_args(argv), run, format_table)


if __name__ == "__main__":
    raise SystemExit(main())
