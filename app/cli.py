"""``fogsplit``: one command for every part.

Each role command (device, gateway, cloud, export, broker, watch) reads its settings from
defaults < ``--config FILE`` (TOML) < ``FOGSPLIT_*`` environment variables < its flags
(docs/configuration.md); a flag is bound to one setting and judged by that setting's model.

Only torch-bound modules (export's training and pruning) are imported inside the commands
that need them, so the device command loads nothing but onnxruntime, numpy, paho-mqtt,
msgpack and msgspec (tests/test_device_is_light.py)."""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable

import msgspec

from fogsplit.demo import format_report, run_demo
from fogsplit.bench import broker as bench_broker, cache as bench_cache, comm as bench_comm
from fogsplit.bench.embedded import EmbeddedBroker
from fogsplit.bench.flags import broker_url, name, positive, setting
from fogsplit.bench.report import write_json
from fogsplit.cloud.worker import CloudWorker, RawOffload
from fogsplit.core.config import Flag, Loaded, load_config, show
from fogsplit.core.dataset import save_npz
from fogsplit.core.errors import FogsplitError
from fogsplit.core.manifest import load_bundle
from fogsplit.core.mqtt import MqttTransport
from fogsplit.core.settings import ROLES, BrokerSettings, ExportConfig, ExportOptions
from fogsplit.core.topics import Topics
from fogsplit.core.validation import choices_of, field_doc, field_type
from fogsplit.device.agent import DeviceAgent
from fogsplit.device.sources import ReplaySource
from fogsplit.export.datasets import load_data
from fogsplit.gateway.gateway import Gateway

log = logging.getLogger(__name__)

BENCHES = ("comm", "prune", "cache", "broker")
FORMATS = ("toml", "json")


class Binder:
    """Adds flags bound to settings of ``model``: no argparse default (an absent flag leaves
    the file's or the environment's value), the help text and the bounds from the model."""

    def __init__(self, parser: argparse.ArgumentParser | Any, model: type) -> None:
        self.parser, self.model = parser, model
        self.flags: list[tuple[str, str]] = []

    def __call__(self, key: str, flag: str, parse: Callable[[str], Any] = str, *, help: str | None = None,
                 on: Any = None, group: Any = None, **kwargs: Any) -> None:
        description, default = field_doc(self.model, key)
        text = help or description
        if default is msgspec.NODEFAULT:
            text += f" (required; setting {key})"
        elif on is None and "default" not in text:
            text += f" (default {'none' if default is None else default}; setting {key})"
        else:
            text += f" (setting {key})"
        target = group or self.parser
        if on is not None:
            target.add_argument(flag, dest=key, action="store_const", const=on, default=None, help=text)
        else:
            choices = choices_of(field_type(self.model, tuple(key.split("."))))
            plain = {int: "N", float: "NUM"}.get(parse, key.rsplit(".", 1)[-1].upper())
            kwargs.setdefault("metavar", "{" + ",".join(choices) + "}" if choices else plain)
            target.add_argument(flag, dest=key, type=setting(self.model, key, parse), default=None, help=text,
                                **kwargs)
        self.flags.append((key, flag))

    def group(self) -> Any:
        return self.parser.add_mutually_exclusive_group()


def _role(sub: Any, role: str, help: str) -> tuple[argparse.ArgumentParser, Binder]:
    p = sub.add_parser(role, help=help, description=help + ". Settings: defaults < --config FILE < "
                       "FOGSPLIT_* environment variables < flags (docs/configuration.md).")
    p.add_argument("--config", type=Path, metavar="FILE", help="TOML settings file of this role")
    bind = Binder(p, ROLES[role])
    p.set_defaults(role=role, bound=bind.flags)
    return p, bind


def _broker_flags(bind: Binder) -> None:
    bind("broker.url", "--broker", help="MQTT broker URL, mqtt://host:port or mqtts://host:port, no password")
    bind("broker.username", "--username")
    bind("broker.ca_file", "--ca-file")
    bind("fleet", "--fleet", name)


def _cache_flags(bind: Binder, section: str) -> None:
    bind(f"{section}.cache.enabled", "--cache", on=True,
         help="answer repeated scenes from a semantic cache (docs/cache.md); any --cache-* flag implies it")
    bind(f"{section}.cache.max_entries", "--cache-entries", int)
    bind(f"{section}.cache.max_bytes", "--cache-bytes", int)
    bind(f"{section}.cache.ttl_s", "--cache-ttl", float)
    bind(f"{section}.cache.threshold", "--cache-threshold", float)


def _prune_flags(bind: Binder) -> None:
    target = bind.group()
    bind("export.target_flops", "--target-flops", float, group=target, metavar="R")
    bind("export.target_params", "--target-params", float, group=target, metavar="R")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fogsplit", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="train, export, start every tier and stream the test set; print a report")
    demo = Binder(p, ExportConfig)
    p.add_argument("--data", default="images", help="images, series, or a .npz file (default images)")
    p.add_argument("--broker", type=broker_url, default=None,
                   help="use this broker instead of starting an embedded one (no password: the demo "
                        "connects anonymously)")
    p.add_argument("--fleet", type=name, default="demo")
    p.add_argument("--cell", type=name, default="cell0", help="cell of co-located devices (default cell0)")
    p.add_argument("--json", type=Path, help="also write the report as JSON here")
    p.add_argument("--events", type=positive(int), help="how many events the built-in generator makes")
    p.add_argument("--rate", type=positive(float), default=25.0, help="captures per second (default 25)")
    demo("export.epochs", "--epochs", int)
    demo("export.seed", "--seed", int)
    p.add_argument("--workdir", type=Path, help="where the bundle goes (default: a temporary directory)")
    p.add_argument("--bundle", type=Path,
                   help="stream through this exported bundle instead of training one (give the --data, "
                        "--events and --seed it was exported with, so its test split is unseen)")
    _prune_flags(demo)
    p.set_defaults(bound=demo.flags)

    p = sub.add_parser("bench", help="run a benchmark: " + ", ".join(BENCHES) + " (each takes --help)",
                       add_help=False)
    p.add_argument("name", choices=BENCHES, help="which benchmark")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's own flags")

    p = sub.add_parser("data", help="write a built-in dataset as a .npz in the documented format")
    p.add_argument("kind", choices=["images", "series"])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--events", type=positive(int))
    p.add_argument("--seed", type=int, default=0)

    p, bind = _role(sub, "export", "train on a dataset and write a verified bundle of ONNX shards")
    bind("data", "--data")
    bind("out", "--out", help="bundle directory")
    bind("events", "--events", int)
    bind("export.epochs", "--epochs", int)
    bind("export.seed", "--seed", int)
    bind("export.feature_channels", "--feature-channels", int)
    bind("export.edge_fusion", "--edge-fusion")
    bind("export.local_fusion", "--local-fusion")
    bind("export.feature_codec", "--feature-codec")
    bind("export.scores_codec", "--scores-codec")
    bind("export.feature_bytes", "--feature-bytes", int)
    bind("export.max_accuracy_drop", "--max-accuracy-drop", float)
    _prune_flags(bind)
    bind("export.progress", "--no-progress", on=False, help="no progress bars")

    p, bind = _role(sub, "device", "run a device agent: sensor -> device shard -> MQTT")
    bind("bundle", "--bundle")
    bind("name", "--device", name, help="sensor name in the bundle, e.g. cam0")
    _broker_flags(bind)
    bind("cell", "--cell", name)
    bind("data", "--data")
    bind("split", "--split")
    bind("seed", "--seed", int)
    bind("count", "--count", int)
    bind("device.rate", "--rate", float)
    bind("device.policy", "--policy")
    bind("device.threads", "--threads", int)
    _cache_flags(bind, "device")

    p, bind = _role(sub, "gateway", "run the gateway (fog node) of one cell")
    bind("bundle", "--bundle")
    _broker_flags(bind)
    bind("cell", "--cell", name)
    bind("name", "--name", name)
    bind("gateway.deadline_ms", "--deadline-ms", float)
    bind("gateway.feature_deadline_ms", "--feature-deadline-ms", float)
    bind("gateway.stats_period_s", "--stats-period", float)
    bind("gateway.local_threshold", "--local-threshold", float)
    bind("gateway.edge_threshold", "--edge-threshold", float)
    bind("gateway.threads", "--threads", int)
    _cache_flags(bind, "gateway")

    p, bind = _role(sub, "cloud", "run a cloud worker (shares the forward topics with other workers)")
    bind("bundle", "--bundle")
    _broker_flags(bind)
    bind("name", "--name", name)
    bind("raw", "--raw", on=True)
    bind("cloud.threads", "--threads", int)

    p, bind = _role(sub, "broker", "run the embedded MQTT broker")
    bind("port", "--port", int)
    bind("host", "--host")

    p, bind = _role(sub, "watch", "print status, results, stats and errors of a fleet")
    _broker_flags(bind)
    bind("count", "--count", int)

    p = sub.add_parser("config", help="show a role's effective settings (secrets masked)")
    p.add_argument("action", choices=["show"])
    p.add_argument("--role", choices=sorted(ROLES), required=True)
    p.add_argument("--config", type=Path, metavar="FILE", help="TOML settings file of that role")
    p.add_argument("--format", choices=FORMATS, default="toml",
                   help="toml: each key with where it came from (default); json")
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


def load(args: argparse.Namespace) -> Loaded:
    """The settings of the role ``args`` came from: file, environment, then the flags given."""
    flags = [Flag(key, flag, getattr(args, key)) for key, flag in args.bound]
    return load_config(args.role, path=args.config, flags=flags)


def _transport(broker: BrokerSettings, client_id: str) -> MqttTransport:
    """The connection of a service; the service sets its own presence (birth and will) on it."""
    return MqttTransport(broker.url, client_id, username=broker.username, password=broker.secret,
                         keepalive=broker.keepalive, ca_file=broker.ca_file, protocol=broker.protocol)


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()


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


def _serve(transport: MqttTransport, service, source=None) -> int:
    transport.connect()
    service.start()
    _run_until_done(service, source)
    transport.close()
    return 0


def cmd_config(args) -> int:
    print(show(load_config(args.role, path=args.config), args.format), end="")
    return 0


def cmd_data(args) -> int:
    data = load_data(args.kind, seed=args.seed, events=args.events)
    save_npz(data, args.out)
    print(f"wrote {args.out}: {len(data)} events, sensors {data.sensor_names}, classes {list(data.classes)}")
    return 0


def _export_options(args) -> ExportOptions:
    """``export``: its whole configuration's options; ``demo``: the export flags it has."""
    if getattr(args, "role", None) == "export":
        return load(args).config.export
    given = {key.split(".", 1)[1]: getattr(args, key) for key, _ in args.bound}
    return ExportOptions(**{k: v for k, v in given.items() if v is not None})


def cmd_export(args) -> int:
    from fogsplit.export.pipeline import export_bundle
    config = load(args).config
    data = load_data(config.data, seed=config.export.seed, events=config.events)
    report = export_bundle(data, Path(config.out), config.export)
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


def _replay_samples(config, sensor: str):
    data = load_data(config.data, seed=config.seed)
    if sensor not in data.sensors:
        raise ValueError(f"data {config.data} has no sensor {sensor!r} (it has {data.sensor_names})")
    part = data if config.split == "all" else (data.test() if config.split == "test" else data.train())
    return part.sensors[sensor]


def cmd_device(args) -> int:
    config = load(args).config
    topics, s = Topics(config.fleet), config.device
    probe = load_bundle(config.bundle, shards=[])
    shards = [] if s.policy == "raw" else [probe.manifest.device_shard(config.name).name]
    bundle = load_bundle(config.bundle, shards=shards)
    source = ReplaySource(_replay_samples(config, config.name), rate=s.rate, count=config.count,
                          loop=config.count is None)
    transport = _transport(config.broker, f"{config.fleet}-{config.cell}-{config.name}")
    agent = DeviceAgent(transport, topics, bundle, cell=config.cell, device=config.name, source=source, settings=s)
    return _serve(transport, agent, source)


def cmd_gateway(args) -> int:
    config = load(args).config
    topics = Topics(config.fleet)
    bundle = load_bundle(config.bundle, shards=["gateway"])
    transport = _transport(config.broker, f"{config.fleet}-{config.cell}-{config.name}")
    gateway = Gateway(transport, topics, bundle, cell=config.cell, gateway=config.name, settings=config.gateway)
    return _serve(transport, gateway)


def cmd_cloud(args) -> int:
    config = load(args).config
    topics = Topics(config.fleet)
    bundle = load_bundle(config.bundle, shards=None if config.raw else ["cloud"])
    transport = _transport(config.broker, f"{config.fleet}-{config.name}")
    worker = RawOffload(transport, topics, bundle, settings=config.cloud) if config.raw else \
        CloudWorker(transport, topics, bundle, worker=config.name, settings=config.cloud)
    return _serve(transport, worker)


def cmd_broker(args) -> int:
    config = load(args).config
    with EmbeddedBroker(port=config.port, host=config.host) as url:
        print(f"embedded broker on {url} (Ctrl+C to stop)", flush=True)
        _wait_for_signal()
    return 0


def cmd_watch(args) -> int:
    config = load(args).config
    topics = Topics(config.fleet)
    seen = threading.Semaphore(0)
    data_leaves = ("scores", "feature", "raw", "request", "forward")

    def show_message(msg) -> None:
        if msg.topic.rsplit("/", 1)[-1] in data_leaves:
            return
        print(f"{msg.topic} {msg.payload.decode(errors='replace')}", flush=True)
        seen.release()

    transport = _transport(config.broker, f"watch-{threading.get_ident()}")
    transport.subscribe(f"{topics.root}/#", show_message)
    transport.connect()
    try:
        if config.count:
            for _ in range(config.count):
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
            "gateway": cmd_gateway, "cloud": cmd_cloud, "broker": cmd_broker, "watch": cmd_watch,
            "config": cmd_config}


if __name__ == "__main__":
    sys.exit(main())
