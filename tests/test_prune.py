"""Pruning: the one cost counter, channel removal that coupled layers follow, exports that land on
the target rate and are really smaller, and refusal of bad rates."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch_pruning as tp
from torch import nn

from fogsplit.cli import build_parser
from fogsplit.core.errors import BundleError
from fogsplit.export.datasets import multiview_images
from fogsplit.export.model import DDNN, ModelSpec
from fogsplit.export.pipeline import ExportOptions, export_bundle
from fogsplit.export.prune import (DDNN_LAYERS, PruneUnit, bn_l1_penalty, keep_counts, prune_out_channels,
                                   prune_to_target)
from fogsplit.export.shards import count_cost
from fogsplit.core.manifest import MANIFEST, load_bundle


def test_counter_matches_a_hand_count_of_a_conv_and_a_linear_layer() -> None:
    """FLOPs are 2 per multiply-accumulate (torch's FlopCounterMode), for one sample."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 5))
    flops, params = count_cost(model, {"x": torch.rand(7, 3, 8, 8)})
    conv_macs = (8 * 8) * 4 * (3 * 3 * 3)      # output positions * output channels * inputs per output
    linear_macs = 256 * 5
    assert flops == 2 * (conv_macs + linear_macs) == 16384
    assert params == 4 * 3 * 3 * 3 + (256 * 5 + 5) == 1393


def _device(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return DDNN(ModelSpec(("a", "b"), "image", (3, 16, 16), 3)).eval()


def _kill_channels(bn: nn.BatchNorm2d, channels: list[int]) -> None:
    """Make channels dead (always 0 after ReLU), so that removing them must change nothing."""
    with torch.no_grad():
        bn.weight[channels] = 0.0
        bn.bias[channels] = -1.0


def test_pruning_dead_channels_keeps_the_outputs_and_coupled_layers_follow() -> None:
    shard = _device().devices["a"]
    x = torch.rand(4, 3, 16, 16) * 255
    dead = [0, 3, 5, 9, 30]
    _kill_channels(shard.trunk[1][2], dead)
    with torch.no_grad():
        before = shard(x)
    done = prune_out_channels(shard, x, {shard.trunk[1][0]: 27}, importance=tp.importance.BNScaleImportance())
    with torch.no_grad():
        after = shard(x)
    assert done == {"trunk.1.0": (32, 27)}
    assert shard.trunk[1][2].num_features == 27 and shard.project[0].in_channels == 27
    assert shard.exit.in_features == 54                    # max and mean pooled, through the cat
    for b, a in zip(before, after):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5)


def test_grouped_conv_loses_the_same_number_of_channels_in_every_group() -> None:
    cloud = DDNN(ModelSpec(("a", "b"), "image", (3, 16, 16), 3)).cloud.eval()   # concat: 2 groups
    e = torch.rand(3, 16, 2, 2)
    conv, bn = cloud.block[0], cloud.block[1]
    _kill_channels(bn, [0, 1, 2, 17, 18, 19])
    with torch.no_grad():
        before = cloud(e)
    prune_out_channels(cloud, e, {conv: 26}, importance=tp.importance.BNScaleImportance())
    with torch.no_grad():
        assert torch.allclose(cloud(e), before, atol=1e-5)
    with pytest.raises(ValueError, match="multiple of 2"):
        prune_out_channels(cloud, e, {conv: 25})
    with pytest.raises(ValueError, match="1..26"):
        prune_out_channels(cloud, e, {conv: 0})


def test_the_split_layer_can_be_pruned_and_its_output_shrinks() -> None:
    shard = _device().devices["b"]
    x = torch.rand(2, 3, 16, 16)
    prune_out_channels(shard, x, {shard.project[0]: 2})
    assert shard(x)[1].shape == (2, 2, 4, 4)


def test_l1_pressure_shrinks_the_batchnorm_scales_and_is_removed_afterwards() -> None:
    bn = nn.BatchNorm1d(4)
    with bn_l1_penalty([bn], 0.5):
        bn(torch.rand(8, 4)).sum().backward()
    with_penalty = bn.weight.grad.clone()
    bn.weight.grad = None
    bn(torch.rand(8, 4)).sum().backward()
    assert torch.allclose(with_penalty - bn.weight.grad, torch.full((4,), 0.5), atol=1e-5)


def test_search_lands_on_the_target_and_reports_every_unit() -> None:
    model = _device(1)
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.weight.copy_(torch.rand(bn.num_features))
    x = torch.rand(4, 3, 16, 16)
    units = [PruneUnit(name, model.devices[name], {"x": x}, DDNN_LAYERS["device"]) for name in ("a", "b")]
    compression = prune_to_target(units, 0.5)
    assert abs(compression.flops_cut - 0.5) <= 0.02
    assert set(compression.shards) == {"a", "b"}
    assert all(0 < s["flops"] < s["flops_dense"] for s in compression.shards.values())
    assert count_cost(model.devices["a"], {"x": x})[0] == compression.shards["a"]["flops"]


def test_every_layer_keeps_a_floor_of_channels() -> None:
    model = _device()
    unit = PruneUnit("a", model.devices["a"], {"x": torch.rand(1, 3, 16, 16)}, DDNN_LAYERS["device"])
    assert keep_counts([unit], threshold=1e9) == {"a": {"trunk.0.0": 1, "trunk.1.0": 1}}
    with pytest.raises(ValueError, match="closest achievable"):
        prune_to_target([unit], 0.999, tolerance=0.001)


@pytest.mark.parametrize("given", [dict(target_flops=1.5), dict(target_flops=0), dict(target_flops=-0.1),
                                   dict(target_params=1.0), dict(target_flops=True), dict(target_flops="0.5"),
                                   dict(target_flops=0.5, target_params=0.5)])
def test_export_options_refuse_bad_targets(given) -> None:
    with pytest.raises(ValueError, match="target"):
        ExportOptions(**given)


@pytest.mark.parametrize("command", ["export", "demo"])
@pytest.mark.parametrize("flag", ["--target-flops", "--target-params"])
@pytest.mark.parametrize("value", ["1.5", "0", "abc", "-0.1", "nan"])
def test_cli_refuses_bad_targets_naming_the_flag(command, flag, value, capsys) -> None:
    argv = [command, "--out", "b"] if command == "export" else [command]
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(argv + [f"{flag}={value}"])
    assert exit_.value.code == 2
    assert flag in capsys.readouterr().err


def test_cli_passes_the_target_through() -> None:
    from fogsplit.cli import _export_options
    options = _export_options(build_parser().parse_args(["export", "--out", "b", "--target-flops", "0.8"]))
    assert options.prune_target == ("flops", 0.8)


@pytest.fixture(scope="module")
def tiny_data():
    return multiview_images(n_events=160, cameras=2, num_classes=3, seed=3)


@pytest.fixture(scope="module")
def dense_and_pruned(tmp_path_factory, tiny_data):
    base = dict(steps=60, seed=0, progress=False)   # enough steps to leave chance behind; seconds on 160 events
    dense = export_bundle(tiny_data, tmp_path_factory.mktemp("dense"), ExportOptions(**base))
    pruned = export_bundle(tiny_data, tmp_path_factory.mktemp("pruned"), ExportOptions(**base, target_flops=0.6))
    return dense, pruned


@pytest.mark.slow
def test_pruned_export_lands_on_the_target_and_its_shards_are_smaller(dense_and_pruned) -> None:
    dense, pruned = dense_and_pruned
    c = pruned.manifest.compression
    assert dense.manifest.compression == {}
    assert c["metric"] == "flops" and c["target"] == 0.6 and abs(c["flops_cut"] - 0.6) <= 0.02
    total = {name: sum(s.flops for s in r.manifest.shards) for name, r in (("dense", dense), ("pruned", pruned))}
    assert abs((1 - total["pruned"] / total["dense"]) - c["flops_cut"]) < 1e-3     # the manifest's own counts
    for shard in dense.manifest.shards:
        after = pruned.manifest.shard(shard.name)
        assert c["shards"][shard.name]["flops"] == after.flops
        assert after.outputs == shard.outputs and after.inputs == shard.inputs     # split points unchanged
        size = {n: (r.path / r.manifest.shard(shard.name).file).stat().st_size
                for n, r in (("dense", dense), ("pruned", pruned))}
        if shard.tier == "gateway":
            assert after.flops == shard.flops and c["shards"]["gateway"]["flops_cut"] == 0
        else:
            assert after.flops < shard.flops and after.params < shard.params and size["pruned"] < size["dense"]
    load_bundle(pruned.path, allow_unsigned=True)     # every shard passed onnx.checker and the parity check when written


@pytest.mark.slow
def test_pruned_bundle_runs_and_keeps_the_wire_shapes(dense_and_pruned, tiny_data) -> None:
    from fogsplit.core.runner import ShardRunner
    dense, pruned = dense_and_pruned
    bundle = load_bundle(pruned.path, allow_unsigned=True)
    runner = ShardRunner(bundle.shard_path(bundle.manifest.device_shard("cam0")))
    out = runner.run(x=tiny_data.sensors["cam0"][:3].astype(np.float32))
    assert out["feature"].shape[1:] == dense.manifest.feature_shape == bundle.manifest.feature_shape
    assert bundle.manifest.forward_shape == dense.manifest.forward_shape
    assert pruned.manifest.metrics["test_cascade_accuracy"] > 1 / 3     # better than chance after pruning


@pytest.mark.slow
@pytest.mark.parametrize("change,needle", [
    (lambda c: c.update(extra=1), "keys"),
    (lambda c: c.update(flops_cut=1.5), "flops_cut"),
    (lambda c: c.update(metric="bytes"), "metric"),
    (lambda c: c["shards"].pop("gateway"), "every shard"),
    (lambda c: c["shards"]["cloud"].update(params_cut=-0.1), "cloud.params_cut"),
])
def test_manifest_compression_is_parsed_strictly(dense_and_pruned, tmp_path, change, needle) -> None:
    copy = shutil.copytree(dense_and_pruned[1].path, tmp_path / "b")
    data = json.loads((copy / MANIFEST).read_text())
    change(data["compression"])
    (copy / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(BundleError, match=needle):
        load_bundle(copy, allow_unsigned=True)


@pytest.mark.slow
def test_bench_prune_quick_writes_every_required_key(tmp_path) -> None:
    from fogsplit.bench.prune import REQUIRED, main
    out = tmp_path / "prune.json"
    assert main(["--quick", "--events", "120", "--vgg-events", "120", "--vgg-width", "0.125",
                 "--targets", "0.5", "--repeats", "3", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["network"] for r in result["rows"]] == ["ddnn", "vgg16"]
    for row in result["rows"]:
        assert set(REQUIRED) <= set(row)
        assert abs(row["flops_cut"] - 0.5) <= 0.02 and 0 < row["params_cut"] < 1
        assert 0 <= row["accuracy_dense"] <= 1 and 0 <= row["accuracy_pruned"] <= 1
        assert row["ort_speedup"] > 0 and row["onnx_kb_pruned"] < row["onnx_kb_dense"]
    assert result["seed_figures"][0]["flops_cut"] == 0.762
