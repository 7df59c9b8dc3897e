"""``fogsplit``: one command for every part.

Only torch-bound modules (export's training and pruning) are imported inside the commands
that need them, so the device command loads nothing but onnxruntime, numpy, paho-mqtt and
msgpack (tests/test_device_is_light.py)."""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path

from fogsplit.demo import format_report, run_demo
from fogsplit.bench import broker as bench_broker, cache as bench_cache, comm as bench_comm
from fogsplit.bench.embedded import EmbeddedBroker
from fogsplit.bench.flags import broker_url, fraction, name, positive, unit_interval
from fogsplit.bench.report import write_json
from fogsplit.cloud.worker import CloudWorker, RawOffload
from fogsplit.core.cache import CacheSettings
from fogsplit.core.dataset import save_npz
from fogsplit.core.errors import FogsplitError
from fogsplit.core.manifest import load_bundle
from fogsplit.core.mqtt import MqttTransport
from fogsplit.core.service import status_payload
from fogsplit.core.topics import Topics
from fogsplit.device.agent import DeviceAgent
from fogsplit.device.sources import ReplaySource
from fogsplit.export.datasets import load_data
from fogsplit.gateway.gateway import Gateway, GatewaySettings

log = logging.getLogger(__name__)

BENCHES = ("comm", "prune", "cache", "broker")


def _prune_flags(p: argparse.ArgumentParser) -> None:
    target = p.add_mutually_exclusive_group()
    target.add_argument("--target-flops", type=fraction, default=None, metavar="R",
                        help="prune every shard so that the FLOPs shrink by this fraction, e.g. 0.8")
    target.add_argument("--target-params", type=fraction, default=None, metavar="R",
                        help="prune every shard so that the parameters shrink by this fraction, e.g. 0.9")


def _network_flags(p: argparse.ArgumentParser, broker_default: str | None = "mqtt://127.0.0.1:1883") -> None:
    p.add_argument("--broker", type=broker_url, default=broker_default,
                   help="MQTT broker URL, mqtt://[user:pass@]host:port or mqtts://..."
                        + ("" if broker_default is None else f" (default {broker_default})"))
    p.add_argument("--fleet", type=name, default="demo", help="topic namespace of this fleet (default demo)")


def _cell_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cell", type=name, default="cell0", help="cell of co-located devices (default cell0)")


def _cache_flags(p: argparse.ArgumentParser, entries: int, max_bytes: int) -> None:
    p.add_argument("--cache", action="store_true", help="answer repeated scenes from a semantic cache (docs/cache.md)")
    p.add_argument("--cache-entries", type=int, default=entries, help=f"cache bound in entries (default {entries})")
    p.add_argument("--cache-bytes", type=int, default=max_bytes, help=f"cache bound in bytes (default {max_bytes})")
    p.add_argument("--cache-ttl", type=float, default=600.0, help="seconds an entry lives (default 600)")
    p.add_argument("--cache-threshold", type=float, default=None,
                   help="distance threshold in [0, 2] (default: the bundle's calibrated one)")


def _cache_settings(args):
    """The cache flags as CacheSettings (validated there), or None without --cache."""
    if not args.cache:
        return None
    given = {"max_entries": args.cache_entries, "max_bytes": args.cache_bytes, "ttl_s": args.cache_ttl,
             "threshold": args.cache_threshold}
    return CacheSettings.from_dict({k: v for k, v in given.items() if v is not None}, "cache flags")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fogsplit", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="train, export, start every tier and stream the test set; print a report")
    p.add_argument("--data", default="images", help="images, series, or a .npz file (default images)")
    p.add_argument("--broker", type=broker_url, default=None,
                   help="use this broker instead of starting an embedded one")
    p.add_argument("--fleet", type=name, default="demo")
    _cell_flag(p)
    p.add_argument("--json", type=Path, help="also write the report as JSON here")
    p.add_argument("--events", type=positive(int), help="how many events the built-in generator makes")
    p.add_argument("--rate", type=positive(float), default=25.0, help="captures per second (default 25)")
    p.add_argument("--epochs", type=positive(int), default=None, help="training epochs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, help="where the bundle goes (default: a temporary directory)")
    p.add_argument("--bundle", type=Path,
                   help="stream through this exported bundle instead of training one (give the --data, "
                        "--events and --seed it was exported with, so its test split is unseen)")
    _prune_flags(p)

    p = sub.add_parser("bench", help="run a benchmark: " + ", ".join(BENCHES) + " (each takes --help)",
                       add_help=False)
    p.add_argument("name", choices=BENCHES, help="which benchmark")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's own flags")

    p = sub.add_parser("data", help="write a built-in dataset as a .npz in the documented format")
    p.add_argument("kind", choices=["images", "series"])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--events", type=positive(int))
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("export", help="train on a dataset and write a verified bundle of ONNX shards")
    p.add_argument("--data", default="images", help="images, series, or a .npz file (default images)")
    p.add_argument("--out", type=Path, required=True, help="bundle directory")
    p.add_argument("--events", type=positive(int), help="how many events the built-in generator makes")
    p.add_argument("--epochs", type=positive(int), default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--feature-channels", type=positive(int), default=None,
                   help="channels of the split layer (what devices send)")
    p.add_argument("--edge-fusion", choices=["max", "mean", "concat"], default=None)
    p.add_argument("--local-fusion", choices=["max", "mean"], default=None)
    p.add_argument("--feature-codec", choices=["fp32", "fp16", "int8", "sign"], default=None,
                   help="how device features travel (default int8; sign: a binarized trunk, 1 bit a value)")
    p.add_argument("--scores-codec", choices=["fp32", "fp16", "int8"], default=None,
                   help="how device exit scores travel (default int8)")
    p.add_argument("--feature-bytes", type=positive(int), default=None,
                   help="prune the split layer until one device's feature fits this many bytes, then fine-tune")
    p.add_argument("--max-accuracy-drop", type=float, default=None,
                   help="how much accuracy the early exits may cost on validation data (default 0.005)")
    _prune_flags(p)
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("device", help="run a device agent: sensor -> device shard -> MQTT")
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--device", type=name, required=True, help="sensor name in the bundle, e.g. cam0")
    _network_flags(p)
    _cell_flag(p)
    p.add_argument("--data", default="images", help="replay source: images, series, or a .npz file")
    p.add_argument("--split", choices=["train", "test", "all"], default="test")
    p.add_argument("--seed", type=int, default=0, help="seed of the built-in data")
    p.add_argument("--rate", type=positive(float), default=10.0, help="captures per second (default 10)")
    p.add_argument("--count", type=positive(int), help="stop after this many captures")
    p.add_argument("--policy", choices=["request", "eager", "raw"], default="request",
                   help="request: features on demand (default); eager: with the scores; raw: raw samples")
    p.add_argument("--threads", type=positive(int), default=1)
    _cache_flags(p, entries=256, max_bytes=1 << 20)

    p = sub.add_parser("gateway", help="run the gateway (fog node) of one cell")
    p.add_argument("--bundle", type=Path, required=True)
    _network_flags(p)
    _cell_flag(p)
    p.add_argument("--name", type=name, default="gw0")
    p.add_argument("--deadline-ms", type=positive(float), default=250.0)
    p.add_argument("--feature-deadline-ms", type=positive(float), default=500.0)
    p.add_argument("--stats-period", type=positive(float), default=5.0)
    p.add_argument("--local-threshold", type=unit_interval, default=None,
                   help="normalized-entropy exit threshold of the local exit (default: the bundle's)")
    p.add_argument("--edge-threshold", type=unit_interval, default=None,
                   help="normalized-entropy exit threshold of the edge exit (default: the bundle's)")
    p.add_argument("--threads", type=positive(int), default=1)
    _cache_flags(p, entries=4096, max_bytes=64 << 20)

    p = sub.add_parser("cloud", help="run a cloud worker (shares the forward topics with other workers)")
    p.add_argument("--bundle", type=Path, required=True)
    _network_flags(p)
    p.add_argument("--name", type=name, default="cloud0")
    p.add_argument("--raw", action="store_true", help="cloud-only baseline: take raw samples, run everything")
    p.add_argument("--threads", type=positive(int), default=1)

    p = sub.add_parser("broker", help="run the embedded MQTT broker")
    p.add_argument("--port", type=positive(int), default=1883)
    p.add_argument("--host", default="127.0.0.1")

    p = sub.add_parser("watch", help="print status, results, stats and errors of a fleet")
    _network_flags(p)
    p.add_argument("--count", type=positive(int), help="stop after this many messages")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args) or 0
    except (FogsplitError, ConnectionError, ValueError) as exc:
        log.error("%s", exc)
        print(f"fogsplit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()


def cmd_data(args) -> int:
    data = load_data(args.kind, seed=args.seed, events=args.events)
    save_npz(data, args.out)
    print(f"wrote {args.out}: {len(data)} events, sensors {data.sensor_names}, classes {list(data.classes)}")
    return 0


def _export_options(args):
    from fogsplit.export.pipeline import ExportOptions
    given = {"epochs": args.epochs, "seed": args.seed,
             "feature_channels": getattr(args, "feature_channels", None),
             "edge_fusion": getattr(args, "edge_fusion", None), "local_fusion": getattr(args, "local_fusion", None),
             "feature_codec": getattr(args, "feature_codec", None),
             "scores_codec": getattr(args, "scores_codec", None),
             "feature_bytes": getattr(args, "feature_bytes", None),
             "max_accuracy_drop": getattr(args, "max_accuracy_drop", None),
             "target_flops": getattr(args, "target_flops", None),
             "target_params": getattr(args, "target_params", None),
             "progress": not getattr(args, "no_progress", False)}
    return ExportOptions(**{k: v for k, v in given.items() if v is not None})


def cmd_export(args) -> int:
    from fogsplit.export.pipeline import export_bundle
    data = load_data(args.data, seed=args.seed, events=args.events)
    report = export_bundle(data, args.out, _export_options(args))
    m = report.manifest
    print(f"bundle {m.model_id} in {report.path}")
    for s in m.shards:
        print(f"  {s.file:<22} {s.tier:<8} {s.params:>8} params {s.flops / 1e6:>8.2f} MFLOPs")
    if m.compression:
        c = m.compression
        print(f"  pruned to a {c['metric']} cut of {c['target']:.3f}: FLOPs -{100 * c['flops_cut']:.1f}%, "
              f"params -{100 * c['params_cut']:.1f}% ("
              + ", ".join(f"{n} -{100 * v['flops_cut']:.1f}%" for n, v in c["shards"].items()) + " FLOPs)")
    print(f"  thresholds {m.thresholds}; test metrics {json.dumps(m.metrics['test_exit_accuracy'])}")
    return 0


def _replay_samples(args, sensor: str):
    data = load_data(args.data, seed=args.seed)
    if sensor not in data.sensors:
        raise ValueError(f"--data {args.data} has no sensor {sensor!r} (it has {data.sensor_names})")
    part = data if args.split == "all" else (data.test() if args.split == "test" else data.train())
    return part.sensors[sensor]


def cmd_device(args) -> int:

    topics = Topics(args.fleet)
    probe = load_bundle(args.bundle, shards=[])
    shards = [] if args.policy == "raw" else [probe.manifest.device_shard(args.device).name]
    bundle = load_bundle(args.bundle, shards=shards)
    source = ReplaySource(_replay_samples(args, args.device), rate=args.rate, count=args.count,
                          loop=args.count is None)
    transport = MqttTransport(args.broker, f"{args.fleet}-{args.cell}-{args.device}",
                              will=(topics.device_status(args.cell, args.device), status_payload("offline")))
    agent = DeviceAgent(transport, topics, bundle, cell=args.cell, device=args.device, source=source,
                        policy=args.policy, threads=args.threads, cache=_cache_settings(args))
    transport.connect()
    agent.start()
    _run_until_done(agent, source)
    transport.close()
    return 0


def _run_until_done(service, source=None) -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    loops = getattr(service, "_loops", [])
    while not stop.wait(0.2):
        if source is not None and loops and not any(t.is_alive() for t in loops):
            service.drain()
            break
    service.stop()


def cmd_gateway(args) -> int:

    topics = Topics(args.fleet)
    settings = GatewaySettings(deadline_ms=args.deadline_ms, feature_deadline_ms=args.feature_deadline_ms,
                               stats_period_s=args.stats_period, threads=args.threads,
                               local_threshold=args.local_threshold, edge_threshold=args.edge_threshold,
                               cache=_cache_settings(args))
    bundle = load_bundle(args.bundle, shards=["gateway"])
    transport = MqttTransport(args.broker, f"{args.fleet}-{args.cell}-{args.name}",
                              will=(topics.gateway_status(args.cell, args.name), status_payload("offline")))
    gateway = Gateway(transport, topics, bundle, cell=args.cell, gateway=args.name, settings=settings)
    transport.connect()
    gateway.start()
    _run_until_done(gateway)
    transport.close()
    return 0


def cmd_cloud(args) -> int:

    topics = Topics(args.fleet)
    bundle = load_bundle(args.bundle, shards=None if args.raw else ["cloud"])
    transport = MqttTransport(args.broker, f"{args.fleet}-{args.name}",
                              will=(topics.cloud_status(args.name), status_payload("offline")))
    worker = RawOffload(transport, topics, bundle, threads=args.threads) if args.raw else \
        CloudWorker(transport, topics, bundle, worker=args.name, threads=args.threads)
    transport.connect()
    worker.start()
    _run_until_done(worker)
    transport.close()
    return 0


def cmd_broker(args) -> int:
    with EmbeddedBroker(port=args.port, host=args.host) as url:
        print(f"embedded broker on {url} (Ctrl+C to stop)", flush=True)
        _wait_for_signal()
    return 0


def cmd_watch(args) -> int:

    topics = Topics(args.fleet)
    seen = threading.Semaphore(0)
    data_leaves = ("scores", "feature", "raw", "request", "forward")

    def show(msg) -> None:
        if msg.topic.rsplit("/", 1)[-1] in data_leaves:
            return
        print(f"{msg.topic} {msg.payload.decode(errors='replace')}", flush=True)
        seen.release()

    transport = MqttTransport(args.broker, f"watch-{threading.get_ident()}")
    transport.subscribe(f"{topics.root}/#", show)
    transport.connect()
    try:
        if args.count:
            for _ in range(args.count):
                seen.acquire()
        else:
            _wait_for_signal()
    finally:
        transport.close()
    return 0


def cmd_demo(args) -> int:
    report = run_demo(data=args.data, broker=args.broker, events=args.events, rate=args.rate,
                      options=_export_options(args), workdir=args.workdir, fleet=args.fleet, cell=args.cell,
                      bundle=args.bundle)
    print(format_report(report))
    write_json(args.json, report)
    return 0


def _bench_prune(argv: list[str]) -> int:
    from fogsplit.bench import prune  # imports torch: only when asked for
    return prune.main(argv)


BENCH_MAINS = {"comm": bench_comm.main, "prune": _bench_prune, "cache": bench_cache.main, "broker": bench_broker.main}


def cmd_bench(args) -> int:
    """Each benchmark has its own ``main(argv)`` and flags."""
    return BENCH_MAINS[args.name](args.rest)


COMMANDS = {"demo": cmd_demo, "bench": cmd_bench, "data": cmd_data, "export": cmd_export, "device": cmd_device,
            "gateway": cmd_gateway, "cloud": cmd_cloud, "broker": cmd_broker, "watch": cmd_watch}


if __name__ == "__main__":
    sys.exit(main())
