"""The EDDL edge part: the partition over nodes, costs that really fall, joint training, and
each node as its own ONNX shard with torch/onnxruntime parity."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from fogsplit.core.manifest import load_bundle
from fogsplit.core.runner import ShardRunner
from fogsplit.core.signing import sign_ephemeral
from fogsplit.export.bibd import design
from fogsplit.export.eddl import BlockEdge, DenseEdge, Frozen, _DenseLayer, evaluate, make_layout, random_layout, \
    train_edge, write_nodes
from fogsplit.export.shards import count_cost

FUSED, EDGE, CLASSES = 24, 48, 6   # six cameras of 4 channels, concat; the gateway's 48 edge channels


def layout(name: str = "affine:3", nodes: int = 3, kind: str = "image"):
    d = design(name)
    return make_layout(kind, FUSED, EDGE, CLASSES, d.blocks, d.v, nodes)


def frozen(n: int = 96, seed: int = 0) -> Frozen:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    fused = rng.normal(size=(n, FUSED, 8, 8)).astype(np.float32)
    fused[np.arange(n), y] += 3.0                      # a learnable signal
    return Frozen(fused, y, rng.normal(size=(n, EDGE, 4, 4)).astype(np.float32) * 0.1)


def test_each_node_takes_the_groups_of_its_blocks_and_fills_its_own_features():
    lay = layout()
    assert [len(g) for g in lay.groups] == [3] * 6 + [2] * 3
    assert sorted(j for part in lay.nodes for j in part) == list(range(12))
    filled = []
    for n, part in enumerate(lay.nodes):
        points = {p for j in part for p in lay.blocks[j]}
        assert lay.node_channels(n) == sorted(c for p in points for c in lay.groups[p])
        assert len(points) == 7                         # 7 of 9 groups: see test_bibd
        filled += lay.node_features(n)
    assert filled == list(range(EDGE))
    model = BlockEdge(lay)
    node = model.nodes[0]
    slice_channels = lay.node_channels(0)
    for i, j in enumerate(node.block_ids):
        gathered = [slice_channels[k] for k in getattr(node, f"index{i}").tolist()]
        assert gathered == [c for p in lay.blocks[j] for c in lay.groups[p]]


@pytest.mark.parametrize("name,nodes", [("affine:3", 3), ("affine:4", 4), ("fano", 3), ("affine:2", 3)])
def test_every_node_costs_at_most_a_third_of_the_dense_edge_part(name, nodes):
    lay = layout(name, nodes)
    x = torch.zeros(1, FUSED, 8, 8)
    dense_flops, dense_params = count_cost(_DenseLayer(DenseEdge(lay, FUSED)), {"x": x})
    model = BlockEdge(lay)
    for n, node in enumerate(model.nodes):
        flops, params = count_cost(node, {"slice": x[:, lay.node_channels(n)]})
        assert flops <= dense_flops / 3 and params <= dense_params / 3, (n, flops / dense_flops, params / dense_params)
    # the grouped layer is real: its convolutions hold k/v of the dense first layer's weights
    d = design(name)
    first = sum(m[0].weight.numel() for node in model.nodes for m in node.first)
    dense_first = DenseEdge(lay, FUSED).first[0].weight.numel()
    assert first == pytest.approx(dense_first * d.k / d.v, rel=0.15)


def test_random_blocks_cost_the_same_as_the_design():
    lay = layout()
    rand = random_layout(lay, seed=3)
    assert rand.blocks != lay.blocks and [len(b) for b in rand.blocks] == [3] * 12
    a, b = BlockEdge(lay), BlockEdge(rand)
    assert abs(sum(p.numel() for p in a.parameters()) - sum(p.numel() for p in b.parameters())) <= 3 * 4 * 9 * 4


def test_joint_training_teaches_every_head_and_the_ensemble():
    torch.manual_seed(0)
    data = frozen(192)
    model = train_edge(BlockEdge(layout()), data, epochs=6, seed=0)
    report = evaluate(model, data)
    assert set(report) == {"ensemble", "full", "node_heads", "node_lost", "node_lost_ensemble"}   # no local logits
    assert len(report["node_heads"]) == 3 and len(report["node_lost"]) == 3
    assert report["ensemble"] > 0.5 and min(report["node_heads"]) > 1 / CLASSES
    with torch.no_grad():
        out = model(torch.from_numpy(data.fused[:4]), torch.tensor([[True, False, True]] * 4))
    assert torch.all(out.feature[:, model.layout.node_features(1)] == 0)
    dense = evaluate(train_edge(DenseEdge(layout(), FUSED), data, epochs=6, seed=0), data)
    assert dense["node_heads"] == [] and dense["ensemble"] == dense["full"]


def test_each_node_exports_as_its_own_shard_with_parity(tmp_path):
    torch.manual_seed(1)
    data = frozen(64)
    model = BlockEdge(layout("fano", 3)).eval()
    specs = write_nodes(model, data, tmp_path)      # write_shard refuses a shard off by > 1e-4
    for n, spec in enumerate(specs):
        assert spec.tier == "fog" and spec.inputs["slice"] == ["batch", len(model.layout.node_channels(n)), 8, 8]
        got = ShardRunner(tmp_path / spec.file).run(slice=data.fused[:8, model.layout.node_channels(n)])
        with torch.no_grad():
            logits, feature = model.nodes[n](torch.from_numpy(data.fused[:8, model.layout.node_channels(n)]))
        np.testing.assert_allclose(got["logits"], logits.numpy(), atol=1e-4)
        np.testing.assert_allclose(got["feature"], feature.numpy(), atol=1e-4)


def test_series_layers_are_one_dimensional():
    lay = layout("affine:2", 2, kind="series")
    model = BlockEdge(lay).eval()
    with torch.no_grad():
        out = model(torch.zeros(2, FUSED, 16))
    assert out.feature.shape == (2, EDGE, 8) and out.heads.shape == (2, 2, CLASSES)


@pytest.mark.slow
def test_add_fog_writes_node_shards_and_a_fog_section(bundle_dir, small_data, tmp_path):
    from fogsplit.core.settings import ExportOptions
    from fogsplit.export.eddl import add_fog
    out = tmp_path / "fog"
    shutil.copytree(bundle_dir, out)
    m = add_fog(small_data, out, ExportOptions(epochs=2, seed=0, progress=False, fog_nodes=3, fog_design="affine:3"), epochs=2)
    bundle = load_bundle(out, trusted_keys=[sign_ephemeral(out)])
    fog = bundle.manifest.fog
    assert fog is not None and [n.name for n in fog.nodes] == ["fog0", "fog1", "fog2"] and fog.design == "affine:3"
    for node in fog.nodes:
        shard = bundle.manifest.shard(node.shard)
        assert shard.tier == "fog" and shard.flops <= fog.dense_flops / 3 and shard.params <= fog.dense_params / 3
    report = m.metrics["fog_test_accuracy"]
    assert set(report) == {"ensemble", "full", "node_heads", "node_lost", "node_lost_ensemble", "edge_answer", "local"}
    assert len(report["node_lost"]) == len(report["node_lost_ensemble"]) == len(m.fog.nodes)
