"""Structured pruning: physically remove channels so that the exported shards get smaller and faster.

Network Slimming (Liu et al., 2017) in three plain steps, with Torch-Pruning (DepGraph, Fang et
al., 2023) doing the surgery so that every layer coupled to a pruned channel (its BatchNorm,
the next conv's input, the pooled classifier's input through ``cat``) follows:

1. sparsity training: an L1 penalty on the BatchNorm scales (:func:`bn_l1_penalty`) drives
   the scales of redundant channels towards zero while the network trains as usual;
2. one global threshold on the scales decides how many channels each layer keeps; the
   threshold is found by bisection so that the counted FLOPs (or parameters) cut lands on the
   target (:func:`search_keep`), and the channels are removed (:func:`prune_out_channels`);
3. fine-tuning recovers the accuracy.

Only channels *inside* a shard are pruned: the tensors that cross a split point keep their
channels, so the wire format, the codecs and the other tiers do not change.
"""
from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import Tensor, nn

from fogsplit.export.shards import count_cost

log = logging.getLogger(__name__)

Importance = Callable[[tp.dependency.Group], Tensor]
TOLERANCE = 0.02          # the achieved cut must be within 2 points of the target
MIN_KEEP_FRACTION = 0.05  # every pruned layer keeps at least this share of its channels (and >= 1)


def _out_channels(module: nn.Module) -> int:
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels
    if isinstance(module, nn.Linear):
        return module.out_features
    raise TypeError(f"can prune the output channels of a Conv or Linear layer, not {type(module).__name__}")


def _pruning_fn(module: nn.Module):
    return tp.prune_linear_out_channels if isinstance(module, nn.Linear) else tp.prune_conv_out_channels


def prune_out_channels(model: nn.Module, example_inputs: Tensor | tuple[Tensor, ...],
                       keep: dict[nn.Module, int], importance: Importance | None = None) -> dict[str, tuple[int, int]]:
    """Physically prune each layer in ``keep`` (a Conv or Linear of ``model``) to ``keep[layer]``
    output channels, keeping the most important ones; every coupled layer follows.

    Torch-Pruning traces ``model`` on ``example_inputs`` and builds the dependency graph, so the
    layer's BatchNorm, whatever consumes its output (convs, a ``cat`` into a linear) and so on
    are cut consistently. ``importance`` scores the channels of a dependency group (default: L2
    magnitude over the whole group, ``tp.importance.MagnitudeImportance(p=2)``; Network
    Slimming uses ``tp.importance.BNScaleImportance()``). A grouped conv keeps the same number of
    channels in every group, so its ``keep`` must be a multiple of its groups.

    If the layer's output is a model output (a split tensor), that output shrinks: the caller
    must then update whatever describes its shape. Returns ``{layer name: (before, after)}``.
    """
    importance = importance or tp.importance.MagnitudeImportance(p=2)
    names = {m: n for n, m in model.named_modules()}
    for layer, n_keep in keep.items():
        if layer not in names:
            raise ValueError(f"{type(layer).__name__} is not a layer of this model")
        total, groups = _out_channels(layer), getattr(layer, "groups", 1)
        if not 1 <= n_keep <= total:
            raise ValueError(f"{names[layer]}: can keep 1..{total} channels, not {n_keep}")
        if n_keep % groups:
            raise ValueError(f"{names[layer]}: a conv of {groups} groups must keep a multiple of {groups} "
                             f"channels, not {n_keep}")
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    was_training = model.training
    model.eval()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=inputs)
    done = {}
    for layer, n_keep in keep.items():
        total = _out_channels(layer)
        if n_keep < total:
            fn = _pruning_fn(layer)
            scores = importance(graph.get_pruning_group(layer, fn, idxs=list(range(total))))
            drop = _least_important(scores, n_keep, getattr(layer, "groups", 1))
            group = graph.get_pruning_group(layer, fn, idxs=drop)
            if not graph.check_pruning_group(group):
                raise ValueError(f"{names[layer]}: pruning to {n_keep} channels would leave a layer empty")
            group.prune()
        done[names[layer]] = (total, n_keep)
    model.train(was_training)
    return done


def _least_important(scores: Tensor, n_keep: int, groups: int) -> list[int]:
    """Indices to drop: the lowest scores, the same number in each of ``groups`` equal blocks."""
    per_group = scores.numel() // groups
    keep_per_group = n_keep // groups
    drop = []
    for g in range(groups):
        block = scores[g * per_group:(g + 1) * per_group]
        drop += (torch.argsort(block)[:per_group - keep_per_group] + g * per_group).tolist()
    return sorted(drop)


@dataclass(frozen=True)
class PruneUnit:
    """A module pruned on its own (a shard, or a whole network), with real example inputs and
    the layers that may lose channels: ``(conv name, name of the BatchNorm that scales it)``."""

    name: str
    module: nn.Module
    inputs: dict[str, Tensor]
    layers: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Compression:
    """What pruning achieved, overall and per unit (cuts are fractions: 0.8 means 80% removed)."""

    metric: str                  # "flops" or "params": what the target was set on
    target: float
    flops_cut: float
    params_cut: float
    shards: dict[str, dict[str, float]]   # unit -> flops/params before and after, and the cuts

    def to_dict(self) -> dict:
        return {"metric": self.metric, "target": self.target, "flops_cut": self.flops_cut,
                "params_cut": self.params_cut, "shards": self.shards}


def batchnorms(units: Sequence[PruneUnit]) -> list[nn.Module]:
    """The BatchNorm layers whose scales decide the pruning (the ones to put sparsity pressure on)."""
    return [unit.module.get_submodule(bn) for unit in units for _, bn in unit.layers]


@contextlib.contextmanager
def bn_l1_penalty(bns: Sequence[nn.Module], strength: float) -> Iterator[None]:
    """While active, every backward pass adds ``strength * sign(scale)`` to the gradient of each
    BatchNorm scale: the subgradient of ``strength * sum |scale|`` (Network Slimming).

    Implemented as gradient hooks so that any training loop (``train.train`` for the DDNN, the
    VGG loop) trains sparsely without knowing about it.
    """
    handles = [bn.weight.register_hook(lambda grad, w=bn.weight: grad + strength * torch.sign(w.detach()))
               for bn in bns]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def unit_costs(units: Sequence[PruneUnit]) -> dict[str, tuple[int, int]]:
    """(FLOPs, params) per unit, from the one counter of the project (``shards.count_cost``)."""
    return {unit.name: count_cost(unit.module, unit.inputs) for unit in units}


def keep_counts(units: Sequence[PruneUnit], threshold: float) -> dict[str, dict[str, int]]:
    """Channels each layer keeps when every channel whose BatchNorm scale is <= ``threshold`` goes.

    A layer keeps at least ``MIN_KEEP_FRACTION`` of its channels (and one per conv group), so no
    layer collapses; grouped convs round up to a multiple of their groups.
    """
    plan: dict[str, dict[str, int]] = {}
    for unit in units:
        plan[unit.name] = {}
        for conv_name, bn_name in unit.layers:
            conv, scale = unit.module.get_submodule(conv_name), unit.module.get_submodule(bn_name).weight
            groups, total = getattr(conv, "groups", 1), _out_channels(conv)
            floor = max(groups, -(-int(total * MIN_KEEP_FRACTION) // groups) * groups)
            n = max(int((scale.detach().abs() > threshold).sum()), floor)
            plan[unit.name][conv_name] = min(total, -(-n // groups) * groups)
    return plan


def apply_keep(unit: PruneUnit, module: nn.Module, keep: dict[str, int]) -> nn.Module:
    """Prune ``module`` (``unit.module`` or a copy of it) to ``keep`` channels per layer name,
    ranking channels by their BatchNorm scales."""
    prune_out_channels(module, tuple(t[:1] for t in unit.inputs.values()),
                       {module.get_submodule(name): n for name, n in keep.items()},
                       importance=tp.importance.BNScaleImportance())
    return module


def _cut(before: tuple[int, int], after: tuple[int, int]) -> tuple[float, float]:
    return tuple(1.0 - a / b if b else 0.0 for a, b in zip(after, before))


def _total(costs) -> tuple[int, int]:
    """(FLOPs, params) summed over units."""
    return tuple(sum(c[i] for c in costs) for i in (0, 1))


def _measure(units: Sequence[PruneUnit], plan: dict[str, dict[str, int]],
             dense: dict[str, tuple[int, int]]) -> tuple[float, float]:
    """Overall (FLOPs cut, params cut) of ``plan``, counted on pruned copies of the units."""
    after = [count_cost(apply_keep(u, copy.deepcopy(u.module), plan[u.name]), u.inputs) for u in units]
    return _cut(_total(dense.values()), _total(after))


def search_keep(units: Sequence[PruneUnit], target: float, metric: str = "flops",
                tolerance: float = TOLERANCE) -> tuple[dict[str, dict[str, int]], float]:
    """The global BatchNorm-scale threshold whose pruning cuts ``metric`` closest to ``target``.

    Bisection over the sorted scales (the cut grows with the threshold), each candidate counted
    on physically pruned copies. Returns the keep plan and the achieved cut; raises ValueError
    when the closest achievable cut is more than ``tolerance`` away (e.g. a target beyond what
    the per-layer floor allows).
    """
    if metric not in ("flops", "params"):
        raise ValueError(f"metric must be flops or params, got {metric!r}")
    index = 0 if metric == "flops" else 1
    dense = unit_costs(units)
    scales = torch.sort(torch.cat([bn.weight.detach().abs().flatten() for bn in batchnorms(units)])).values
    candidates = torch.cat([torch.tensor([-1.0]), scales])
    cache: dict[int, float] = {}

    def cut_at(i: int) -> float:
        if i not in cache:
            cache[i] = _measure(units, keep_counts(units, float(candidates[i])), dense)[index]
        return cache[i]

    lo, hi = 0, len(candidates) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if cut_at(mid) >= target:
            hi = mid
        else:
            lo = mid + 1
    best = min({lo, max(lo - 1, 0)}, key=lambda i: abs(cut_at(i) - target))
    achieved = cut_at(best)
    if abs(achieved - target) > tolerance:
        raise ValueError(f"the closest achievable {metric} cut is {achieved:.3f}, more than {tolerance} "
                         f"from the target {target}")
    log.info("threshold %.4g on BatchNorm scales cuts %s by %.3f (target %.3f)",
             float(candidates[best]), metric, achieved, target)
    return keep_counts(units, float(candidates[best])), achieved


def prune_to_target(units: Sequence[PruneUnit], target: float, metric: str = "flops",
                    tolerance: float = TOLERANCE) -> Compression:
    """Find the keep plan for ``target`` and prune every unit's module in place; report the cuts."""
    dense = unit_costs(units)
    plan, _ = search_keep(units, target, metric, tolerance)
    for unit in units:
        apply_keep(unit, unit.module, plan[unit.name])
    after = unit_costs(units)
    shards = {}
    for unit in units:
        flops_cut, params_cut = _cut(dense[unit.name], after[unit.name])
        shards[unit.name] = {"flops": after[unit.name][0], "params": after[unit.name][1],
                             "flops_dense": dense[unit.name][0], "params_dense": dense[unit.name][1],
                             "flops_cut": round(flops_cut, 4), "params_cut": round(params_cut, 4)}
        log.info("pruned %s: flops -%.1f%%, params -%.1f%%", unit.name, 100 * flops_cut, 100 * params_cut)
    flops_cut, params_cut = _cut(_total(dense.values()), _total(after.values()))
    return Compression(metric=metric, target=target, flops_cut=round(flops_cut, 4),
                       params_cut=round(params_cut, 4), shards=shards)


DDNN_LAYERS: dict[str, tuple[tuple[str, str], ...]] = {
    "device": (("trunk.0.0", "trunk.0.1"), ("trunk.1.0", "trunk.1.2")),
    "gateway": (),
    "cloud": (("block.0", "block.1"),),
}
"""What each DDNN shard may lose, by tier. The device trunk's two conv blocks and the cloud's conv
block are hidden layers (the device and cloud exits' pooled inputs follow them). The device's
``project`` conv makes the feature sent to the gateway, and the gateway's only conv makes the
edge feature sent to the cloud: both are split tensors, so they keep their channels, and the
gateway shard is left as it is."""
