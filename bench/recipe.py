"""What each part of the training recipe buys: the same export with one part taken away.

    fogsplit bench recipe [--datasets uea:BasicMotions,uea:JapaneseVowels,series] [--json F]

Per data set, in one run and with one seed, the bundle's test accuracy (the early-exit cascade
the gateway runs, and every exit), exported with:

- ``recipe``: the defaults (budget in steps, best checkpoint on validation, augmentation,
  fusion weights learnt on validation);
- ``no augmentation``, ``no early stop``, ``no fusion weights``: one part off;
- ``8 epochs``: the fixed budget the recipe replaced (8 passes, whatever the set's size);
- ``before``: all of it off, the recipe as it was.

No broker is involved: the figures are the export's own test metrics (manifest.metrics), the
same model and thresholds that the tiers run. docs/training.md quotes a run.
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from fogsplit.bench.report import write_json
from fogsplit.core.settings import ExportOptions
from fogsplit.export.datasets import load_data
from fogsplit.export.pipeline import export_bundle

log = logging.getLogger(__name__)

VARIANTS: dict[str, dict] = {
    "recipe": {},
    "no augmentation": {"augment": False},
    "no early stop": {"early_stop": False},
    "no fusion weights": {"fusion_weights": False},
    "8 epochs": {"epochs": 8},
    "before": {"epochs": 8, "augment": False, "early_stop": False, "fusion_weights": False},
}
DEFAULT_DATASETS = "uea:BasicMotions,uea:JapaneseVowels,series"


def run_variant(data, options: ExportOptions, workdir: Path) -> dict:
    start = time.perf_counter()
    manifest = export_bundle(data, workdir, options).manifest
    m = manifest.metrics
    return {"accuracy": m["test_cascade_accuracy"], "exit_accuracy": m["test_exit_accuracy"],
            "best_single_device": max(m["test_device_accuracy"].values()),
            "validation_exit_accuracy": m["validation_exit_accuracy"], "steps": m["train_steps"],
            "best_step": m["train_best_step"], "seconds": round(time.perf_counter() - start, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fogsplit bench recipe", description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default=DEFAULT_DATASETS,
                   help=f"comma-separated: images, series, a .npz, uea:NAME (default {DEFAULT_DATASETS})")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of: " + ", ".join(VARIANTS))
    p.add_argument("--events", type=int, default=None, help="events of the built-in sets (default theirs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the report here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    report: dict = {"seed": args.seed, "datasets": []}
    with tempfile.TemporaryDirectory(prefix="fogsplit-recipe-") as tmp:
        for name in [d.strip() for d in args.datasets.split(",") if d.strip()]:
            data = load_data(name, seed=args.seed, events=args.events)
            row = {"name": name, "train": len(data.train()), "test": len(data.test()), "variants": {}}
            for variant in variants:
                options = ExportOptions(seed=args.seed, progress=False, **VARIANTS[variant])
                row["variants"][variant] = run_variant(data, options, Path(tmp) / f"{len(report['datasets'])}-{variant}")
                got = row["variants"][variant]
                print(f"{name:24s} {variant:18s} accuracy {got['accuracy']:.4f}  exits {got['exit_accuracy']}  "
                      f"best device {got['best_single_device']:.4f}  {got['steps']} steps  {got['seconds']} s",
                      flush=True)
            report["datasets"].append(row)
    if args.json:
        write_json(args.json, report)
    return 0
