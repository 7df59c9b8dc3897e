"""Real sensor data beside the classic baselines: fogsplit on the UEA archive and the built-in sets.

    fogsplit bench data [--datasets BasicMotions,JapaneseVowels,images,series] [--json out.json]

For each data set, in one run and on the same train/test split:

- ``fogsplit``: a bundle exported with the export defaults, its test set streamed through
  device agents, a gateway and a cloud worker over a real broker: overall accuracy (what the
  application received), bytes per event on the wire, lost events; the bundle's own per-exit
  and per-device test accuracies from its manifest; ``best_single_device`` is the best device
  exit alone.
- ``cloud_only``: the raw-offload baseline of ``fogsplit bench comm`` (the same export settings,
  the same streaming): every device publishes its raw sample and the whole network runs in
  the cloud. ``reduction`` is its bytes per event over fogsplit's.
- ``nn_euclidean``, ``nn_dtw``, ``minirocket``: 1-NN Euclidean, 1-NN DTW and MiniRocket with a
  ridge classifier on the raw samples of all sensors together (bench/baselines.py; aeon).

The archive sets come from the ``.ts`` files in the aeon wheel (export/uea.py), with the
archive's own split; the built-in sets are generated with ``--events`` events.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from fogsplit.bench.baselines import NAMES as BASELINES, classic_baselines
from fogsplit.bench.comm import CLOUD_ONLY, Setting, export_setting, measure
from fogsplit.bench.embedded import KINDS, EmbeddedBroker
from fogsplit.bench.flags import broker_url, positive, unit_interval
from fogsplit.bench.report import write_json
from fogsplit.core.dataset import Dataset
from fogsplit.core.errors import FogsplitError
from fogsplit.core.settings import ExportOptions
from fogsplit.export.datasets import BUILTIN, load_data
from fogsplit.export.uea import PRESETS

log = logging.getLogger(__name__)

ARCHIVE = tuple(PRESETS)                 # BasicMotions, JapaneseVowels
DATASETS = (*ARCHIVE, *BUILTIN)
BUILTIN_EVENTS = 2000    # events per built-in set: keeps a full run near 10 minutes on 2 cores
SERIES_ONLY = ("nn_dtw", "minirocket")
METHOD = {
    "cloud_only": "raw offload: every device publishes its raw sample, the whole network runs in the cloud "
                  "(a bundle exported with fp32 codecs, as in fogsplit bench comm)",
    "nn_euclidean": "1-nearest-neighbour, Euclidean, all sensors' channels together, each channel z-normalised "
                    "with the training split's statistics, NaN (missing, padding) -> 0",
    "nn_dtw": "1-nearest-neighbour, dependent DTW (aeon), same preparation",
    "minirocket": "aeon MiniRocketClassifier (10,000 kernels, RidgeClassifierCV), seeded; same preparation, "
                  "so variable-length series are zero-padded (the channel mean) after their end",
}


def load(name: str, *, events: int, seed: int) -> Dataset:
    if name in BUILTIN:
        return load_data(name, seed=seed, events=events)
    return load_data(name if name.endswith(".ts") or name.startswith("uea:") else f"uea:{name}")


def capped(data: Dataset, test_events: int | None, seed: int) -> Dataset:
    """``data`` with at most ``test_events`` test samples, drawn at random (the archive files
    are sorted by class): every figure of a data set is measured on the same test samples."""
    test = np.flatnonzero(data.split == 1)
    if not test_events or test_events >= len(test):
        return data
    drawn = np.random.default_rng(seed).choice(test, test_events, replace=False)
    return data.subset(np.sort(np.concatenate([np.flatnonzero(data.split == 0), drawn])))


def describe(data: Dataset) -> dict:
    out = {"kind": data.kind, "classes": len(data.classes), "train": int((data.split == 0).sum()),
           "test": int((data.split == 1).sum()),
           "sensors": {k: list(v.shape[1:]) for k, v in data.sensors.items()}}
    if data.kind == "series":      # a series ends after its last finite step (NaN after the end)
        ends = [v.shape[-1] - np.argmax(np.isfinite(v).any(axis=1)[:, ::-1], axis=-1) for v in data.sensors.values()]
        lengths = np.max(ends, axis=0)
        out["lengths"] = [int(lengths.min()), int(lengths.max())]
    return out


def fogsplit_figures(url: str, data: Dataset, workdir: Path, args, extra: dict) -> dict:
    """Export with the defaults, stream the test set; then the cloud-only model on raw data."""
    test = data.test()
    log.info("%s: fogsplit and cloud-only bundles, %d test events streamed at %g/s each", data.name, len(test),
             args.rate)
    bundle = export_setting(Setting("fogsplit", dict(extra)), data, workdir, epochs=args.epochs, seed=args.seed)
    report = measure(url, bundle, test, rate=args.rate)
    metrics = bundle.manifest.metrics
    devices = metrics.get("test_device_accuracy", {})
    best = max(devices, key=devices.get) if devices else None
    cloud = bundle if args.cloud_only == "same" else export_setting(
        Setting(CLOUD_ONLY.name, {**CLOUD_ONLY.options, **extra}), data, workdir, epochs=args.epochs, seed=args.seed)
    raw = measure(url, cloud, test, rate=args.rate, policy="raw")
    return {
        "accuracy": report["accuracy"]["overall"],
        "exit_accuracy": metrics.get("test_exit_accuracy"),
        "exit_fraction": report["exit_fraction"],
        "device_accuracy": devices,
        "best_single_device": devices.get(best), "best_device": best,
        "validation_accuracy": metrics.get("validation_accuracy"),
        "cloud_only": raw["accuracy"]["overall"],
        "bytes_per_event": report["bytes_per_event"],
        "raw_bytes_per_event": raw["bytes_per_event"],
        "reduction": round(raw["bytes_per_event"] / report["bytes_per_event"], 1) if report["bytes_per_event"] else None,
        "lost": report["lost"], "duplicates": report["duplicates"],
        "cloud_only_lost": raw["lost"],
        "thresholds": bundle.manifest.thresholds,
        "train_seconds": {"fogsplit": metrics.get("train_seconds"),
                          "cloud_only": cloud.manifest.metrics.get("train_seconds")},
    }


def baseline_figures(data: Dataset, args) -> dict:
    scores = classic_baselines(data, seed=args.seed, dtw_window=args.dtw_window)
    out: dict = {name: scores[name].accuracy for name in BASELINES}
    out["baseline_seconds"] = {name: s.seconds for name, s in scores.items() if s.accuracy is not None}
    reasons = {name: s.reason for name, s in scores.items() if s.reason}
    if reasons:
        out["baseline_null"] = reasons
    return out


def run_dataset(name: str, url: str, args, extra: dict) -> dict:
    started = time.perf_counter()
    data = capped(load(name, events=args.events, seed=args.seed), args.test_events, args.seed)
    row: dict = {"name": data.name, "spec": name, **describe(data)}
    log.info("%s: %d train, %d test, sensors %s", data.name, row["train"], row["test"], row["sensors"])
    row.update(baseline_figures(data, args))
    try:
        row.update(fogsplit_figures(url, data, Path(args.workdir) / data.name, args, extra))
    except (FogsplitError, ValueError, RuntimeError) as exc:
        # the baselines still stand; the row says why fogsplit has no figures
        log.error("%s: fogsplit failed: %s", data.name, exc)
        row["error"] = f"{type(exc).__name__}: {exc}"
    row["seconds"] = round(time.perf_counter() - started, 1)
    return row


def start_broker(spec: str) -> tuple[str, EmbeddedBroker | None]:
    """``auto``, ``mosquitto``, ``rumqttd`` (or ``embedded``: rumqttd) start a broker; a URL is used as is."""
    if "://" in spec:
        return spec, None
    broker = EmbeddedBroker(kind="rumqttd" if spec == "embedded" else spec).start()
    return broker.url, broker


def run(args) -> dict:
    extra = dict(args.export_option or [])
    url, broker = start_broker(args.broker)
    out: dict = {"datasets": [], "seed": args.seed, "rate": args.rate,
                 "broker": f"embedded {broker.kind}" if broker else url,
                 "epochs": args.epochs, "export_options": extra, "cloud_only_bundle": args.cloud_only,
                 "method": METHOD}
    try:
        for name in args.datasets:
            out["datasets"].append(run_dataset(name, url, args, extra))
    finally:
        if broker:
            broker.stop()
    return out


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_table(out: dict) -> str:
    cols = ("accuracy", "best_single_device", "cloud_only", "nn_euclidean", "nn_dtw", "minirocket")
    heads = ("fogsplit", "best dev", "cloud", "1NN-ED", "1NN-DTW", "MiniRkt")
    lines = [f"fogsplit bench data: broker {out['broker']}, seed {out['seed']}",
             f"{'data set':<16} " + " ".join(f"{h:>8}" for h in heads) + f" {'bytes/ev':>9} {'x raw':>6} {'lost':>5}"]
    for r in out["datasets"]:
        cells = " ".join(f"{_pct(r.get(c)):>8}" for c in cols)
        wire = (f" {r['bytes_per_event']:>9.1f} {r['reduction']:>6.1f} {r['lost']:>5}" if "bytes_per_event" in r
                else f"  fogsplit failed: {r.get('error', '?')}")
        lines.append(f"{r['name']:<16} {cells}{wire}")
        if r.get("exit_accuracy"):
            lines.append(f"{'':<16} exits " + "  ".join(f"{k} {v:.3f}" for k, v in r["exit_accuracy"].items())
                         + "   devices " + "  ".join(f"{k} {v:.3f}" for k, v in r["device_accuracy"].items()))
    return "\n".join(lines)


def _datasets(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    bad = [n for n in names if n not in DATASETS and not n.endswith("_TRAIN.ts") and not n.startswith("uea:")]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"{bad or text!r}: each must be one of {', '.join(DATASETS)} "
                                         "or a path to a <Name>_TRAIN.ts")
    return names


def _broker(text: str) -> str:
    if text in (*KINDS, "embedded"):
        return text
    return broker_url(text)


def _option(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` of ExportOptions; the value read as JSON when it is JSON (numbers, true), else text."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE (an ExportOptions field, e.g. epochs=20)")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def check_export_options(parser: argparse.ArgumentParser, extra: dict) -> None:
    """Refuse a bad ``--export-option`` before anything is trained."""
    owned = {"seed", "progress", "epochs"} & set(extra)
    if owned:
        parser.error(f"--export-option {sorted(owned)}: given by --seed and --epochs, or fixed by the bench")
    try:
        ExportOptions(**extra)
    except (TypeError, FogsplitError, ValueError) as exc:
        parser.error(f"--export-option: {exc}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fogsplit bench data", description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", type=_datasets, default=DATASETS,
                        help=f"comma-separated (default {','.join(DATASETS)}); also uea:<Name> of another set "
                             "in the aeon wheel or a path to a <Name>_TRAIN.ts")
    parser.add_argument("--events", type=positive(int), default=BUILTIN_EVENTS,
                        help=f"events of each built-in set (default {BUILTIN_EVENTS})")
    parser.add_argument("--test-events", type=positive(int),
                        help="at most this many test samples per data set (default all)")
    parser.add_argument("--epochs", type=positive(int), help="training epochs per bundle (default: the export's)")
    parser.add_argument("--export-option", type=_option, action="append", metavar="KEY=VALUE",
                        help="an ExportOptions field for both bundles (e.g. a training budget); repeatable")
    parser.add_argument("--dtw-window", type=unit_interval,
                        help="DTW warping window as a fraction of the length (default: unconstrained)")
    parser.add_argument("--cloud-only", choices=["separate", "same"], default="separate",
                        help="the raw-offload baseline's bundle: separate (trained with float codecs, as in bench "
                             "comm; default) or same (fogsplit's own bundle run whole in the cloud: half the training)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rate", type=positive(float), default=40.0, help="captures per second (default 40)")
    parser.add_argument("--broker", type=_broker, default="auto",
                        help="auto (Mosquitto if installed, else rumqttd), mosquitto, rumqttd or embedded "
                             "(the rumqttd of the iotcore wheel), or the URL of a running broker")
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench-data"), help="where the bundles go")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    check_export_options(parser, dict(args.export_option or []))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("fogsplit.core.mqtt", "fogsplit.gateway", "fogsplit.device", "fogsplit.cloud",
                  "fogsplit.bench.embedded", "fogsplit.export", "iotcore", "numba"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    out = run(args)
    print(format_table(out))
    write_json(args.json, out, "figures")
    return 1 if any("error" in r for r in out["datasets"]) else 0


if __name__ == "__main__":
    sys.exit(main())
