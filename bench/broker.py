"""Brokers compared on loopback: the evidence behind the embedded broker (docs/broker.md).

    fogsplit bench broker [--brokers mosquitto,rumqttd] [--messages 5000] [--stack-events 240]
                          [--rate 10] [--no-stack] [--json out.json]

Every broker is measured in the same run, so that the ratios hold on a noisy machine:

- ``contract``: what fogsplit's transport asks of a broker, probed with paho: an MQTT 5 CONNACK
  and the topic aliases it grants; a persistent session (clean start off, session expiry 300 s)
  given the QoS 1 messages published while it was away; a shared subscription handing each of
  20 messages to exactly one of its two members; a retained message; a last will on a broken
  connection.
- ``throughput``: one publisher, one subscriber on fogsplit's transport, QoS 0 and QoS 1:
  msgs/s and loss.
- ``latency_ms``: one-way latency of 400 QoS 1 messages paced 5 ms apart, p50/p95/p99.
- ``stack``: a small bundle (trained once into ``--workdir``) streamed through six device
  agents, a gateway and a cloud worker at ``--rate`` captures/s: lost, duplicates, latency from
  capture to result (p50/p95/p99), bytes/event on the wire, and the broker's RSS after it.

Brokers: ``mosquitto``; ``rumqttd`` (the embedded default where Mosquitto is missing: MQTT 5);
``rumqttd-3.1.1`` (the same broker and settings with a 3.1.1 listener); ``iotcore-defaults``
(rumqttd as fogsplit started it before: iotcore's defaults, MQTT 3.1.1, no TCP_NODELAY, 20 kB
payloads).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fogsplit.bench.embedded import EmbeddedBroker, free_port, mosquitto_binary, rumqttd_available
from fogsplit.bench.flags import positive
from fogsplit.bench.report import timed_main
from fogsplit.core.mqtt import MqttTransport, parse_broker_url, wait_until

log = logging.getLogger(__name__)

BROKERS = ("mosquitto", "rumqttd", "rumqttd-3.1.1", "iotcore-defaults")
LATENCY_MESSAGES = 400
LATENCY_GAP_S = 0.005
# The stack's bundle: small enough to train in about a minute on two cores.
STACK_TRAIN_EVENTS = 1200
STACK_EPOCHS = 6


# -- the brokers -------------------------------------------------------------------------------
@contextlib.contextmanager
def started(name: str) -> Iterator[tuple[str, int | None]]:
    """Start broker ``name``; yield its URL and process id (None when not known)."""
    if name == "iotcore-defaults":
        from iotcore import Broker
        port = free_port()
        broker = Broker(port=port, listen="127.0.0.1").start()
        try:
            yield f"mqtt://127.0.0.1:{port}", None
        finally:
            broker.stop()
        return
    kind, _, mqtt = name.partition("-")
    broker = EmbeddedBroker(kind=kind, mqtt=mqtt or "5").start()
    try:
        yield broker.url, broker.pid
    finally:
        broker.stop()


def rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


# -- contract ----------------------------------------------------------------------------------
class _Probe:
    """A paho client (MQTT 5, or 3.1.1 with ``mqtt5=False``) that records its CONNACK and what
    it receives. ``persistent``: clean start off and a session expiry of 300 s (3.1.1: clean
    session off). ``manual_ack``: QoS 1 messages are never acknowledged."""

    def __init__(self, url: str, client_id: str, *, mqtt5: bool = True, persistent: bool = False,
                 will: str | None = None, manual_ack: bool = False) -> None:
        address = parse_broker_url(url)
        self.mqtt5 = mqtt5
        self.messages: list[tuple[str, bytes, bool]] = []
        self.connack: tuple | None = None
        self._connected = threading.Event()
        if mqtt5:
            self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5,
                                      manual_ack=manual_ack)
        else:
            self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id,
                                      protocol=paho.MQTTv311, clean_session=not persistent, manual_ack=manual_ack)
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, bytes(m.payload), bool(m.retain)))
        if will:
            self.client.will_set(will, b"offline", qos=1, retain=True)
        if mqtt5:
            properties = None
            if persistent:
                properties = Properties(PacketTypes.CONNECT)
                properties.SessionExpiryInterval = 300
            self.client.connect(address.host, address.port, keepalive=10, clean_start=not persistent,
                                properties=properties)
        else:
            self.client.connect(address.host, address.port, keepalive=10)
        self.client.loop_start()
        if not self._connected.wait(5) or self.connack[0].is_failure:
            self.client.loop_stop()
            why = f"refused: {self.connack[0]}" if self.connack else "no CONNACK"
            raise ConnectionError(f"{client_id}: {url} {why}")

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connack = (reason_code, flags, properties)
        self._connected.set()

    @property
    def session_present(self) -> bool:
        return bool(self.connack and self.connack[1].session_present)

    @property
    def topic_alias_maximum(self) -> int:
        return int(getattr(self.connack[2], "TopicAliasMaximum", 0) or 0) if self.connack and self.mqtt5 else 0

    def subscribe(self, topic_filter: str) -> None:
        self.client.subscribe(topic_filter, qos=1)
        time.sleep(0.3)      # the SUBACK; this probe does not track packet ids

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False, alias: int = 0) -> None:
        properties = None
        if alias:
            properties = Properties(PacketTypes.PUBLISH)
            properties.TopicAlias = alias
        self.client.publish(topic, payload, qos=qos, retain=retain, properties=properties)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def crash(self) -> None:
        """Drop the connection without a DISCONNECT, as a killed process does."""
        self.client.loop_stop()
        sock = self.client.socket()
        if sock is not None:
            sock.close()


def contract(url: str) -> dict:
    """What fogsplit needs of a broker, each item measured (over MQTT 3.1.1 if the broker
    does not answer an MQTT 5 CONNECT)."""
    tag = f"{time.monotonic_ns() % 10**8}"
    out: dict = {}
    try:
        sub = _Probe(url, f"c-sub-{tag}")
    except ConnectionError:
        sub = _Probe(url, f"c-sub-{tag}", mqtt5=False)
    v5 = sub.mqtt5
    pub = _Probe(url, f"c-pub-{tag}", mqtt5=v5)
    out["mqtt5"] = v5
    out["topic_alias_maximum"] = sub.topic_alias_maximum
    # topic aliases: the first packet names the topic, the next two only the alias
    sub.subscribe(f"alias/{tag}")
    if out["topic_alias_maximum"]:
        for n, topic in enumerate((f"alias/{tag}", "", "")):
            pub.publish(topic, f"a{n}".encode(), qos=0, alias=1)
        wait_until(lambda: len(sub.messages) >= 3, timeout=3)
    out["alias_delivered"] = sum(t == f"alias/{tag}" for t, _, _ in sub.messages)
    # a persistent session away while 5 QoS 1 messages are published
    away = _Probe(url, f"c-away-{tag}", mqtt5=v5, persistent=True)
    away.subscribe(f"queue/{tag}")
    away.close()
    for n in range(5):
        pub.publish(f"queue/{tag}", f"q{n}".encode())
    time.sleep(0.5)
    back = _Probe(url, f"c-away-{tag}", mqtt5=v5, persistent=True)
    wait_until(lambda: len(back.messages) >= 5, timeout=3)
    out["session_present"] = back.session_present
    out["queued_qos1_delivered"] = len(back.messages)
    back.close()
    # a shared subscription of two members
    members = [_Probe(url, f"c-share{i}-{tag}", mqtt5=v5) for i in range(2)]
    for member in members:
        member.subscribe(f"$share/cloud/share/{tag}/+")
    for n in range(20):
        pub.publish(f"share/{tag}/x", str(n).encode())
    wait_until(lambda: sum(len(m.messages) for m in members) >= 20, timeout=3)
    time.sleep(0.3)
    got = sorted(int(p) for m in members for _, p, _ in m.messages)
    out["shared"] = {"members": [len(m.messages) for m in members], "each_once": got == list(range(20))}
    for member in members:
        member.close()
    # retained, then a will (retained) on a broken connection
    pub.publish(f"status/{tag}/r", b"online", retain=True)
    dying = _Probe(url, f"c-will-{tag}", mqtt5=v5, will=f"status/{tag}/w")
    time.sleep(0.2)
    dying.crash()
    time.sleep(0.5)
    late = _Probe(url, f"c-late-{tag}", mqtt5=v5)
    late.subscribe(f"status/{tag}/+")
    wait_until(lambda: len(late.messages) >= 2, timeout=5)
    seen = {t.rsplit("/", 1)[1]: (p, r) for t, p, r in late.messages}
    out["retained"] = seen.get("r") == (b"online", True)
    out["will"] = seen.get("w") == (b"offline", True)
    for probe in (late, pub, sub):
        probe.close()
    return out


# -- throughput and latency --------------------------------------------------------------------
def throughput(url: str, messages: int, qos: int, size: int = 64) -> dict:
    """One publisher as fast as it can, one subscriber. ``unsent``: what the publisher's own
    queue refused (paho holds at most 10000 QoS 1 messages unacknowledged), not the broker."""
    got: list[float] = []
    sub = MqttTransport(url, f"bench-sub-{qos}")
    pub = MqttTransport(url, f"bench-pub-{qos}")
    sub.subscribe("bench/t", lambda msg: got.append(time.perf_counter()))
    sub.connect()       # returns once the broker has acknowledged the subscription
    pub.connect()
    payload = b"x" * size
    start = time.perf_counter()
    sent = sum(pub.publish("bench/t", payload, qos=qos) > 0 for _ in range(messages))
    wait_until(lambda: len(got) >= sent, timeout=10 + sent / 1000, interval=0.05)
    elapsed = (got[-1] if got else time.perf_counter()) - start
    pub.close()
    sub.close()
    return {"qos": qos, "messages": messages, "unsent": messages - sent, "received": len(got),
            "lost": sent - len(got), "msgs_per_s": round(len(got) / elapsed) if elapsed > 0 and got else None}


def latency(url: str, messages: int = LATENCY_MESSAGES, gap_s: float = LATENCY_GAP_S) -> dict:
    """One-way latency of paced QoS 1 messages, publisher and subscriber on fogsplit's transport."""
    lags: list[float] = []
    sub = MqttTransport(url, "bench-lat-sub")
    sub.subscribe("bench/lat", lambda m: lags.append(time.perf_counter() - float(m.payload)))
    sub.connect()
    pub = MqttTransport(url, "bench-lat-pub").connect()
    for _ in range(messages):
        pub.publish("bench/lat", repr(time.perf_counter()).encode(), qos=1)
        time.sleep(gap_s)
    wait_until(lambda: len(lags) >= messages, timeout=10)
    pub.close()
    sub.close()
    return percentiles(np.array(lags) * 1000, digits=3) | {"lost": messages - len(lags)}


def percentiles(values, digits: int = 1) -> dict:
    if not len(values):
        return {"p50": None, "p95": None, "p99": None}
    p = np.percentile(values, [50, 95, 99])
    return {"p50": round(float(p[0]), digits), "p95": round(float(p[1]), digits), "p99": round(float(p[2]), digits)}


# -- the whole stack ---------------------------------------------------------------------------
def stack_inputs(args):
    """The stack's bundle (trained once into ``--workdir``, signed anew with a one-off key) and
    its test events."""
    from fogsplit.core.manifest import MANIFEST, load_bundle
    from fogsplit.core.signing import sign_ephemeral
    from fogsplit.export.datasets import multiview_images
    data = multiview_images(n_events=STACK_TRAIN_EVENTS, seed=args.seed)
    out = Path(args.workdir) / "bundle"
    if not (out / MANIFEST).exists():
        from fogsplit.export.pipeline import ExportOptions, export_bundle
        log.info("training the stack's bundle into %s (once)", out)
        export_bundle(data, out, ExportOptions(epochs=STACK_EPOCHS, seed=args.seed, progress=False))
    bundle = load_bundle(out, trusted_keys=[sign_ephemeral(out)])
    test = data.test()
    if args.stack_events < len(test):
        test = test.subset(np.arange(args.stack_events))
    return bundle, test


def stack(url: str, bundle, test, args) -> dict:
    from fogsplit.bench.harness import stream_test_set, summarize
    from fogsplit.core.settings import GatewaySettings
    settings = GatewaySettings(local_threshold=args.local, edge_threshold=args.edge)
    outcome = stream_test_set(url, bundle, test, rate=args.rate, fleet=f"bb{time.monotonic_ns() % 10**6}",
                              gateway_settings=settings)
    report = summarize(outcome)
    lags = [(received - result.captured) * 1000 for event, results in outcome.results.items()
            if event in outcome.events for result, received in results[:1]]
    return {"events": report["events"], "lost": report["lost"], "duplicates": report["duplicates"],
            "latency_ms": percentiles(lags), "bytes_per_event": report["bytes_per_event"],
            "exit_fraction": report["exit_fraction"], "accuracy": report["accuracy"]["overall"]}


# -- the command -------------------------------------------------------------------------------
def available(name: str) -> bool:
    return bool(mosquitto_binary()) if name == "mosquitto" else rumqttd_available()


def run(args) -> dict:
    names = [n for n in args.brokers if available(n)]
    for missing in sorted(set(args.brokers) - set(names)):
        log.warning("%s is not installed here: not measured", missing)
    inputs = stack_inputs(args) if args.stack else None
    out: dict = {"brokers": {}, "messages": args.messages, "rate": args.rate,
                 "stack_thresholds": {"local": args.local, "edge": args.edge}}
    for name in names:
        log.info("measuring %s", name)
        with started(name) as (url, pid):
            row: dict = {"contract": contract(url)}
            row["throughput"] = [throughput(url, args.messages, qos) for qos in (0, 1)]
            row["latency_ms"] = latency(url)
            if inputs is not None:
                row["stack"] = stack(url, *inputs, args)
            row["broker_rss_mb"] = rss_mb(pid)
        out["brokers"][name] = row
    return out


def format_table(out: dict) -> str:
    lines = [f"{'broker':<17} {'MQTT5':>5} {'alias':>5} {'queued':>6} {'shared':>7} {'retain':>6} {'will':>5} "
             f"{'QoS0/s':>7} {'QoS1/s':>7} {'lat p50':>7} {'p95':>6} {'p99':>6} ms"]
    for name, row in out["brokers"].items():
        c, t, lat = row["contract"], row["throughput"], row["latency_ms"]
        lines.append(f"{name:<17} {'yes' if c['mqtt5'] else 'no':>5} {c['topic_alias_maximum']:>5} "
                     f"{c['queued_qos1_delivered']:>4}/5 {'/'.join(map(str, c['shared']['members'])):>7} "
                     f"{'yes' if c['retained'] else 'no':>6} {'yes' if c['will'] else 'no':>5} "
                     f"{t[0]['msgs_per_s'] or 0:>7} {t[1]['msgs_per_s'] or 0:>7} "
                     f"{lat['p50']:>7} {lat['p95']:>6} {lat['p99']:>6}")
    stacks = {n: r["stack"] for n, r in out["brokers"].items() if "stack" in r}
    if stacks:
        first = next(iter(stacks.values()))
        lines.append(f"stack: {first['events']} events at {out['rate']}/s, six cameras, exits {first['exit_fraction']}")
        lines.append(f"{'broker':<17} {'lost':>5} {'dup':>4} {'p50':>7} {'p95':>7} {'p99':>7} ms {'bytes/ev':>9} "
                     f"{'RSS MB':>7}")
        for name, s in stacks.items():
            lat = s["latency_ms"]
            lines.append(f"{name:<17} {s['lost']:>5} {s['duplicates']:>4} {lat['p50']:>7} {lat['p95']:>7} "
                         f"{lat['p99']:>7}    {s['bytes_per_event']:>9} {out['brokers'][name]['broker_rss_mb'] or '-':>7}")
    return "\n".join(lines)


def _threshold(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a normalized-entropy threshold is between 0 and 1")
    return value


def _brokers(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in BROKERS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: brokers are a comma-separated list of {', '.join(BROKERS)}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fogsplit bench broker", description=__doc__.split("\n")[0])
    parser.add_argument("--brokers", type=_brokers, default=["mosquitto", "rumqttd"],
                        help=f"comma-separated, of {', '.join(BROKERS)} (default mosquitto,rumqttd)")
    parser.add_argument("--messages", type=positive(int), default=5000,
                        help="messages per throughput run (default 5000: paho queues at most 10000)")
    parser.add_argument("--stack-events", type=positive(int), default=240, help="test events the stack streams")
    parser.add_argument("--rate", type=positive(float), default=10.0, help="the stack's captures per second")
    parser.add_argument("--local", type=_threshold, default=0.3,
                        help="the gateway's local exit threshold in the stack (default 0.3: with the small "
                             "bundle, events then take every exit)")
    parser.add_argument("--edge", type=_threshold, default=0.3, help="the gateway's edge exit threshold in the stack")
    parser.add_argument("--no-stack", dest="stack", action="store_false",
                        help="skip the stack (which needs the export extra to train its bundle once)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench-broker"), help="where the bundle goes")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    for noisy in ("fogsplit.core.mqtt", "fogsplit.gateway", "fogsplit.device", "fogsplit.cloud", "fogsplit.export",
                  "fogsplit.bench.embedded", "iotcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return timed_main(args, run, format_table)


if __name__ == "__main__":
    raise SystemExit(main())
