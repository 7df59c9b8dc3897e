"""Pruning benchmark: how much of each network goes, what it costs in accuracy, how much faster
the shards run.

    fogsplit bench prune [--networks ddnn,vgg16] [--targets 0.5,0.762,0.8,0.9] [--json out.json]
                         [--quick] [--keep DIR]

``ddnn``: the project's multi-exit model on the built-in multi-view images, exported dense and
once per FLOPs target with ``export_bundle`` (sparsity training, pruning, fine-tuning, ONNX
parity); accuracy is the test accuracy of the exit cascade as deployed. ``vgg16``: VGG-16 with
CIFAR geometry on a single-view, 10-class variant of the images; trained dense once,
sparsity-trained once from the dense weights, then pruned per target and fine-tuned.

Latency: onnxruntime on one thread (intra- and inter-op), batch 1, the dense and the pruned
shard measured alternately in the same run after a warm-up; medians. For ``ddnn`` it is the sum
over all shards of one event (6 devices, gateway, cloud). The paper and neighbour figures are
printed beside the measured ones.
"""
from __future__ import annotations

import argparse
import copy
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fogsplit.bench.report import timed_main
from fogsplit.core.runner import ShardRunner
from fogsplit.export.datasets import load_data

log = logging.getLogger(__name__)

NETWORKS = ("ddnn", "vgg16")
TARGETS = (0.5, 0.762, 0.8, 0.9)
SEED_FIGURES = (
    {"source": "Shen et al., GLOBECOM 2020", "network": "VGG, CIFAR-10", "flops_cut": 0.762, "params_cut": 0.941,
     "accuracy": None},
    {"source": "HRank", "network": "VGG-16, CIFAR-10", "flops_cut": 0.765, "params_cut": None, "accuracy": 0.912},
    {"source": "Network Slimming", "network": "VGG-19, CIFAR-10", "flops_cut": None, "params_cut": 0.888,
     "accuracy": None},
)
VGG_SPARSITY = 1e-3
REQUIRED = ("network", "target", "flops_cut", "params_cut", "accuracy_dense", "accuracy_pruned", "ort_speedup")


def _targets(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None
    if not values or not all(0 < v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"targets must be fractions between 0 and 1, got {text!r}")
    return values


def _networks(text: str) -> tuple[str, ...]:
    names = tuple(text.split(","))
    unknown = set(names) - set(NETWORKS)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown networks {sorted(unknown)}; known: {', '.join(NETWORKS)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fogsplit bench prune", description=__doc__.split("\n")[0])
    p.add_argument("--networks", type=_networks, default=NETWORKS, help="comma-separated: ddnn,vgg16")
    p.add_argument("--targets", type=_targets, default=TARGETS, help="FLOPs cuts, comma-separated (default "
                   + ",".join(map(str, TARGETS)) + ")")
    p.add_argument("--epochs", type=int, default=None, help="DDNN training epochs (default 8; quick 2)")
    p.add_argument("--events", type=int, default=None, help="DDNN events (default 4000; quick 300)")
    p.add_argument("--vgg-epochs", type=int, default=None,
                   help="VGG dense training epochs (default 12; quick 1); sparsity and fine-tuning take half each")
    p.add_argument("--vgg-events", type=int, default=None, help="VGG images (default 7000; quick 300)")
    p.add_argument("--vgg-width", type=float, default=None,
                   help="channel width multiplier of VGG-16 (default 1; quick 0.25): only for wiring checks")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per shard (default 200; quick 20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny data and epochs: checks the wiring in minutes")
    p.add_argument("--keep", type=Path, help="keep the bundles and ONNX files here (default: a temporary directory)")
    p.add_argument("--json", type=Path, help="also write the results as JSON here")
    return p


def _settings(args) -> dict:
    quick = args.quick
    pick = lambda given, full, small: given if given is not None else (small if quick else full)  # noqa: E731
    settings = {"epochs": pick(args.epochs, 8, 2), "events": pick(args.events, 4000, 300),
                "vgg_epochs": pick(args.vgg_epochs, 12, 1), "vgg_events": pick(args.vgg_events, 7000, 300),
                "vgg_width": pick(args.vgg_width, 1.0, 0.25),
                "repeats": pick(args.repeats, 200, 20)}
    if not 0 < settings["vgg_width"] <= 1:
        raise ValueError(f"--vgg-width must be in (0, 1], got {settings['vgg_width']}")
    for name, value in settings.items():
        if value < 1 and name != "vgg_width":
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    return settings


def paired_latency_ms(dense: Path, pruned: Path, inputs: dict[str, np.ndarray], repeats: int) -> tuple[float, float]:
    """Median ms per run of the dense and the pruned shard on one thread, measured alternately."""
    runners = [ShardRunner(dense, threads=1), ShardRunner(pruned, threads=1)]
    for runner in runners:
        for _ in range(max(5, repeats // 10)):
            runner.run(**inputs)
    times: list[list[float]] = [[], []]
    for _ in range(repeats):
        for runner, spent in zip(runners, times):
            start = time.perf_counter()
            runner.run(**inputs)
            spent.append(time.perf_counter() - start)
    return tuple(1000 * float(np.median(t)) for t in times)


def _file_kb(path: Path) -> float:
    return round(path.stat().st_size / 1024, 1)


def _shard_inputs(shard, sample: np.ndarray | None, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Batch-1 inputs for a shard: a real sample for device shards, fixed random values otherwise."""
    if shard.tier == "device":
        return {"x": sample[None].astype(np.float32)}
    return {name: rng.standard_normal([1, *shape[1:]]).astype(np.float32) for name, shape in shard.inputs.items()}


def ddnn_rows(settings: dict, targets: tuple[float, ...], seed: int, workdir: Path) -> list[dict]:
    from fogsplit.export.pipeline import ExportOptions, export_bundle

    data = load_data("images", seed=seed, events=settings["events"])
    options = ExportOptions(epochs=settings["epochs"], seed=seed, progress=False)
    log.info("ddnn: dense export (%d events, %d epochs)", len(data), options.epochs)
    dense = export_bundle(data, workdir / "ddnn_dense", options)
    sample = data.test().sensors[data.sensor_names[0]][0]
    rows = []
    for target in targets:
        log.info("ddnn: export pruned to a FLOPs cut of %.3f", target)
        pruned = export_bundle(data, workdir / f"ddnn_flops{target}", ExportOptions(
            epochs=settings["epochs"], seed=seed, progress=False, target_flops=target))
        rows.append(_ddnn_row(dense, pruned, target, sample, settings["repeats"]))
    return rows


def _ddnn_row(dense, pruned, target: float, sample: np.ndarray, repeats: int) -> dict:
    rng = np.random.default_rng(0)
    shards = {}
    for shard in dense.manifest.shards:
        inputs = _shard_inputs(shard, sample, rng)
        dense_path, pruned_path = dense.path / shard.file, pruned.path / pruned.manifest.shard(shard.name).file
        ms = paired_latency_ms(dense_path, pruned_path, inputs, repeats)
        cut = pruned.manifest.compression["shards"][shard.name]
        shards[shard.name] = {"flops_cut": cut["flops_cut"], "params_cut": cut["params_cut"],
                              "ms_dense": round(ms[0], 4), "ms_pruned": round(ms[1], 4),
                              "ort_speedup": round(ms[0] / ms[1], 2),
                              "kb_dense": _file_kb(dense_path), "kb_pruned": _file_kb(pruned_path)}
    c, md, mp = pruned.manifest.compression, dense.manifest.metrics, pruned.manifest.metrics
    ms_dense = sum(s["ms_dense"] for s in shards.values())
    ms_pruned = sum(s["ms_pruned"] for s in shards.values())
    return {"network": "ddnn", "target": target, "flops_cut": c["flops_cut"], "params_cut": c["params_cut"],
            "accuracy_dense": md["test_cascade_accuracy"], "accuracy_pruned": mp["test_cascade_accuracy"],
            "cloud_exit_accuracy_dense": md["test_exit_accuracy"]["cloud"],
            "cloud_exit_accuracy_pruned": mp["test_exit_accuracy"]["cloud"],
            "ort_speedup": round(ms_dense / ms_pruned, 2),
            "ms_dense": round(ms_dense, 4), "ms_pruned": round(ms_pruned, 4),
            "onnx_kb_dense": round(sum(s["kb_dense"] for s in shards.values()), 1),
            "onnx_kb_pruned": round(sum(s["kb_pruned"] for s in shards.values()), 1),
            "bundle": str(pruned.path), "shards": shards}


def vgg_rows(settings: dict, targets: tuple[float, ...], seed: int, workdir: Path) -> list[dict]:
    from fogsplit.export.prune import PruneUnit, batchnorms, bn_l1_penalty, prune_to_target
    from fogsplit.export.shards import ShardPlan, write_shard
    from fogsplit.export.vgg import VGG, accuracy, scaled_cfg, single_view_shapes, train_classifier, vgg_layers

    torch.set_num_threads(min(2, torch.get_num_threads()))
    data = single_view_shapes(settings["vgg_events"], seed=seed)
    train, test = data.train(), data.test()
    x_train, y_train, x_test, y_test = train.sensors["cam0"], train.y, test.sensors["cam0"], test.y
    example = {"x": torch.from_numpy(x_test[:32]).float()}
    epochs = settings["vgg_epochs"]
    extra = max(1, epochs // 2)
    torch.manual_seed(seed)
    model = VGG(scaled_cfg(settings["vgg_width"]))
    seconds = train_classifier(model, x_train, y_train, epochs=epochs, seed=seed)
    acc_dense = accuracy(model, x_test, y_test)
    log.info("vgg16: dense %d epochs on %d images in %.0fs, test accuracy %.4f", epochs, len(y_train), seconds,
             acc_dense)
    dense_spec = write_shard(ShardPlan("vgg16_dense", "cloud", model, example, ("logits",)), workdir)
    sparse = copy.deepcopy(model)
    with bn_l1_penalty(batchnorms([PruneUnit("vgg16", sparse, example, vgg_layers(sparse))]), VGG_SPARSITY):
        seconds = train_classifier(sparse, x_train, y_train, epochs=extra, seed=seed + 1)
    log.info("vgg16: sparsity training %d epochs in %.0fs, test accuracy %.4f", extra, seconds,
             accuracy(sparse, x_test, y_test))
    rows = []
    for target in targets:
        pruned = copy.deepcopy(sparse)
        compression = prune_to_target([PruneUnit("vgg16", pruned, example, vgg_layers(pruned))], target)
        seconds = train_classifier(pruned, x_train, y_train, epochs=extra, lr=1e-3, seed=seed + 2)
        acc = accuracy(pruned, x_test, y_test)
        log.info("vgg16: target %.3f: FLOPs -%.1f%%, params -%.1f%%, fine-tuned %d epochs in %.0fs, accuracy %.4f",
                 target, 100 * compression.flops_cut, 100 * compression.params_cut, extra, seconds, acc)
        spec = write_shard(ShardPlan(f"vgg16_flops{target}", "cloud", pruned, example, ("logits",)), workdir)
        ms = paired_latency_ms(workdir / dense_spec.file, workdir / spec.file, {"x": x_test[:1].astype(np.float32)},
                               settings["repeats"])
        rows.append({"network": "vgg16", "target": target, "flops_cut": compression.flops_cut,
                     "params_cut": compression.params_cut, "accuracy_dense": round(acc_dense, 4),
                     "accuracy_pruned": round(acc, 4), "ort_speedup": round(ms[0] / ms[1], 2),
                     "ms_dense": round(ms[0], 4), "ms_pruned": round(ms[1], 4),
                     "onnx_kb_dense": _file_kb(workdir / dense_spec.file),
                     "onnx_kb_pruned": _file_kb(workdir / spec.file),
                     "flops_dense": dense_spec.flops, "flops_pruned": spec.flops,
                     "params_dense": dense_spec.params, "params_pruned": spec.params})
    return rows


def format_table(result: dict) -> str:
    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}%"

    lines = [f"{'network':<7} {'target':>7} {'FLOPs cut':>9} {'params cut':>10} {'acc dense':>9} {'acc pruned':>10} "
             f"{'ms dense':>9} {'ms pruned':>9} {'speed-up':>8} {'ONNX kB dense/pruned':>21}"]
    for r in result["rows"]:
        lines.append(f"{r['network']:<7} {pct(r['target']):>7} {pct(r['flops_cut']):>9} {pct(r['params_cut']):>10} "
                     f"{pct(r['accuracy_dense']):>9} {pct(r['accuracy_pruned']):>10} {r['ms_dense']:>9.3f} "
                     f"{r['ms_pruned']:>9.3f} {r['ort_speedup']:>7.2f}x "
                     f"{r['onnx_kb_dense']:>10.1f}/{r['onnx_kb_pruned']:.1f}")
    lines.append("seed figures (published, not measured here):")
    for s in result["seed_figures"]:
        lines.append(f"  {s['source']:<27} {s['network']:<17} FLOPs cut {pct(s['flops_cut']):>6}  "
                     f"params cut {pct(s['params_cut']):>6}  accuracy {pct(s['accuracy']):>6}")
    return "\n".join(lines)


def run(args) -> dict:
    settings = _settings(args)
    with tempfile.TemporaryDirectory(prefix="fogsplit-prune-") as tmp:
        workdir = args.keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        rows = []
        if "ddnn" in args.networks:
            rows += ddnn_rows(settings, args.targets, args.seed, workdir)
        if "vgg16" in args.networks:
            rows += vgg_rows(settings, args.targets, args.seed, workdir)
    return {"settings": {**settings, "seed": args.seed, "quick": args.quick, "threads": 1},
            "rows": rows, "seed_figures": list(SEED_FIGURES)}


def main(argv: list[str] | None = None) -> int:
    return timed_main(build_parser().parse_args(argv), run, format_table)


if __name__ == "__main__":
    raise SystemExit(main())
