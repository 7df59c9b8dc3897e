"""EDDL: the DDNN's edge part as BIBD grouped layers shared out over fog nodes.

::

    fused device features [B, C, H, W]      (C channels in v input groups: the design's points)
      node n: its slice (the groups its blocks hold)
        per block j: conv over the gathered groups of j -> pool -> BN -> ReLU     (BIBD layer)
        conv over the node's own blocks' outputs        -> BN -> ReLU              (stacked on them)
        head n: global pool -> linear                 -> node logits
      full head: global pool of every block           -> full logits
      edge feature for the cloud: the blocks' outputs side by side (zeros for a lost node)

Each block's convolution sees only the k of v input groups of its block, so the layer costs
k / v of a dense one and a node holding a share of the blocks a share of that: FLOPs and
parameters fall for real (one small convolution per block over gathered channels, no mask).
The second layer mixes only the node's own blocks, so no node ever needs another's output.
The edge answer is the mean of the logits of the nodes that answered.

Training is on frozen device features from a trained bundle (its ONNX device shards), so the
bundle's device, gateway and cloud shards stay as they are: the loss is the sum of every node
head's cross-entropy and the full head's, plus the distance of the edge feature to the one the
bundle's gateway gives, so that the bundle's cloud shard still reads what the nodes forward.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fogsplit.core.codecs import calibrate_int8
from fogsplit.core.dataset import Dataset
from fogsplit.core.fusion import fuse, with_local
from fogsplit.core.manifest import FogNodeSpec, FogSpec, Manifest, check_bundle_contents, write_manifest
from fogsplit.core.runner import ShardRunner
from fogsplit.core.settings import ExportOptions
from fogsplit.export.bibd import Block, Design, design as make_design, partition_blocks, random_blocks, split_sizes
from fogsplit.export.model import _conv_block, _global_pool
from fogsplit.export.pipeline import split_validation
from fogsplit.export.shards import ShardPlan, count_cost, write_shard

log = logging.getLogger(__name__)

FOG_TIER = "fog"
EPOCHS = 40
BATCH = 64
LR = 0.01
NODE_DROPOUT = 0.5       # each node lost at random for the ensemble, the full head and the edge feature
DISTILL = 10.0           # weight of the edge feature's distance to the bundle gateway's (docs/eddl.md)
ENSEMBLE = 3.0           # weight of the loss of the ensemble of the nodes left by node dropout
HIDDEN = 2               # the BIBD layer's width, in edge-feature widths (docs/eddl.md: stronger node heads)


@dataclass(frozen=True)
class Layout:
    """Where every channel goes: input groups over the fused channels, blocks over nodes."""

    kind: str                        # "image" | "series"
    groups: tuple[tuple[int, ...], ...]   # fused channel indices of each input group (point)
    blocks: tuple[Block, ...]
    nodes: tuple[tuple[int, ...], ...]    # block indices of each node
    hidden: tuple[int, ...]          # channels of each block after the BIBD layer
    out: tuple[int, ...]             # channels of each block in the edge feature
    num_classes: int

    def node_channels(self, n: int) -> list[int]:
        """The node's input slice: fused channels of the groups its blocks hold, in order."""
        return sorted({c for j in self.nodes[n] for p in self.blocks[j] for c in self.groups[p]})

    def node_features(self, n: int) -> list[int]:
        """The edge-feature channels the node fills (blocks laid out node by node)."""
        start = sum(self.out[j] for m in range(n) for j in self.nodes[m])
        return list(range(start, start + sum(self.out[j] for j in self.nodes[n])))

    @property
    def edge_channels(self) -> int:
        return sum(self.out)


def make_layout(kind: str, fused_channels: int, edge_channels: int, num_classes: int, blocks, v: int,
                nodes: int) -> Layout:
    """Input groups as even as the channel count allows; ``edge_channels`` shared over the
    blocks as the edge feature's width, :data:`HIDDEN` times that as the BIBD layer's."""
    sizes = split_sizes(fused_channels, v)
    starts = np.cumsum([0, *sizes])
    groups = tuple(tuple(range(int(starts[i]), int(starts[i + 1]))) for i in range(v))
    blocks = tuple(tuple(b) for b in blocks)
    parts = tuple(tuple(p) for p in partition_blocks(blocks, nodes))
    widths = tuple(split_sizes(edge_channels, len(blocks)))
    return Layout(kind, groups, blocks, parts, tuple(HIDDEN * w for w in widths), widths, num_classes)


class NodeModule(nn.Module):
    """What one fog node runs: its blocks of the BIBD layer on its input slice, a layer over
    their outputs, and its own head.

    Takes the slice ``[B, len(node_channels), ...]``; returns (logits, feature), the feature
    being its part of the edge feature."""

    def __init__(self, layout: Layout, n: int) -> None:
        super().__init__()
        channels = layout.node_channels(n)
        position = {c: i for i, c in enumerate(channels)}
        self.block_ids = list(layout.nodes[n])
        for i, j in enumerate(self.block_ids):
            index = [position[c] for p in layout.blocks[j] for c in layout.groups[p]]
            self.register_buffer(f"index{i}", torch.tensor(index, dtype=torch.long), persistent=False)
        self.first = nn.ModuleList(_conv_block(layout.kind, len(getattr(self, f"index{i}")), layout.hidden[j], pool=True)
                                   for i, j in enumerate(self.block_ids))
        self.out_channels = sum(layout.out[j] for j in self.block_ids)
        self.second = _conv_block(layout.kind, sum(layout.hidden[j] for j in self.block_ids), self.out_channels)
        self.head = nn.Linear(2 * self.out_channels, layout.num_classes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        hidden = torch.cat([first(x.index_select(1, getattr(self, f"index{i}"))) for i, first in enumerate(self.first)],
                           dim=1)
        feature = self.second(hidden)
        return self.head(_global_pool(feature)), feature


@dataclass
class EdgeOut:
    heads: Tensor     # [B, H, classes]: each node head (the dense part has one head)
    full: Tensor      # [B, classes]
    feature: Tensor   # [B, edge channels, ...]
    present: Tensor   # [B, H] bool: the heads that answered

    @property
    def ensemble(self) -> Tensor:
        """Mean of the logits of the heads that answered."""
        w = self.present.to(self.heads.dtype)[..., None]
        return (self.heads * w).sum(1) / w.sum(1).clamp_min(1)


class BlockEdge(nn.Module):
    """The edge part as fog nodes (a BIBD, or random blocks of the same density)."""

    def __init__(self, layout: Layout) -> None:
        super().__init__()
        self.layout = layout
        self.nodes = nn.ModuleList(NodeModule(layout, n) for n in range(len(layout.nodes)))
        for n in range(len(layout.nodes)):
            self.register_buffer(f"slice{n}", torch.tensor(layout.node_channels(n), dtype=torch.long),
                                 persistent=False)
        self.full = nn.Linear(2 * layout.edge_channels, layout.num_classes)

    def forward(self, fused: Tensor, present: Tensor | None = None) -> EdgeOut:
        if present is None:
            present = torch.ones(fused.shape[0], len(self.nodes), dtype=torch.bool)
        outs = [node(fused.index_select(1, getattr(self, f"slice{n}"))) for n, node in enumerate(self.nodes)]
        mask = present.to(fused.dtype)
        feature = torch.cat([f * mask[:, n].reshape(-1, *([1] * (f.dim() - 1)))
                             for n, (_, f) in enumerate(outs)], dim=1)
        return EdgeOut(torch.stack([logits for logits, _ in outs], 1), self.full(_global_pool(feature)), feature,
                       present)


class DenseEdge(nn.Module):
    """The dense edge part of the same widths, one head: what a node's cost is measured against."""

    def __init__(self, layout: Layout, fused_channels: int) -> None:
        super().__init__()
        self.first = _conv_block(layout.kind, fused_channels, sum(layout.hidden), pool=True)
        self.second = _conv_block(layout.kind, sum(layout.hidden), layout.edge_channels)
        self.head = nn.Linear(2 * layout.edge_channels, layout.num_classes)

    def forward(self, fused: Tensor, present: Tensor | None = None) -> EdgeOut:
        feature = self.second(self.first(fused))
        logits = self.head(_global_pool(feature))
        return EdgeOut(logits[:, None], logits, feature, torch.ones(fused.shape[0], 1, dtype=torch.bool))


class _DenseLayer(nn.Module):
    """The dense edge part as one shard (logits, feature), for costs and the one-node baseline."""

    def __init__(self, dense: DenseEdge) -> None:
        super().__init__()
        self.dense = dense

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = self.dense(x)
        return out.full, out.feature


# -- training ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Frozen:
    """What the edge part trains on: fused device features, labels, the bundle gateway's edge
    feature; and the local exit's logits, which the gateway's edge answer weighs in."""

    fused: np.ndarray
    y: np.ndarray
    target: np.ndarray
    local: np.ndarray | None = None


def train_edge(model: nn.Module, data: Frozen, *, epochs: int = EPOCHS, lr: float = LR, seed: int = 0,
               node_dropout: float = NODE_DROPOUT, distill: float = DISTILL, ensemble: float = ENSEMBLE) -> nn.Module:
    """Joint training: every head's loss plus the full head's, plus the feature distance, plus
    the loss of the ensemble of the heads left by node dropout (what the gateway answers with
    when a node is lost)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    x, y, target = (torch.from_numpy(np.ascontiguousarray(a)) for a in (data.fused, data.y, data.target))
    steps = -(-len(y) // BATCH)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps)
    heads = len(model.nodes) if isinstance(model, BlockEdge) else 1
    model.train()
    for _ in range(epochs):
        order = torch.from_numpy(rng.permutation(len(y)))
        for start in range(0, len(y), BATCH):
            index = order[start:start + BATCH]
            present = _sample_present(rng, len(index), heads, node_dropout)
            out = model(x[index].float(), present)
            yb = y[index].long()
            loss = F.cross_entropy(out.full, yb) + distill * F.mse_loss(out.feature, target[index].float())
            if heads > 1:
                loss = loss + sum(F.cross_entropy(out.heads[:, h], yb) for h in range(heads)) \
                    + ensemble * F.cross_entropy(out.ensemble, yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def _sample_present(rng: np.random.Generator, batch: int, heads: int, dropout: float) -> Tensor:
    present = rng.random((batch, heads)) >= dropout
    empty = np.flatnonzero(~present.any(axis=1))
    present[empty, rng.integers(0, heads, empty.size)] = True
    return torch.from_numpy(present)


@torch.no_grad()
def evaluate(model: nn.Module, data: Frozen) -> dict:
    """Accuracy of the ensemble, the full head, each head alone, and the ensemble without each
    node; with the local exit's logits in ``data``, also the gateway's edge answer (the ensemble
    with the local exit's evidence, fogsplit.core.fusion.with_local) with every node and without
    each: ``edge_answer``, ``node_lost`` (else ``node_lost`` is the ensemble's)."""
    x = torch.from_numpy(data.fused).float()
    out = model(x)
    y = torch.from_numpy(data.y).long()

    def acc(logits) -> float:
        return round(float((torch.as_tensor(logits).argmax(-1) == y).float().mean()), 4)

    def answer(ensemble: Tensor):
        return ensemble if data.local is None else with_local(ensemble.numpy(), data.local)

    heads = out.heads.shape[1]
    lost, lost_answer = [], []
    for n in range(heads if heads > 1 else 0):
        present = torch.ones(len(y), heads, dtype=torch.bool)
        present[:, n] = False
        ensemble = model(x, present).ensemble
        lost.append(acc(ensemble))
        lost_answer.append(acc(answer(ensemble)))
    report = {"ensemble": acc(out.ensemble), "full": acc(out.full),
              "node_heads": [acc(out.heads[:, h]) for h in range(heads)] if heads > 1 else [],
              "node_lost": lost_answer, "node_lost_ensemble": lost}
    if data.local is not None:
        report["edge_answer"] = acc(answer(out.ensemble))
        report["local"] = acc(data.local)
    return report


# -- frozen features from a bundle -----------------------------------------------------------

def frozen_features(bundle_dir: Path, manifest: Manifest, data: Dataset, *, threads: int = 2) -> Frozen:
    """Run the bundle's device shards and gateway shard (onnxruntime) on ``data``."""
    runners = {s: ShardRunner(Path(bundle_dir) / manifest.device_shard(s).file, threads=threads)
               for s in manifest.sensor_names}
    gateway = ShardRunner(Path(bundle_dir) / manifest.tier_shard("gateway").file, threads=threads)
    fused_parts, targets, local = [], [], []
    sensors = manifest.sensor_names
    for start in range(0, len(data), 512):
        part = data.subset(np.arange(start, min(start + 512, len(data))))
        outs = {s: runners[s].run(x=part.sensors[s].astype(np.float32)) for s in sensors}
        fused = np.stack([fuse({s: o["feature"][i] for s, o in outs.items()}, sensors, manifest.edge_fusion)
                          for i in range(len(part))])
        local.append(np.stack([fuse({s: o["scores"][i] for s, o in outs.items()}, sensors, manifest.local_fusion,
                                    manifest.fusion_weights or None) for i in range(len(part))]))
        fused_parts.append(fused)
        targets.append(gateway.run(fused=fused)["edge_feature"])
    return Frozen(np.concatenate(fused_parts).astype(np.float32), np.asarray(data.y), np.concatenate(targets),
                  np.concatenate(local).astype(np.float32))


def layout_for(manifest: Manifest, design: Design | tuple[Block, ...], nodes: int) -> Layout:
    gateway = manifest.tier_shard("gateway")
    fused_channels = int(gateway.inputs["fused"][1])
    edge_channels = int(gateway.outputs["edge_feature"][1])
    blocks, v = (design.blocks, design.v) if isinstance(design, Design) else (design, 0)
    kind = manifest.sensors[0].kind
    return make_layout(kind, fused_channels, edge_channels, manifest.num_classes, blocks, v, nodes)


def random_layout(layout: Layout, seed: int) -> Layout:
    """The same layer with random blocks of the same size (same density, same costs)."""
    v, b, k = len(layout.groups), len(layout.blocks), len(layout.blocks[0])
    return replace(layout, blocks=random_blocks(v, b, k, seed))


# -- export ------------------------------------------------------------------------------------

def add_fog(data: Dataset, bundle_dir: str | Path, options: ExportOptions, *, epochs: int = EPOCHS) -> Manifest:
    """Train the fog nodes of ``options.fog_design`` on the bundle's frozen device features and
    add them to the bundle: one ONNX shard per node (parity-checked) and the manifest's ``fog``
    section. The manifest is rewritten, so sign after this."""
    out = Path(bundle_dir)
    manifest = check_bundle_contents(out)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    t0 = time.perf_counter()
    frozen = bundle_features(out, manifest, data, options)
    chosen = make_design(options.fog_design)
    layout = layout_for(manifest, chosen, options.fog_nodes)
    torch.manual_seed(options.seed)
    model = train_edge(BlockEdge(layout), frozen["fit"], seed=options.seed, epochs=epochs)
    report = evaluate(model, frozen["test"])
    manifest = write_fog(out, manifest, model, frozen, chosen.name,
                         metrics={"fog_test_accuracy": report, "fog_train_seconds": round(time.perf_counter() - t0, 1)})
    log.info("fog nodes %s (%s): test ensemble %.4f, edge answer %s, node heads %s, each node lost %s; "
             "node FLOPs %s of dense %d", [n.name for n in manifest.fog.nodes], chosen.name, report["ensemble"],
             report.get("edge_answer"), report["node_heads"],
             report["node_lost"], [manifest.shard(n.shard).flops for n in manifest.fog.nodes],
             manifest.fog.dense_flops)
    return manifest


def bundle_features(out: Path, manifest: Manifest, data: Dataset, options: ExportOptions) -> dict[str, Frozen]:
    """Frozen features of the export's own fit / validation split and of the test split."""
    fit, val = split_validation(data.train(), options.val_fraction, options.seed)
    return {name: frozen_features(out, manifest, part) for name, part in
            (("fit", fit), ("val", val), ("test", data.test()))}


def write_fog(out: Path, manifest: Manifest, model: nn.Module, frozen: dict[str, Frozen], design_name: str, *,
              metrics: dict | None = None, prefix: str = "fog") -> Manifest:
    """Write the nodes of ``model`` (a :class:`BlockEdge`, or a :class:`DenseEdge` as one node)
    as shards and the manifest's fog section; int8 codecs calibrated on the fit features."""
    fused = frozen["fit"].fused
    if isinstance(model, DenseEdge):
        channels, features = [list(range(fused.shape[1]))], [list(range(manifest.forward_shape[0]))]
        plan = ShardPlan(f"{prefix}0", FOG_TIER, _DenseLayer(model), {"slice": torch.from_numpy(frozen["val"].fused[:64])},
                         ("logits", "feature"))
        specs = [write_shard(plan, out)]
        blocks: list[tuple] = [()]
        layout = None
    else:
        layout = model.layout
        specs = write_nodes(model, frozen["val"], out, prefix)
        channels = [layout.node_channels(n) for n in range(len(specs))]
        features = [layout.node_features(n) for n in range(len(specs))]
        blocks = [tuple(layout.blocks[j] for j in layout.nodes[n]) for n in range(len(specs))]
    dense = DenseEdge(layout, fused.shape[1]) if layout is not None else model
    dense_flops, dense_params = count_cost(_DenseLayer(dense), {"x": torch.from_numpy(frozen["val"].fused[:1])})
    with torch.no_grad():
        answer_codec = calibrate_int8(model(torch.from_numpy(fused[:512])).feature.numpy())
    fog = FogSpec(design=design_name, slice_codec=calibrate_int8(fused), answer_codec=answer_codec,
                  dense_flops=dense_flops, dense_params=dense_params,
                  nodes=tuple(FogNodeSpec(name=f"fog{n}", shard=s.name, channels=tuple(channels[n]),
                                          features=tuple(features[n]), blocks=tuple(blocks[n]))
                              for n, s in enumerate(specs)))
    stale = {n.shard for n in manifest.fog.nodes} if manifest.fog is not None else set()
    shards = tuple(s for s in manifest.shards if s.name not in stale) + tuple(specs)
    return write_manifest(replace(manifest, shards=shards, fog=fog, metrics={**manifest.metrics, **(metrics or {})}),
                          out)


def write_nodes(model: BlockEdge, val: Frozen, out: Path, prefix: str = "fog", batch: int = 64) -> list:
    """Each node as its own ONNX shard, checked against torch on real slices."""
    x = torch.from_numpy(val.fused[:batch])
    specs = []
    for n, node in enumerate(model.nodes):
        plan = ShardPlan(f"{prefix}{n}", FOG_TIER, node, {"slice": x[:, model.layout.node_channels(n)]},
                         ("logits", "feature"))
        specs.append(write_shard(plan, out))
    return specs
