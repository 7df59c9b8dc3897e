"""Communication over a real broker: DDNN's accuracy-for-bytes trade-off, measured on the wire.

    fogsplit bench comm [--data images|series|FILE.npz] [--json out.json] [--plot out.png]

One data set, one broker, one run. Each setting is a bundle exported with its own codecs
(and, for the ``pruned`` setting, its split layer pruned to a byte budget); the same test
events are streamed through device agents, a gateway and a cloud worker for every local exit
threshold T of the sweep, and every MQTT PUBLISH packet is counted as it leaves its sender.

- ``raw offload``: every device publishes its raw sample; the cloud-only model (all shards in
  the cloud, float features) answers. Its accuracy is the bar.
- ``ddnn``: DDNN's choices: float32 scores, binarized (1-bit) features.
- ``fogsplit-sign``: int8 scores, 8 channels of 1-bit features from a binarized trunk.
- ``fogsplit-pruned``: int8 scores, int8 features of a split layer pruned from 8 channels to
  the same 64-byte budget (CCIED): narrow and precise against wide and coarse.

Then the cheapest point within 1 point of the cloud-only accuracy with 1..K devices (DDNN's
Table 4 shape), with each single device missing, and one-phase (features sent with the
scores) against two-phase (features on request) at ``--phase-threshold``: a threshold low
enough that some events go past the local exit, since at a point where none do the two
policies differ only in the features one-phase sends for nothing.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fogsplit.bench.flags import broker_url, positive
from fogsplit.bench.embedded import EmbeddedBroker
from fogsplit.bench.harness import stream_test_set, summarize
from fogsplit.bench.report import write_json
from fogsplit.core.manifest import Bundle, load_bundle
from fogsplit.core.signing import sign_ephemeral
from fogsplit.export.datasets import BUILTIN, load_data
from fogsplit.gateway.gateway import GatewaySettings

log = logging.getLogger(__name__)

DEFAULT_THRESHOLDS = (0.0, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
# Every setting is trained on the same data. At the export defaults (4000 events, 2720 of them
# for training, 8 epochs) the multi-exit models are data-starved: the binarized trunk's local
# exit got 0.967 on the test events, 0.995 with 8000 events and 12 epochs.
BENCH_EVENTS = 8000
BENCH_EPOCHS = 12
# DDNN (Teerapittayanon et al. 2017), MVMC with 6 devices, Table 3 at T = 0.8.
DDNN_PAPER = {"threshold": 0.8, "local_exit": 0.608, "accuracy": 0.97, "reduction_vs_raw": 20}


@dataclass(frozen=True)
class Setting:
    name: str
    options: dict        # ExportOptions fields
    feature_bytes: int | None = None   # prune the split layer to this many bytes per device


SETTINGS = (
    Setting("ddnn", {"scores_codec": "fp32", "feature_codec": "sign", "feature_channels": 4}),
    Setting("fogsplit-sign", {"scores_codec": "int8", "feature_codec": "sign", "feature_channels": 8}),
    Setting("fogsplit-pruned", {"scores_codec": "int8", "feature_codec": "int8", "feature_channels": 8},
            feature_bytes=64),
)
CLOUD_ONLY = Setting("cloud-only", {"scores_codec": "fp32", "feature_codec": "fp32", "feature_channels": 8})


def export_setting(setting: Setting, data, workdir: Path, *, epochs: int | None, seed: int) -> Bundle:
    from fogsplit.export.pipeline import ExportOptions, export_bundle
    options = ExportOptions(**setting.options, seed=seed, progress=False,
                            **({"epochs": epochs} if epochs else {}),
                            **({"feature_bytes": setting.feature_bytes} if setting.feature_bytes else {}))
    out = workdir / setting.name
    started = time.perf_counter()
    export_bundle(data, out, options)
    log.info("exported %s in %.0fs", setting.name, time.perf_counter() - started)
    return load_bundle(out, trusted_keys=[sign_ephemeral(out)])


def measure(url: str, bundle: Bundle, test, *, rate: float, policy: str = "request",
            local: float | None = None, missing: tuple[str, ...] = ()) -> dict:
    settings = GatewaySettings(local_threshold=local)
    outcome = stream_test_set(url, bundle, test, policy=policy, rate=rate, missing=missing,
                              gateway_settings=settings, fleet="bench")
    report = summarize(outcome)
    if report["lost"] or report["duplicates"]:
        log.warning("lost %d, duplicated %d events; devices dropped/skipped %s; gateway %s", report["lost"],
                    report["duplicates"], outcome.devices,
                    {k: outcome.gateway.get(k) for k in ("events", "exits", "degraded", "refused", "inbox_dropped",
                                                         "transport")})
    return report


def row(name: str, threshold: float | None, report: dict) -> dict:
    return {"name": name, "threshold": threshold, "accuracy": report["accuracy"]["overall"],
            "bytes_per_event": report["bytes_per_event"], "exit_fraction": report["exit_fraction"],
            "latency_ms": report["latency_ms"], "lost": report["lost"], "duplicates": report["duplicates"]}


def best_point(rows: list[dict], *, bar: float, raw_bytes: float) -> dict | None:
    """The cheapest measured row within 1 point of ``bar`` and with >= 75% answered below the
    cloud, if any: the point the issue's "done when" asks for."""
    good = [r for r in rows if r["accuracy"] >= bar - 0.01 and 1 - r["exit_fraction"]["cloud"] >= 0.75]
    if not good:
        return None
    best = min(good, key=lambda r: r["bytes_per_event"])
    return {**best, "reduction": round(raw_bytes / best["bytes_per_event"], 1)}


def run(args) -> dict:
    data = load_data(args.data, seed=args.seed,
                     events=args.events or (BENCH_EVENTS if args.data in BUILTIN else None))
    test = data.test()
    if args.test_events and args.test_events < len(test):
        test = test.subset(np.arange(args.test_events))
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    names = [s.name for s in SETTINGS]
    settings = [s for s in SETTINGS if s.name in (args.settings or names)]
    bundles = {s.name: export_setting(s, data, workdir, epochs=args.epochs, seed=args.seed)
               for s in (CLOUD_ONLY, *settings)}
    embedded = None if args.broker else EmbeddedBroker(kind=args.embedded).start()
    url = args.broker or embedded.url
    try:
        log.info("raw offload of %d events to the cloud-only model", len(test))
        raw = measure(url, bundles[CLOUD_ONLY.name], test, rate=args.rate, policy="raw")
        out: dict = {"data": data.name, "events": len(test), "rate": args.rate,
                     "broker": f"embedded {embedded.kind}" if embedded else url,
                     "raw_offload": {"accuracy": raw["accuracy"]["overall"], "bytes_per_event": raw["bytes_per_event"],
                                     "latency_ms": raw["latency_ms"]["cloud"]},
                     "cloud_only_accuracy": raw["accuracy"]["overall"], "settings": [], "ddnn_paper": DDNN_PAPER}
        for s in settings:
            bundle = bundles[s.name]
            out.setdefault("calibrated_thresholds", {})[s.name] = bundle.manifest.thresholds
            out.setdefault("feature_bytes", {})[s.name] = bundle.manifest.feature_payload_bytes
            for t in args.thresholds:
                log.info("%s at local threshold %.2f", s.name, t)
                out["settings"].append(row(s.name, t, measure(url, bundle, test, rate=args.rate, local=t)))
        out["best"] = best_point([r for r in out["settings"] if r["name"] != "ddnn"],
                                 bar=out["cloud_only_accuracy"], raw_bytes=out["raw_offload"]["bytes_per_event"])
        name = out["best"]["name"] if out["best"] else settings[-1].name
        main = bundles[name]
        local = out["best"]["threshold"] if out["best"] else None
        out["operating_point"] = {"setting": name, "threshold": local if local is not None else
                                  main.manifest.thresholds["local"]}
        sensors = main.manifest.sensor_names
        phase_t = args.phase_threshold
        two = measure(url, main, test, rate=args.rate, local=phase_t)
        one = measure(url, main, test, rate=args.rate, local=phase_t, policy="eager")
        out["phases"] = {"two_phase": row(f"{name} two-phase", phase_t, two),
                         "one_phase": row(f"{name} one-phase", phase_t, one)}
        out["devices_curve"] = []
        for n in range(1, len(sensors) + 1):
            r = measure(url, main, test, rate=args.rate, local=local, missing=tuple(sensors[n:]))
            out["devices_curve"].append({"devices": n, "accuracy": r["accuracy"]["overall"],
                                         "bytes_per_event": r["bytes_per_event"],
                                         "exit_fraction": r["exit_fraction"]})
        out["missing_device"] = {}
        for sensor in sensors:
            r = measure(url, main, test, rate=args.rate, local=local, missing=(sensor,))
            out["missing_device"][sensor] = {"accuracy": r["accuracy"]["overall"],
                                             "bytes_per_event": r["bytes_per_event"]}
    finally:
        if embedded:
            embedded.stop()
    return out


def format_table(out: dict) -> str:
    raw = out["raw_offload"]
    lines = [f"fogsplit bench comm: {out['data']}, {out['events']} test events, broker {out['broker']}",
             f"raw offload: accuracy {raw['accuracy']:.3f}, {raw['bytes_per_event']:.0f} bytes/event",
             f"{'setting':<16} {'T':>5} {'local':>6} {'edge':>6} {'cloud':>6} {'accuracy':>8} {'bytes/ev':>9} "
             f"{'x raw':>7}"]
    for r in out["settings"]:
        x = r["exit_fraction"]
        lines.append(f"{r['name']:<16} {r['threshold']:>5.2f} {x['local']:>6.1%} {x['edge']:>6.1%} {x['cloud']:>6.1%} "
                     f"{r['accuracy']:>8.3f} {r['bytes_per_event']:>9.1f} "
                     f"{raw['bytes_per_event'] / r['bytes_per_event']:>7.1f}")
    p = out["phases"]
    for key in ("two_phase", "one_phase"):
        r = p[key]
        lat = r["latency_ms"]
        lines.append(f"{r['name']:<26} T={r['threshold']:.2f} accuracy {r['accuracy']:.3f}  "
                     f"{r['bytes_per_event']:.1f} bytes/event  "
                     f"latency p50 local {_p50(lat['local'])} edge {_p50(lat['edge'])} cloud {_p50(lat['cloud'])} ms")
    op = out["operating_point"]
    lines.append(f"at {op['setting']}, T={op['threshold']}:")
    lines.append("devices  " + "  ".join(f"{d['devices']}: {d['accuracy']:.3f}" for d in out["devices_curve"]))
    lines.append("missing  " + "  ".join(f"{k}: {v['accuracy']:.3f}" for k, v in out["missing_device"].items()))
    b = out["best"]
    lines.append("best     " + ("none within 1 point of the cloud-only model with 75% below the cloud" if b is None else
                                f"{b['name']} at T={b['threshold']}: accuracy {b['accuracy']:.3f} "
                                f"(cloud-only {out['cloud_only_accuracy']:.3f}), {b['bytes_per_event']:.1f} bytes/event, "
                                f"{b['reduction']}x below raw offload, "
                                f"{1 - b['exit_fraction']['cloud']:.1%} answered below the cloud"))
    return "\n".join(lines)


def _p50(v: dict | None) -> str:
    return "-" if v is None else f"{v['p50']:.1f}"


def plot(out: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(r["name"] for r in out["settings"]):
        rows = sorted((r for r in out["settings"] if r["name"] == name), key=lambda r: r["bytes_per_event"])
        ax.plot([r["bytes_per_event"] for r in rows], [r["accuracy"] for r in rows], "o-", label=name)
    raw = out["raw_offload"]
    ax.plot([raw["bytes_per_event"]], [raw["accuracy"]], "k*", markersize=12, label="raw offload (cloud-only)")
    ax.axvline(raw["bytes_per_event"] / 100, color="grey", linestyle=":", label="100x below raw")
    ax.set_xscale("log")
    ax.set_xlabel("bytes per event on the wire (whole MQTT packets)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{out['data']}: accuracy against communication, local threshold swept")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _thresholds(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None
    if not values or not all(0 <= v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"thresholds {text!r} must all lie in [0, 1]")
    return values


def _thresholds_one(text: str) -> float:
    values = _thresholds(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"one threshold, got {text!r}")
    return values[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fogsplit bench comm", description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="images", help="images, series, or a .npz file (default images)")
    parser.add_argument("--events", type=positive(int),
                        help=f"events the built-in generator makes (default {BENCH_EVENTS})")
    parser.add_argument("--test-events", type=positive(int), default=600,
                        help="test events streamed per measurement (default 600)")
    parser.add_argument("--epochs", type=positive(int), default=BENCH_EPOCHS,
                        help=f"training epochs per setting (default {BENCH_EPOCHS})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rate", type=positive(float), default=40.0, help="captures per second (default 40)")
    parser.add_argument("--thresholds", type=_thresholds, default=DEFAULT_THRESHOLDS,
                        help="local exit thresholds to sweep, comma-separated")
    parser.add_argument("--phase-threshold", type=_thresholds_one, default=0.2,
                        help="local exit threshold at which one- and two-phase are compared (default 0.2)")
    parser.add_argument("--settings", nargs="+", choices=[s.name for s in SETTINGS],
                        help="which settings (default all)")
    parser.add_argument("--broker", type=broker_url, help="an external broker instead of an embedded one")
    parser.add_argument("--embedded", choices=["auto", "mosquitto", "rumqttd"], default="auto",
                        help="which embedded broker (default auto: Mosquitto if installed)")
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench-comm"), help="where the bundles go")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--plot", type=Path, help="write the accuracy-against-bytes PNG here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("fogsplit.core.mqtt", "fogsplit.gateway", "fogsplit.device", "fogsplit.cloud", "fogsplit.bench.embedded",
                  "fogsplit.export", "iotcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    out = run(args)
    print(format_table(out))
    write_json(args.json, out, "figures")
    if args.plot:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot(out, args.plot)
        print(f"plot written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
