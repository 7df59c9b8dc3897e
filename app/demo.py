"""The whole path in one process: every tier on its own MQTT connection, the test set
streamed through it, and a report of what came back."""
from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

from fogsplit.bench.embedded import EmbeddedBroker
from fogsplit.bench.harness import Outcome, single_device_accuracy, stream_test_set, summarize
from fogsplit.core.dataset import Dataset
from fogsplit.core.errors import BundleError
from fogsplit.core.manifest import load_bundle
from fogsplit.core.results import EXIT_TIERS
from fogsplit.core.signing import sign_ephemeral
from fogsplit.export.datasets import load_data

log = logging.getLogger(__name__)


def build_report(fog: Outcome, raw: Outcome, single: dict[str, float], lean: Outcome | None = None) -> dict:
    """``fog`` streamed in the reliable delivery mode, ``lean`` (if given) in the lean one."""
    report = summarize(fog)
    raw_summary = summarize(raw)
    report["delivery"] = "reliable"
    report["raw_bytes_per_event"] = raw_summary["bytes_per_event"]
    report["reduction"] = round(raw_summary["bytes_per_event"] / report["bytes_per_event"], 2) \
        if report["bytes_per_event"] else None
    if lean is not None:
        lean_summary = summarize(lean)
        report["lean"] = {"bytes_per_event": lean_summary["bytes_per_event"],
                          "reduction": round(raw_summary["bytes_per_event"] / lean_summary["bytes_per_event"], 2)
                          if lean_summary["bytes_per_event"] else None,
                          "accuracy": lean_summary["accuracy"]["overall"], "lost": lean_summary["lost"],
                          "duplicates": lean_summary["duplicates"]}
    report["single_device_accuracy"] = max(single.values())
    report["device_accuracy"] = single
    report["cloud_only_accuracy"] = raw_summary["accuracy"]["overall"]
    report["cloud_only"] = {k: raw_summary[k] for k in ("lost", "duplicates", "latency_ms")}
    report["bytes_by_topic"] = {k: v for k, v in sorted(fog.bytes_by_leaf.items())}
    return report


def check_matches(manifest, dataset: Dataset) -> None:
    """Refuse to stream a dataset whose sensors or classes are not the ones the bundle was built for."""
    if manifest.sensor_names != dataset.sensor_names:
        raise BundleError(f"the bundle's sensors {manifest.sensor_names} are not the data's {dataset.sensor_names}")
    for spec in manifest.sensors:
        shape = tuple(dataset.sensors[spec.name].shape[1:])
        if shape != tuple(spec.shape):
            raise BundleError(f"sensor {spec.name}: the bundle takes {list(spec.shape)}, the data has {list(shape)}")
    if list(manifest.classes) != list(dataset.classes):
        raise BundleError(f"the bundle's classes {list(manifest.classes)} are not the data's {list(dataset.classes)}")


def run_demo(*, data: str = "images", broker: str | None = None, events: int | None = None, rate: float = 25.0,
             options=None, workdir=None, fleet: str = "demo", cell: str = "cell0", seed: int = 0,
             bundle=None, trusted_keys=(), allow_unsigned: bool = False) -> dict:
    """Train, export, start the tiers against ``broker`` (an embedded one if None), stream, report.

    With ``bundle`` (a directory) nothing is trained: that bundle is streamed as it is, which is
    how a pruned or otherwise re-exported bundle is shown to run unchanged; it is loaded as a
    tier would load it (``trusted_keys``, ``allow_unsigned``). A bundle trained here is signed
    with a one-off key and loaded trusting that key alone."""
    from fogsplit.export.pipeline import ExportOptions, export_bundle  # torch: only when training

    options = options or ExportOptions(seed=seed)
    started = time.perf_counter()
    dataset = load_data(data, seed=options.seed, events=events)
    with tempfile.TemporaryDirectory(prefix="fogsplit-") as tmp:
        if bundle is None:
            bundle_dir = Path(workdir) / "bundle" if workdir else Path(tmp) / "bundle"
            train_seconds = export_bundle(dataset, bundle_dir, options).seconds["train"]
            trusted_keys, allow_unsigned = [sign_ephemeral(bundle_dir)], False
        else:
            bundle_dir, train_seconds = Path(bundle), 0.0
        bundle = load_bundle(bundle_dir, trusted_keys=trusted_keys, allow_unsigned=allow_unsigned)
        check_matches(bundle.manifest, dataset)
        test = dataset.test()
        embedded = None if broker else EmbeddedBroker().start()
        url = broker or embedded.url
        try:
            log.info("streaming %d test events at %.0f/s through %s", len(test), rate, url)
            fog = stream_test_set(url, bundle, test, fleet=fleet, cell=cell, rate=rate)
            log.info("streaming them again in the lean delivery mode (no spool, no acks)")
            lean = stream_test_set(url, bundle, test, fleet=fleet, cell=cell, rate=rate, delivery="lean")
            log.info("streaming them again as raw samples to the cloud-only model")
            raw = stream_test_set(url, bundle, test, policy="raw", fleet=fleet, cell=cell, rate=rate)
        finally:
            if embedded:
                embedded.stop()
        report = build_report(fog, raw, single_device_accuracy(bundle, test), lean)
    report = {"data": dataset.name, "model": bundle.manifest.model_id, "broker": f"embedded {embedded.kind}" if embedded else url,
              **report, "thresholds": bundle.manifest.thresholds,
              "seconds": {"train": round(train_seconds, 1), "total": round(time.perf_counter() - started, 1)}}
    return report


def format_report(r: dict) -> str:
    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}%"

    def lat(tier):
        v = r["latency_ms"][tier]
        return "-" if v is None else f"{v['p50']:.1f}/{v['p95']:.1f}/{v['p99']:.1f}"

    a, x = r["accuracy"], r["exit_fraction"]
    lines = [
        f"fogsplit demo: data {r['data']}, model {r['model']}, broker {r['broker']}",
        f"  events {r['events']}  results {r['results']}  lost {r['lost']}  duplicates {r['duplicates']}",
        f"  accuracy     overall {pct(a['overall'])}  " + "  ".join(f"{t} {pct(a[t])}" for t in EXIT_TIERS),
        "  exits        " + "  ".join(f"{t} {pct(x[t])}" for t in EXIT_TIERS),
        f"  bytes/event  {r['bytes_per_event']:.0f} reliable (reduction {r['reduction']}x)"
        + (f", {r['lean']['bytes_per_event']:.0f} lean ({r['lean']['reduction']}x, accuracy "
           f"{pct(r['lean']['accuracy'])}, lost {r['lean']['lost']})" if "lean" in r else "")
        + f"  raw offload {r['raw_bytes_per_event']:.0f}",
        "  latency ms   p50/p95/p99  " + "  ".join(f"{t} {lat(t)}" for t in EXIT_TIERS),
        f"  best single device {pct(r['single_device_accuracy'])}  cloud-only on raw data "
        f"{pct(r['cloud_only_accuracy'])}",
        f"  time         training {r['seconds']['train']}s, total {r['seconds']['total']}s",
    ]
    return "\n".join(lines)
