"""build model -> train (-> prune -> fine-tune) -> calibrate -> split -> check -> write: the whole export."""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fogsplit.core.codecs import CodecSpec, calibrate_int8
from fogsplit.core.frames import FEATURE, REQUEST, SCORES, SLOT_MOD, encode_events_frame, encode_forward_frame, \
    encode_slot_frame
from fogsplit.core.wire import ALIAS_PROPERTY_BYTES, publish_packet_size
from fogsplit.core.topics import Topics
from fogsplit.core.dataset import Dataset
from fogsplit.core.manifest import CacheSpec, Manifest, SensorSpec, write_manifest
from fogsplit.core.settings import ExportOptions  # defined with every other setting; re-exported here

from fogsplit.export.cache_calibrate import calibrate_cache_threshold, calibrate_cell_threshold
from fogsplit.export.calibrate import calibrate_thresholds, simulate_cascade
from fogsplit.export.model import DDNN, ModelSpec, fuse_features
from fogsplit.export.prune import DDNN_LAYERS, Compression, PruneUnit, bn_l1_penalty, prune_to_target
from fogsplit.export.shards import ShardPlan, write_shard
from fogsplit.export.split import prune_to_budget
from fogsplit.export.fusion_weights import fit_fusion_weights, weighted_local
from fogsplit.export.train import logit_accuracy, predict, train

log = logging.getLogger(__name__)
SPARSITY = 1e-3     # L1 strength on the BatchNorm scales while training towards a pruning target
FINETUNE_LR = 0.01   # the training peak: a pruned network re-learns, it does not just adjust
FINETUNE_SHARE = 1.0  # fine-tuning epochs after pruning, as a share of the training epochs


@dataclass
class ExportReport:
    manifest: Manifest
    path: Path
    seconds: dict[str, float] = field(default_factory=dict)


def split_validation(train_set: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(train_set))
    n_val = max(1, int(round(len(train_set) * fraction)))
    return train_set.subset(np.sort(order[n_val:])), train_set.subset(np.sort(order[:n_val]))


def as_tensors(data: Dataset) -> list[torch.Tensor]:
    """Each sensor's samples as float32 ``[N, C, ...]``, in sensor order."""
    return [torch.from_numpy(a.astype(np.float32)) for a in data.arrays()]


def export_bundle(data: Dataset, out_dir: str | Path, options: ExportOptions | None = None) -> ExportReport:
    """Train on ``data``'s train split, export a verified bundle to ``out_dir``."""
    options = options or ExportOptions()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.onnx"):
        stale.unlink()
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    fit, val = split_validation(data.train(), options.val_fraction, options.seed)
    spec = ModelSpec.for_dataset(data, feature_channels=options.feature_channels,
                                 local_fusion=options.local_fusion, edge_fusion=options.edge_fusion,
                                 binary_feature=options.feature_codec == "sign")
    log.info("pooling plan: %s -> feature %s, edge feature %s",
             ", ".join(f"{s} {list(spec.shape_of(s))}" for s in spec.sensors), list(spec.feature_shape),
             list(spec.edge_feature_shape))
    torch.manual_seed(options.seed)
    model = DDNN(spec)
    pressure = bn_l1_penalty(prunable_batchnorms(model), SPARSITY) if options.prune_target \
        else contextlib.nullcontext()
    recipe = dict(seed=options.seed, augment=options.augment, flips=options.flips,
                  val=val if options.early_stop else None, progress=options.progress)
    with pressure:
        report = train(model, fit, epochs=options.epochs, steps=options.steps, **recipe)
    log.info("trained %d steps (%.1f epochs; best checkpoint at step %d) in %.1fs on %d samples",
             report.steps, report.epochs, report.best_step, time.perf_counter() - t0, len(fit))
    split_report = None
    if options.feature_bytes:
        model, split_report = prune_to_budget(model, fit, codec=options.feature_codec,
                                              budget_bytes=options.feature_bytes, steps=max(2, report.steps // 2),
                                              seed=options.seed, val=recipe["val"], progress=options.progress)
        spec = model.spec
    seconds["train"] = time.perf_counter() - t0
    compression = None
    if options.prune_target:
        t_prune = time.perf_counter()
        compression = prune(model, fit, val, options, steps=max(2, round(report.steps * FINETUNE_SHARE)))
        seconds["prune"] = time.perf_counter() - t_prune

    t1 = time.perf_counter()
    model.eval()
    codecs = calibrate_codecs(model, fit, options)
    val_logits = predict(model, val)
    trained_local = val_logits["local"]
    weights = fit_fusion_weights(val_logits["device"], val.y) if options.fusion_weights else None
    if weights is not None:
        val_logits["local"] = weighted_local(val_logits["device"], weights)
    validation = validation_report(spec.sensors, val_logits, val.y, weights, trained_local)
    costs = wire_costs(spec, codecs)
    point = calibrate_thresholds(val_logits, val.y, max_accuracy_drop=options.max_accuracy_drop,
                                 feature_cost=costs["request"] + len(spec.sensors) * costs["feature"],
                                 forward_cost=costs["forward"])
    log.info("exit thresholds local=%.3f edge=%.3f: validation accuracy %.4f, exits %s",
             point.local, point.edge, point.accuracy, {k: round(v, 3) for k, v in point.exit_fraction.items()})

    cache = calibrate_cache(model, val, val_logits, options)
    log.info("cache thresholds gateway=%.3f device=%.3f: held-out hit rate %.2f/%.2f, hit accuracy %.4f/%.4f",
             cache.gateway.threshold, cache.device.threshold, cache.gateway.hit_rate, cache.device.hit_rate,
             cache.gateway.hit_accuracy, cache.device.hit_accuracy)

    shards = [write_shard(plan, out) for plan in shard_plans(model, val)]
    seconds["export"] = time.perf_counter() - t1
    manifest = Manifest(
        model_id="", classes=data.classes,
        sensors=tuple(SensorSpec(name=s, kind=data.kind, shape=data.shapes[s],
                                 dtype="uint8" if data.sensors[s].dtype == np.uint8 else "float32")
                      for s in data.sensor_names),
        shards=tuple(shards), local_fusion="weighted" if weights is not None else spec.local_fusion,
        fusion_weights={s: round(float(w), 6) for s, w in zip(spec.sensors, weights)} if weights is not None else {},
        edge_fusion=spec.edge_fusion,
        thresholds={"local": point.local, "edge": point.edge}, codecs=codecs, dataset=data.name, cache=cache,
        metrics=test_metrics(model, data.test(), point.local, point.edge, weights) | validation | {
            "validation_accuracy": point.accuracy, "validation_exit_fraction": point.exit_fraction,
            "train_steps": report.steps, "train_best_step": report.best_step,
            "train_seconds": round(seconds["train"], 2)}
        | ({"prune_seconds": round(seconds["prune"], 2)} if "prune" in seconds else {})
        | ({"split_pruning": split_report} if split_report else {}),
        compression=compression.to_dict() if compression else {},
    )
    manifest = write_manifest(manifest, out)
    log.info("bundle %s written to %s (%s)", manifest.model_id, out,
             ", ".join(f"{s.name} {s.params} params" for s in shards))
    return ExportReport(manifest=manifest, path=out, seconds=seconds)


def prunable_batchnorms(model: DDNN) -> list[torch.nn.Module]:
    """The BatchNorm layers whose scales rank the prunable channels of every shard."""
    shards = [(shard, "device") for shard in model.devices.values()]
    shards += [(model.gateway, "gateway"), (model.cloud, "cloud")]
    return [shard.get_submodule(bn) for shard, tier in shards for _, bn in DDNN_LAYERS[tier]]


def prune_units(model: DDNN, val: Dataset) -> list[PruneUnit]:
    """Every shard as a pruning unit, with the layers :data:`DDNN_LAYERS` lets it lose."""
    return [PruneUnit(p.name, p.module, p.inputs, DDNN_LAYERS[p.tier]) for p in shard_plans(model, val)]


def prune(model: DDNN, fit: Dataset, val: Dataset, options: ExportOptions, steps: int) -> Compression:
    """The prune step between training and calibration: slim every shard to the target, fine-tune
    for ``steps``."""
    metric, target = options.prune_target
    compression = prune_to_target(prune_units(model, val), target, metric)
    train(model, fit, steps=steps, lr=FINETUNE_LR, seed=options.seed + 1, val=val if options.early_stop else None,
          augment=options.augment,
          flips=options.flips, progress=options.progress)
    log.info("pruned FLOPs -%.1f%%, params -%.1f%% (target: %s -%.1f%%), fine-tuned %d steps",
             100 * compression.flops_cut, 100 * compression.params_cut, metric, 100 * target, steps)
    return compression


def wire_costs(spec: ModelSpec, codecs: dict[str, CodecSpec]) -> dict[str, int]:
    """Bytes of each kind of data packet on the wire (MQTT 5 with topic aliases), measured by
    encoding real frames: what the threshold calibration trades off."""
    sensors = tuple(spec.sensors)
    feature = np.zeros(spec.feature_shape, np.float32)
    frames = {
        "scores": encode_slot_frame(SCORES, model="m", event=SLOT_MOD - 1, tensor=np.zeros(spec.num_classes),
                                    codec=codecs["scores"]),
        "feature": encode_slot_frame(FEATURE, model="m", event=SLOT_MOD - 1, tensor=feature, codec=codecs["feature"]),
        "request": encode_events_frame(REQUEST, model="m", events=[SLOT_MOD - 1], devices=sensors, sensors=sensors),
    }
    costs = {k: publish_packet_size("", len(f), 0, mqtt5=True, properties_len=ALIAS_PROPERTY_BYTES)
             for k, f in frames.items()}
    forward = encode_forward_frame(model="m", event=1 << 40, captured=1.7e9, devices=sensors, sensors=sensors,
                                   tensor=np.zeros(spec.edge_feature_shape, np.float32), codec=codecs["forward"])
    costs["forward"] = publish_packet_size(Topics("demo").forward("cell0"), len(forward), 1, mqtt5=True)
    return costs


def shard_plans(model: DDNN, val: Dataset, batch: int = 64) -> list[ShardPlan]:
    """The shards of ``model`` with real example inputs taken from ``val``."""
    xs = as_tensors(val.subset(np.arange(min(batch, len(val)))))
    plans = []
    features = []
    with torch.no_grad():
        for k, sensor in enumerate(model.spec.sensors):
            plans.append(ShardPlan(f"device_{sensor}", "device", model.devices[sensor], {"x": xs[k]},
                                   ("scores", "feature"), sensor=sensor))
            features.append(model.devices[sensor](xs[k])[1])
        present = torch.ones(xs[0].shape[0], len(features), dtype=torch.bool)
        fused = fuse_features(torch.stack(features, 1), present, model.spec.edge_fusion)
        edge_feature = model.gateway(fused)[1]
    plans.append(ShardPlan("gateway", "gateway", model.gateway, {"fused": fused}, ("logits", "edge_feature")))
    plans.append(ShardPlan("cloud", "cloud", model.cloud, {"edge_feature": edge_feature}, ("logits",)))
    return plans


def split_features(model: DDNN, data: Dataset) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What crosses each split for ``data``: device features ``[K, N, ...]``, the fused gateway
    input ``[N, ...]`` and the edge feature ``[N, ...]``."""
    xs = as_tensors(data)
    with torch.no_grad():
        feats = torch.stack([model.devices[s](xs[k])[1] for k, s in enumerate(model.spec.sensors)])
        present = torch.ones(len(data), len(model.spec.sensors), dtype=torch.bool)
        fused = fuse_features(feats.transpose(0, 1), present, model.spec.edge_fusion)
        edge = model.gateway(fused)[1]
    return feats, fused, edge


def calibrate_cache(model: DDNN, val: Dataset, val_logits: dict[str, np.ndarray],
                    options: ExportOptions) -> CacheSpec:
    """Cache thresholds for the gateway (fused feature) and the devices (own feature), on held-out
    data, for the cache's answers to lose at most ``cache_max_accuracy_loss`` against the model's."""
    feats, fused, _ = split_features(model, val)
    answers = val_logits["cloud"].argmax(1)
    own = list(val_logits["device"].argmax(2).T)
    common = dict(classes=model.spec.num_classes, k=1, min_agreement=1.0,
                  max_accuracy_loss=options.cache_max_accuracy_loss)
    return CacheSpec(k=options.cache_k, min_agreement=1.0, quorum=options.cache_quorum,
                     max_accuracy_loss=options.cache_max_accuracy_loss,
                     gateway=calibrate_cache_threshold(fused.numpy(), answers, val.y, **common),
                     device=calibrate_cell_threshold(list(feats.numpy()), own, answers, val.y,
                                                     quorum=options.cache_quorum, **common))


def calibrate_codecs(model: DDNN, data: Dataset, options: ExportOptions, limit: int = 512) -> dict[str, CodecSpec]:
    """Codec per stream; int8 scale and zero point from the model's outputs on training data."""
    xs = as_tensors(data.subset(np.arange(min(limit, len(data)))))
    with torch.no_grad():
        outs = [model.devices[s](xs[k]) for k, s in enumerate(model.spec.sensors)]
        feats = [f for _, f in outs]
        present = torch.ones(xs[0].shape[0], len(feats), dtype=torch.bool)
        edge = model.gateway(fuse_features(torch.stack(feats, 1), present, model.spec.edge_fusion))[1]
    samples = {"scores": torch.stack([s for s, _ in outs]).numpy(), "feature": torch.stack(feats).numpy(),
               "forward": edge.numpy()}
    codecs = {}
    for stream, name in (("scores", options.scores_codec), ("feature", options.feature_codec),
                         ("forward", options.forward_codec)):
        codecs[stream] = calibrate_int8(samples[stream]) if name == "int8" else CodecSpec(name)
    return codecs


def validation_report(sensors: tuple[str, ...], val_logits: dict[str, np.ndarray], y: np.ndarray,
                      weights: np.ndarray | None, trained_local: np.ndarray) -> dict:
    """Every exit's accuracy on validation (each device, local, edge, cloud; the local exit as
    the bundle fuses it), logged, and a warning when a fused exit falls below the best single
    device."""
    accuracy = logit_accuracy(val_logits, y, sensors)
    out = {"validation_exit_accuracy": accuracy}
    if weights is not None:
        trained = round(float((trained_local.argmax(1) == y).mean()), 4)
        out["validation_local_accuracy"] = {"trained": trained, "weighted": accuracy["local"]}
        log.info("fusion weights learnt on validation: %s", ", ".join(f"{s} {w:.2f}" for s, w in zip(sensors, weights)))
    log.info("validation accuracy (%d samples): %s; local %.4f, edge %.4f, cloud %.4f", len(y),
             ", ".join(f"{s} {a:.4f}" for s, a in accuracy["device"].items()),
             accuracy["local"], accuracy["edge"], accuracy["cloud"])
    best_device = max(accuracy["device"].values())
    below = {tier: accuracy[tier] for tier in ("local", "edge", "cloud") if accuracy[tier] < best_device}
    if below:
        log.warning("fused exits below the best single device (%.4f) on validation: %s", best_device,
                    ", ".join(f"{t} {a:.4f}" for t, a in below.items()))
        out["fusion_below_best_device"] = below
    return out


def test_metrics(model: DDNN, test: Dataset, local: float, edge: float,
                 weights: np.ndarray | None = None) -> dict:
    logits = predict(model, test)
    if weights is not None:
        logits["local"] = weighted_local(logits["device"], weights)
    acc = logit_accuracy(logits, test.y, model.spec.sensors)
    cascade, fractions = simulate_cascade(logits, test.y, local, edge)
    return {"test_exit_accuracy": {tier: acc[tier] for tier in ("local", "edge", "cloud")},
            "test_device_accuracy": acc["device"],
            "test_cascade_accuracy": round(cascade, 4),
            "test_exit_fraction": {k: round(float(v), 4) for k, v in fractions.items()}}

