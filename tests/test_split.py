"""Pruning the split layer (CCIED): the device really sends fewer channels, and nothing else moves."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fogsplit.core.codecs import CodecSpec
from fogsplit.export.model import DDNN, ModelSpec, fuse_features
from fogsplit.export.split import channels_for_budget, prune_split_layer, split_channel_importance


def _model(fusion: str, channels: int = 8) -> DDNN:
    spec = ModelSpec(sensors=("a", "b", "c"), kind="image", sample_shape=(3, 16, 16), num_classes=4,
                     feature_channels=channels, edge_fusion=fusion)
    torch.manual_seed(0)
    model = DDNN(spec)
    with torch.no_grad():   # distinct BatchNorm scales, so the ranking is not a tie
        for device in model.devices.values():
            device.project[1].weight.uniform_(0.1, 2.0)
    return model.eval()


@pytest.mark.parametrize("fusion", ["concat", "max", "mean"])
def test_pruned_model_is_the_original_with_the_dropped_channels_silenced(fusion):
    model = _model(fusion)
    pruned = prune_split_layer(model, 3).eval()
    kept = np.sort(np.argsort(-split_channel_importance(model))[:3])
    x = torch.randn(4, 3, 3, 16, 16)
    present = torch.ones(4, 3, dtype=torch.bool)
    mask = torch.zeros(8)
    mask[kept] = 1
    with torch.no_grad():
        features = torch.stack([d(x[:, k])[1] for k, d in enumerate(model.devices.values())], 1)
        silenced = fuse_features(features * mask.view(1, 1, 8, 1, 1), present, fusion)
        want_edge, want_edge_feature = model.gateway(silenced)
        got = pruned(x, present)
        got_feature = pruned.devices["a"](x[:, 0])[1]
    assert got_feature.shape[1] == 3 and pruned.spec.feature_channels == 3
    assert torch.allclose(got.edge, want_edge, atol=1e-5)
    assert torch.allclose(got.cloud, model.cloud(want_edge_feature), atol=1e-5)
    assert torch.allclose(got.local, model(x, present).local)   # the scores path is untouched


def test_the_weakest_channels_go():
    model = _model("concat", channels=4)
    with torch.no_grad():
        for device in model.devices.values():
            device.project[1].weight.copy_(torch.tensor([1.0, 0.01, 2.0, 0.02]))
    assert sorted(np.argsort(-split_channel_importance(model))[:2]) == [0, 2]


@pytest.mark.parametrize("codec,budget,want", [("int8", 64, 4), ("int8", 63, 3), ("int8", 10_000, 8),
                                               ("sign", 8, 4), ("sign", 16, 8), ("fp16", 100, 3),
                                               ("int8", 1, 1)])
def test_channels_for_budget(codec, budget, want):
    spec = _model("concat").spec   # features of 8 x 4 x 4: 16 values a channel
    assert channels_for_budget(spec, CodecSpec(codec, scale=1.0), budget) == want


def test_keep_is_checked():
    with pytest.raises(ValueError, match="keep"):
        prune_split_layer(_model("max"), 0)


@pytest.mark.slow
def test_export_with_a_feature_budget_ships_the_smaller_tensor(small_data, tmp_path):
    from fogsplit.export.pipeline import ExportOptions, export_bundle
    from fogsplit.core.manifest import load_bundle
    from fogsplit.core.runner import ShardRunner
    report = export_bundle(small_data, tmp_path, ExportOptions(epochs=2, feature_channels=8, feature_codec="int8",
                                                               feature_bytes=128, progress=False))
    m = report.manifest
    assert m.feature_shape == (2, 8, 8) and m.feature_payload_bytes == 128
    assert m.metrics["split_pruning"] == {"channels_before": 8, "channels_after": 2, "budget_bytes": 128}
    bundle = load_bundle(tmp_path, allow_unsigned=True)
    runner = ShardRunner(bundle.shard_path(m.device_shard("cam0")))
    out = runner.run(x=small_data.sensors["cam0"][:3].astype(np.float32))
    assert out["feature"].shape == (3, 2, 8, 8)
