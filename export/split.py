"""Pruning the split layer (CCIED, Hu et al. 2020): fewer channels cross the device -> gateway link.

The tensor a device sends is the output of its ``project`` block (conv, BatchNorm, then ReLU or
the binarizing sign), and the only layer that reads it is the gateway's first convolution. A
channel of the split layer is therefore one output channel of every device's projection plus
one input column of that convolution's weight: with ``concat`` fusion and one group per device,
column ``c`` of group ``k`` reads device ``k``'s channel ``c``; with max or mean fusion, column
``c`` reads the fused channel ``c``. Removing the same channels from every device keeps the
groups equal and the fused channels aligned.

The coupling is exact and known, so it is cut here directly rather than through Torch-Pruning's
dependency graph, which would have to trace the fusion (a stack over devices, then a flatten or
a masked max) that lives between the shards: docs/architecture.md says more.
"""
from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import torch

from fogsplit.core.codecs import CodecSpec, payload_bytes
from fogsplit.core.dataset import Dataset

from fogsplit.export.model import DDNN, ModelSpec
from fogsplit.export.train import train

log = logging.getLogger(__name__)


def channels_for_budget(spec: ModelSpec, codec: CodecSpec, budget_bytes: int) -> int:
    """The most split-layer channels whose encoded feature fits ``budget_bytes`` (at least 1)."""
    per_channel = int(np.prod(spec.feature_shape[1:]))
    fits = [c for c in range(1, spec.feature_channels + 1) if payload_bytes(codec, c * per_channel) <= budget_bytes]
    return max(fits, default=1)


def split_channel_importance(model: DDNN) -> np.ndarray:
    """Per channel: the BatchNorm scale |gamma| of each device's projection (how much signal
    the channel carries), times the norm of the gateway weights that read it (how much it is
    used), summed over devices."""
    gateway_conv = model.gateway.block[0]
    reads = gateway_conv.weight.detach().flatten(2).norm(dim=2)     # [out, F]
    groups = gateway_conv.groups
    per_group = reads.reshape(groups, -1, reads.shape[1]).norm(dim=1)  # [groups, F]
    score = torch.zeros(model.spec.feature_channels)
    for k, device in enumerate(model.devices.values()):
        gamma = device.project[1].weight.detach().abs()
        score += gamma * per_group[k if groups > 1 else 0]
    return score.numpy()


def prune_split_layer(model: DDNN, keep: int) -> DDNN:
    """A new model whose split layer has the ``keep`` most important channels of ``model``'s,
    every other weight copied. Not fine-tuned."""
    spec = model.spec
    if not 1 <= keep <= spec.feature_channels:
        raise ValueError(f"keep must be 1..{spec.feature_channels}, got {keep}")
    kept = np.sort(np.argsort(-split_channel_importance(model), kind="stable")[:keep])
    index = torch.as_tensor(kept)
    pruned = DDNN(replace(spec, feature_channels=keep))
    state = {}
    for name, value in model.state_dict().items():
        if ".project.0." in name or (".project.1." in name and value.dim() == 1):
            value = value.index_select(0, index)
        elif name == "gateway.block.0.weight":
            value = value.index_select(1, index)
        state[name] = value
    pruned.load_state_dict(state)
    return pruned


def prune_to_budget(model: DDNN, fit: Dataset, *, codec: str, budget_bytes: int, steps: int, seed: int,
                    val: Dataset | None = None, progress: bool = False) -> tuple[DDNN, dict]:
    """Prune the split layer until a device's feature fits ``budget_bytes`` under ``codec``
    (int8 and fp16 widths are fixed; sign is 1 bit a value), then fine-tune all exits jointly."""
    keep = channels_for_budget(model.spec, CodecSpec(codec, scale=1.0), budget_bytes)
    report = {"channels_before": model.spec.feature_channels, "channels_after": keep, "budget_bytes": budget_bytes}
    if keep >= model.spec.feature_channels:
        return model, report
    pruned = prune_split_layer(model, keep)
    log.info("split layer pruned from %d to %d channels for a %d-byte feature; fine-tuning %d steps",
             model.spec.feature_channels, keep, budget_bytes, steps)
    train(pruned, fit, steps=steps, lr=0.003, seed=seed + 1, val=val, progress=progress)
    return pruned, report
