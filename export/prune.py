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

log = logging.getLogger("fogsplit.export.prune")

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
