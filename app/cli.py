"""``fogsplit``: one command for every part.

Each role command (device, gateway, cloud, export, broker, watch) reads its settings from
defaults < ``--config FILE`` (TOML) < ``FOGSPLIT_*`` environment variables < its flags
(docs/configuration.md); a flag is bound to one setting and judged by that setting's model.

The demo, the benchmarks, the data generators and the other tiers are imported inside the
commands that need them, so the device command loads nothing but onnxruntime, numpy,
paho-mqtt, msgpack, msgspec and the core (tests/test_device_is_light.py; docs/device.md)."""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable

import msgspec

from fogsplit import acl as acl_command, health as health_command
from fogsplit import pack
from fogsplit import rollout as rollout_command
from fogsplit.bench.embedded import EmbeddedBroker
from fogsplit.bench.flags import broker_url, name, positive, setting
from fogsplit.bench.report import write_json
from fogsplit.core.config import Flag, Loaded, load_config, show
from fogsplit.core.dataset import load_sensor, save_npz, save_replay
from fogsplit.core.errors import FogsplitError
from fogsplit.core.manifest import Bundle, check_bundle_contents, load_bundle
from fogsplit.core.mqtt import MqttTransport
from fogsplit.core.signing import load_private_key, load_public_key, new_key_pair, sign_bundle
from fogsplit.core.settings import ROLES, BrokerSettings, ExportConfig, ExportOptions
from fogsplit.core.topics import Topics
from fogsplit.core.validation import choices_of, field_doc, field_type
from fogsplit.device.agent import DeviceAgent
from fogsplit.device.sources import ReplaySource

log = logging.getLogger(__name__)

BENCHES = ("comm", "prune", "cache", "broker", "device", "eddl", "data", "recipe", "faults", "fuzz", "load", "soak")
FORMATS = ("toml", "json")
ONCE_S = 6.0   # long enough for a stats round of a gateway at its default period (5 s)


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


def _trust_flags(bind: Binder) -> None:
    """--trusted-key PATH (repeatable; given, the flags replace the file's list) and --allow-unsigned."""
    text, _ = field_doc(bind.model, "trusted_keys")
    bind.parser.add_argument("--trusted-key", dest="trusted_keys", action="append", type=_path,
                             metavar="PATH", default=None, help=f"{text}; repeat for more (setting trusted_keys)")
    bind.flags.append(("trusted_keys", "--trusted-key"))
    bind("allow_unsigned", "--allow-unsigned", on=True)


def _served_flags(bind: Binder) -> None:
    """What every tier that serves a bundle over MQTT takes: the bundle, the keys it trusts, the broker."""
    bind("bundle", "--bundle")
    _trust_flags(bind)
    _broker_flags(bind)


def _path(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("an empty path")
    return text


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
    p.add_argument("--trusted-key", type=_path, action="append", default=[], metavar="PATH",
                   help="with --bundle: a public key (.pub) whose signature on it is trusted; repeatable")
    p.add_argument("--allow-unsigned", action="store_true", help="with --bundle: accept it without a signature")
    _prune_flags(demo)
    p.set_defaults(bound=demo.flags)

    p = sub.add_parser("bench", help="run a benchmark: " + ", ".join(BENCHES) + " (each takes --help)",
                       add_help=False)
    p.add_argument("name", choices=BENCHES, help="which benchmark")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's own flags")

    p = sub.add_parser("data", help="write a built-in dataset as a .npz in the documented format; replay: "
                       "one sensor's test samples, the file a device replays (docs/device.md)")
    p.add_argument("kind", choices=["images", "series", "replay"])
    p.add_argument("--out", type=Path, required=True,
                   help="the .npz to write; replay without --sensor: a folder, one <sensor>.npz each")
    p.add_argument("--data", default="images", help="replay: images, series or a .npz data set (default images)")
    p.add_argument("--sensor", type=name, help="replay: the device's sensor, e.g. cam0 (default: every sensor)")
    p.add_argument("--split", choices=["train", "test", "all"], default="test",
                   help="replay: which samples (default test: the ones the bundle never trained on)")
    p.add_argument("--events", type=positive(int))
    p.add_argument("--seed", type=int, default=0)

    p, bind = _role(sub, "export", "train on a dataset and write a verified bundle of ONNX shards")
    bind("data", "--data")
    bind("out", "--out", help="bundle directory")
    bind("sign_key", "--sign-key", metavar="PATH")
    bind("events", "--events", int)
    budget = bind.group()
    bind("export.epochs", "--epochs", int, group=budget)
    bind("export.steps", "--steps", int, group=budget)
    bind("export.seed", "--seed", int)
    bind("export.augment", "--no-augment", on=False, help="train on the data as it is, without augmentation")
    bind("export.flips", "--flips", on=True)
    bind("export.early_stop", "--no-early-stop", on=False, help="keep the last training step, not the best on validation")
    bind("export.fusion_weights", "--no-fusion-weights", on=False,
         help="fuse the device exits as trained (--local-fusion), without weights learnt on validation")
    bind("export.feature_channels", "--feature-channels", int)
    bind("export.edge_fusion", "--edge-fusion")
    bind("export.local_fusion", "--local-fusion")
    bind("export.feature_codec", "--feature-codec")
    bind("export.scores_codec", "--scores-codec")
    bind("export.feature_bytes", "--feature-bytes", int)
    bind("export.max_accuracy_drop", "--max-accuracy-drop", float)
    _prune_flags(bind)
    bind("export.fog_nodes", "--fog-nodes", int)
    bind("export.fog_design", "--design")
    bind("export.progress", "--no-progress", on=False, help="no progress bars")

    p, bind = _role(sub, "device", "run a device agent: sensor -> device shard -> MQTT")
    _served_flags(bind)
    bind("name", "--device", name, help="sensor name in the bundle, e.g. cam0")
    bind("cell", "--cell", name)
    bind("data", "--data")
    bind("split", "--split")
    bind("count", "--count", int)
    bind("device.rate", "--rate", float)
    bind("device.policy", "--policy")
    bind("device.threads", "--threads", int)
    _cache_flags(bind, "device")

    p, bind = _role(sub, "gateway", "run the gateway (fog node) of one cell")
    _served_flags(bind)
    bind("cell", "--cell", name)
    bind("name", "--name", name)
    bind("gateway.deadline_ms", "--deadline-ms", float)
    bind("gateway.feature_deadline_ms", "--feature-deadline-ms", float)
    bind("gateway.stats_period_s", "--stats-period", float)
    bind("gateway.local_threshold", "--local-threshold", float)
    bind("gateway.edge_threshold", "--edge-threshold", float)
    bind("gateway.threads", "--threads", int)
    _cache_flags(bind, "gateway")

    p, bind = _role(sub, "fog", "run one fog node: its share of the edge part, for bundles exported with "
                    "--fog-nodes (docs/eddl.md)")
    _served_flags(bind)
    bind("cell", "--cell", name)
    bind("node", "--node", int)
    bind("fog.threads", "--threads", int)

    p, bind = _role(sub, "cloud", "run a cloud worker (shares the forward topics with other workers)")
    _served_flags(bind)
    bind("name", "--name", name)
    bind("raw", "--raw", on=True)
    bind("cloud.threads", "--threads", int)

    p, bind = _role(sub, "broker", "run the embedded MQTT broker")
    bind("port", "--port", int)
    bind("host", "--host")
    bind("kind", "--kind")
    bind("data_dir", "--data-dir")

    p, bind = _role(sub, "rollout", "ship a bundle to a cell's tiers over MQTT: staged, switched at an event "
                    "boundary, health-checked, rolled back by itself (docs/rollout.md)")
    bind("bundle", "--bundle")
    bind("cell", "--cell", name)
    bind("canary_cell", "--canary-cell", name)
    bind("lead_s", "--lead-s", float)
    bind("timeout_s", "--timeout-s", float)
    bind("chunk_bytes", "--chunk-bytes", int)
    _broker_flags(bind)

    p, bind = _role(sub, "watch", "a live dashboard of a fleet's cells, devices and cloud workers "
                    "(docs/monitoring.md); --raw: one line per message")
    _broker_flags(bind)
    bind("count", "--count", int)
    bind("raw", "--raw", on=True)
    once = bind.group()
    bind("seconds", "--seconds", float, group=once)
    once.add_argument("--once", action="store_true", help=f"the same as --seconds {ONCE_S:g}")

    p = sub.add_parser("keys", help="make an Ed25519 key pair that signs bundles (docs/signing.md)")
    p.add_argument("action", choices=["new"])
    p.add_argument("--out", type=Path, required=True, help="folder for NAME.key (private, mode 0600) and NAME.pub")
    p.add_argument("--name", type=name, default="bundle-signing", help="file name of the pair (default bundle-signing)")

    p = sub.add_parser("sign", help="check a bundle's shards against its manifest, then sign the manifest")
    p.add_argument("--bundle", type=Path, required=True, help="bundle directory")
    p.add_argument("--key", type=Path, required=True, metavar="PATH", help="private key file (.key)")

    pack.add_parser(sub)

    p = sub.add_parser("config", help="show a role's effective settings (secrets masked)")
    p.add_argument("action", choices=["show"])
    p.add_argument("--role", choices=sorted(ROLES), required=True)
    p.add_argument("--config", type=Path, metavar="FILE", help="TOML settings file of that role")
    p.add_argument("--format", choices=FORMATS, default="toml",
                   help="toml: each key with where it came from (default); json")

    acl_command.add_parser(sub)
    health_command.add_parser(sub)
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


# Cloud workers start clean: Mosquitto keeps routing a shared subscription's messages to a
# member whose persistent session outlives it, so a dead worker held every other forward until
# the gateway's retry (p99 14 s with one of two workers killed, bench faults); the gateway's
# end-to-end retry makes their session unnecessary (docs/reliability.md).
SESSION_EXPIRY_S = {"gateway": 300}


def _transport(broker: BrokerSettings, client_id: str, role: str = "") -> MqttTransport:
    """The connection of a service; the service sets its own presence (birth and will) on it.
    The gateway keeps a session at the broker while it restarts (what comes for it meanwhile
    waits there); the others start clean unless configured. A cloud worker acknowledges a
    forward only once it has answered it: with a persistent session (``session_expiry_s``) the
    broker delivers an unanswered one again after a restart (docs/reliability.md)."""
    expiry = broker.session_expiry_s if broker.session_expiry_s is not None else SESSION_EXPIRY_S.get(role, 0)
    return MqttTransport(broker.url, client_id, username=broker.username, password=broker.secret,
                         keepalive=broker.keepalive, ca_file=broker.ca_file, protocol=broker.protocol,
                         session_expiry_s=expiry, manual_ack=role == "cloud")


def _state_file(config, name: str) -> str:
    """Where a tier keeps its state when its config names no file: under ``$XDG_STATE_HOME``
    (``~/.local/state``)/fogsplit, one file per fleet, cell and component."""
    root = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "fogsplit"
    return str(root / f"{config.fleet}-{config.cell}-{name}")


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


def _serve(transport: MqttTransport, service, source=None, health=None) -> int:
    if health is not None and health.file:
        service.heartbeat(health.file, health.period_s)
    transport.connect()
    service.start()
    _run_until_done(service, source)
    transport.close()
    return 0


def cmd_config(args) -> int:
    print(show(load_config(args.role, path=args.config), args.format), end="")
    return 0


def cmd_data(args) -> int:
    if args.kind == "replay":
        return _write_replay(args)
    from fogsplit.export.datasets import load_data
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
    signer = load_private_key(config.sign_key) if config.sign_key else None   # a bad key stops us before training
    from fogsplit.export.datasets import load_data
    data = load_data(config.data, seed=config.export.seed, events=config.events)
    report = export_bundle(data, Path(config.out), config.export)
    m = report.manifest
    if config.export.fog_nodes:
        from fogsplit.export.eddl import add_fog
        m = add_fog(data, Path(config.out), config.export)
    print(f"bundle {m.model_id} in {report.path}")
    if signer is not None:
        print(f"  signed by key {signer.public_key.id}: {sign_bundle(Path(config.out), signer)}")
    for s in m.shards:
        print(f"  {s.file:<22} {s.tier:<8} {s.params:>8} params {s.flops / 1e6:>8.2f} MFLOPs")
    if m.compression:
        c = m.compression
        print(f"  pruned to a {c['metric']} cut of {c['target']:.3f}: FLOPs -{100 * c['flops_cut']:.1f}%, "
              f"params -{100 * c['params_cut']:.1f}% ("
              + ", ".join(f"{n} -{100 * v['flops_cut']:.1f}%" for n, v in c["shards"].items()) + " FLOPs)")
    print(f"  thresholds {m.thresholds}; test metrics {json.dumps(m.metrics['test_exit_accuracy'])}")
    val = m.metrics["validation_exit_accuracy"]
    print(f"  validation accuracy: devices {json.dumps(val['device'])}; local {val['local']}, edge {val['edge']}, "
          f"cloud {val['cloud']}" + (f"; fusion weights {json.dumps(m.fusion_weights)}" if m.fusion_weights else ""))
    if "fusion_below_best_device" in m.metrics:
        print(f"  WARNING: fused exits below the best single device on validation: "
              f"{json.dumps(m.metrics['fusion_below_best_device'])}")
    return 0


def cmd_keys(args) -> int:
    private, public = new_key_pair(args.out, args.name)
    print(f"key {load_public_key(public).id}: {private} (private: keep it off the tiers), {public} (public: trust it)")
    return 0


def cmd_sign(args) -> int:
    key = load_private_key(args.key)
    manifest = check_bundle_contents(args.bundle)
    print(f"signed bundle {manifest.model_id} in {args.bundle} with key {key.public_key.id}: "
          f"{sign_bundle(args.bundle, key)}")
    return 0


def _trust(config) -> dict:
    """load_bundle's trust arguments; the keys are read now, so a bad key file stops the start."""
    return {"trusted_keys": [load_public_key(p) for p in config.trusted_keys], "allow_unsigned": config.allow_unsigned}


def _log_bundle(config, bundle: Bundle) -> None:
    if config.allow_unsigned:
        log.warning("allow_unsigned is on: bundle %s (model %s) %s", bundle.path, bundle.manifest.model_id,
                    "is unsigned and accepted" if bundle.signed_by is None else
                    f"is signed by key {bundle.signed_by}, but an unsigned one would be accepted")
    else:
        log.info("bundle %s (model %s) signed by key %s", bundle.path, bundle.manifest.model_id, bundle.signed_by)


def _write_replay(args) -> int:
    from fogsplit.export.datasets import load_data
    data = load_data(args.data, seed=args.seed, events=args.events)
    sensors = [args.sensor] if args.sensor else data.sensor_names
    for sensor in sensors:
        out = args.out if args.sensor else args.out / f"{sensor}.npz"
        save_replay(data, sensor, out, split=args.split)
        print(f"wrote {out}: {args.split} samples of {sensor}")
    return 0


def _replay_samples(config, sensor: str):
    """Only this sensor's array is read (docs/device.md): a device never generates data."""
    if config.data is None:
        raise ValueError(f"no data to replay: give --data FILE.npz, made once with: fogsplit data replay "
                         f"--data images --sensor {sensor} --out {sensor}.npz")
    return load_sensor(config.data, sensor, config.split)


def cmd_device(args) -> int:
    config = load(args).config
    samples = _replay_samples(config, config.name)
    topics, s = Topics(config.fleet), config.device
    if s.spool is None and s.delivery == "reliable" and s.policy != "raw":
        s = msgspec.structs.replace(s, spool=_state_file(config, f"{config.name}.spool.sqlite"))
    trust = _trust(config)
    probe = load_bundle(config.bundle, shards=[], **trust)
    shards = [] if s.policy == "raw" else [probe.manifest.device_shard(config.name).name]
    bundle = rollout_command.load_or_stored(config, shards, trust)
    _log_bundle(config, bundle)
    source = ReplaySource(samples, rate=s.rate, count=config.count,
                          loop=config.count is None)
    transport = _transport(config.broker, f"{config.fleet}-{config.cell}-{config.name}")
    agent = DeviceAgent(transport, topics, bundle, cell=config.cell, device=config.name, source=source, settings=s,
                        **rollout_command.rollout_kwargs(config, trust))
    return _serve(transport, agent, source, health=config.health)


def cmd_gateway(args) -> int:
    config = load(args).config
    topics = Topics(config.fleet)
    trust = _trust(config)
    bundle = rollout_command.load_or_stored(config, ["gateway"], trust)
    _log_bundle(config, bundle)
    transport = _transport(config.broker, f"{config.fleet}-{config.cell}-{config.name}", "gateway")
    from fogsplit.gateway.gateway import Gateway
    settings = config.gateway
    if settings.journal is None:
        settings = msgspec.structs.replace(settings, journal=_state_file(config, f"{config.name}.journal.sqlite"))
    gateway = Gateway(transport, topics, bundle, cell=config.cell, gateway=config.name, settings=settings,
                      **rollout_command.rollout_kwargs(config, trust))
    return _serve(transport, gateway, health=config.health)


def cmd_fog(args) -> int:
    config = load(args).config
    from fogsplit.fog.node import FogNode, node_name
    node = node_name(config.node)
    probe = load_bundle(config.bundle, shards=[], **_trust(config))
    if probe.manifest.fog is None:
        raise ValueError(f"bundle {config.bundle} has no fog nodes: export it with --fog-nodes N")
    bundle = load_bundle(config.bundle, shards=[probe.manifest.fog.node(node).shard], **_trust(config))
    _log_bundle(config, bundle)
    transport = _transport(config.broker, f"{config.fleet}-{config.cell}-{node}")
    service = FogNode(transport, Topics(config.fleet), bundle, cell=config.cell, node=node, settings=config.fog)
    return _serve(transport, service, health=config.health)


def cmd_cloud(args) -> int:
    config = load(args).config
    topics = Topics(config.fleet)
    trust = _trust(config)
    bundle = load_bundle(config.bundle, shards=None, **trust) if config.raw else \
        rollout_command.load_or_stored(config, ["cloud"], trust)
    _log_bundle(config, bundle)
    transport = _transport(config.broker, f"{config.fleet}-{config.name}", "cloud")
    from fogsplit.cloud.worker import CloudWorker, RawOffload
    worker = RawOffload(transport, topics, bundle, settings=config.cloud) if config.raw else \
        CloudWorker(transport, topics, bundle, worker=config.name, settings=config.cloud,
                    **rollout_command.rollout_kwargs(config, trust))
    return _serve(transport, worker, health=config.health)


def cmd_rollout(args) -> int:
    config = load(args).config
    transport = _transport(config.broker, f"rollout-{config.fleet}-{threading.get_ident()}")
    transport.connect()
    try:
        return rollout_command.run(transport, config)
    finally:
        transport.close()


def cmd_broker(args) -> int:
    config = load(args).config
    broker = EmbeddedBroker(port=config.port, host=config.host, kind=config.kind, data_dir=config.data_dir)
    with broker as url:
        print(f"embedded broker ({broker.kind}, pid {broker.pid}) on {url} (Ctrl+C to stop)", flush=True)
        _wait_for_signal()
    return 0


def cmd_watch(args) -> int:
    config = load(args).config
    topics = Topics(config.fleet)
    if not config.raw and config.count is None:
        from fogsplit.watch import run_watch   # rich: an optional extra, never on the device path
        transport = _transport(config.broker, f"watch-{threading.get_ident()}")
        try:
            run_watch(transport, topics, seconds=ONCE_S if args.once else config.seconds, wait=_wait_for_signal)
        finally:
            transport.close()
        return 0
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
    from fogsplit.demo import format_report, run_demo
    report = run_demo(data=args.data, broker=args.broker, events=args.events, rate=args.rate,
                      options=_export_options(args), workdir=args.workdir, fleet=args.fleet, cell=args.cell,
                      bundle=args.bundle, trusted_keys=[load_public_key(k) for k in args.trusted_key],
                      allow_unsigned=args.allow_unsigned)
    print(format_report(report))
    write_json(args.json, report)
    return 0


def _bench(module: str) -> Callable[[list[str]], int]:
    """A benchmark's ``main``, imported when it runs (prune imports torch; none is on the device path)."""
    def run(argv: list[str]) -> int:
        return importlib.import_module(f"fogsplit.bench.{module}").main(argv)
    return run


BENCH_MAINS = {name: _bench(name) for name in BENCHES}


def cmd_bench(args) -> int:
    """Each benchmark has its own ``main(argv)`` and flags."""
    return BENCH_MAINS[args.name](args.rest)


COMMANDS = {"demo": cmd_demo, "bench": cmd_bench, "data": cmd_data, "export": cmd_export, "device": cmd_device,
            "gateway": cmd_gateway, "cloud": cmd_cloud, "broker": cmd_broker, "watch": cmd_watch,
            "config": cmd_config, "keys": cmd_keys, "sign": cmd_sign, "acl": acl_command.run,
            "health": health_command.run, "pack": pack.run,
            "rollout": cmd_rollout, "fog": cmd_fog}


if __name__ == "__main__":
    sys.exit(main())
