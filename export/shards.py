"""Split a trained DDNN into ONNX shards, check each against torch, and count its cost."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch.utils.flop_counter import FlopCounterMode

from fogsplit.core.errors import FogsplitError
from fogsplit.core.manifest import ShardSpec, sha256_file
from fogsplit.core.runner import ShardRunner

OPSET = 17
PARITY_TOLERANCE = 1e-4


class ExportError(FogsplitError):
    """An exported shard is invalid or does not compute what the torch model computes."""


@dataclass(frozen=True)
class ShardPlan:
    """One shard before it is written: a module, its real example inputs, its I/O names."""

    name: str
    tier: str
    module: torch.nn.Module
    inputs: dict[str, torch.Tensor]
    outputs: tuple[str, ...]
    sensor: str = ""


def count_cost(module: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(FLOPs for one sample, parameter count). FLOPs as torch's counter reports them (2 per MAC)."""
    one = tuple(t[:1] for t in inputs.values())
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*one)
    return int(counter.get_total_flops()), int(sum(p.numel() for p in module.parameters()))


def write_shard(plan: ShardPlan, out_dir: Path) -> ShardSpec:
    """Export one shard to ONNX, verify it with onnx.checker and against torch on real inputs."""
    path = Path(out_dir) / f"{plan.name}.onnx"
    module = plan.module.eval()
    args = tuple(plan.inputs.values())
    names = list(plan.inputs) + list(plan.outputs)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=OPSET,
                          input_names=list(plan.inputs), output_names=list(plan.outputs),
                          dynamic_axes={n: {0: "batch"} for n in names})
    try:
        onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    except Exception as exc:
        raise ExportError(f"{path.name}: onnx.checker refused the shard: {exc}") from exc
    diff = parity(module, plan, path)
    if not diff <= PARITY_TOLERANCE:
        raise ExportError(f"{path.name}: onnxruntime differs from torch by {diff:.3g} "
                          f"(tolerance {PARITY_TOLERANCE}); refusing to export a shard that computes "
                          "something else")
    flops, params = count_cost(module, plan.inputs)
    with torch.no_grad():
        out = module(*args)
    out = out if isinstance(out, tuple) else (out,)
    return ShardSpec(name=plan.name, tier=plan.tier, file=path.name, sha256=sha256_file(path),
                     inputs={n: ["batch", *t.shape[1:]] for n, t in plan.inputs.items()},
                     outputs={n: ["batch", *t.shape[1:]] for n, t in zip(plan.outputs, out)},
                     sensor=plan.sensor, flops=flops, params=params)


def parity(module: torch.nn.Module, plan: ShardPlan, path: Path) -> float:
    """Largest absolute difference between torch and onnxruntime outputs on the plan's inputs."""
    with torch.no_grad():
        expected = module(*plan.inputs.values())
    expected = expected if isinstance(expected, tuple) else (expected,)
    got = ShardRunner(path).run(**{n: t.numpy() for n, t in plan.inputs.items()})
    return max(float(np.max(np.abs(got[n] - e.numpy()))) for n, e in zip(plan.outputs, expected))
