"""The training recipe's parts, each on its own: budget, class weights, augmentation, the best
checkpoint, fusion weights, and how the tiers carry the weighted local exit."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fogsplit.core.dataset import make_dataset
from fogsplit.core.errors import BundleError
from fogsplit.core.fusion import fuse, log_softmax
from fogsplit.core.manifest import parse_manifest
from fogsplit.export.augment import Augmenter
from fogsplit.export.fusion_weights import fit_fusion_weights, weighted_local
from fogsplit.export.model import DDNN, ModelSpec
from fogsplit.export.train import MAX_STEPS, MIN_STEPS, auto_steps, channel_stats, class_weights, train


def test_the_budget_grows_with_the_data_within_bounds():
    assert auto_steps(40, 64) == MIN_STEPS                 # 40 windows: hundreds of steps, not 8
    assert auto_steps(2720, 64) == 8 * 43                  # a large set: 8 passes
    assert auto_steps(10**6, 64) == MAX_STEPS


def test_class_weights_only_when_the_classes_are_imbalanced():
    assert class_weights(np.repeat([0, 1, 2], 10), 3) is None
    w = class_weights(np.array([0] * 30 + [1] * 10 + [2] * 10), 3)
    assert w is not None and w[0] < w[1] == pytest.approx(w[2]) and w.mean() == pytest.approx(1.0)


def test_channel_stats_leave_nan_out():
    x = np.array([[[1.0, 3.0, np.nan, np.nan]], [[5.0, np.nan, np.nan, np.nan]]], np.float32)
    ds = make_dataset({"a": x}, np.array([0, 1]), split=np.array([0, 1]))
    mean, std = channel_stats(ds)["a"]
    assert mean[0] == pytest.approx(3.0) and std[0] == pytest.approx(np.std([1, 3, 5]))


def test_series_augmentation_keeps_shape_and_the_end_marker_and_is_seeded():
    x = torch.randn(16, 3, 40)
    x[:, :, 30:] = float("nan")
    stats = [(np.zeros(3), np.ones(3))]
    a, b = Augmenter("series", stats, seed=1)([x]), Augmenter("series", stats, seed=1)([x])
    assert a[0].shape == x.shape and torch.equal(torch.nan_to_num(a[0]), torch.nan_to_num(b[0]))
    assert torch.isnan(a[0]).any() and not torch.isnan(a[0][:, :, :25]).all()   # NaN stays NaN, moved a little
    assert not torch.allclose(torch.nan_to_num(a[0]), torch.nan_to_num(x))


def test_image_augmentation_crops_within_the_view_and_flips_only_when_asked():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4)
    out = Augmenter("image", [(np.zeros(1), np.ones(1))], seed=0)([x])[0]
    assert out.shape == x.shape and out.min() >= x.min() and out.max() <= x.max()
    flipped = Augmenter("image", [(np.zeros(1), np.ones(1))], seed=0, flips=True)
    assert flipped.flips and not Augmenter("image", [(np.zeros(1), np.ones(1))]).flips


def _toy(seed: int = 0, n: int = 160):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    good = (y[:, None, None] * 2.0 - 1 + 0.5 * rng.standard_normal((n, 2, 16))).astype(np.float32)
    noise = rng.standard_normal((n, 2, 16)).astype(np.float32)
    return make_dataset({"good": good, "noise": noise}, y, split=(np.arange(n) % 4 == 0).astype(int))


def test_the_best_checkpoint_on_validation_is_kept():
    data = _toy()
    torch.manual_seed(0)
    model = DDNN(ModelSpec.for_dataset(data))
    report = train(model, data, steps=40, val=data.test(), progress=False)
    assert report.steps <= 40 and 0 < report.best_step <= report.steps
    assert set(report.val_accuracy) == {"device", "local", "edge", "cloud"}
    assert report.val_accuracy["cloud"] >= 0.9


def test_a_misleading_device_is_trusted_less():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    right = np.eye(3)[y] * 4 + rng.standard_normal((300, 3))
    wrong = np.eye(3)[(y + 1) % 3] * 2 + rng.standard_normal((300, 3))     # confidently wrong
    w = fit_fusion_weights(np.stack([right, wrong], 1), y)
    assert w[0] > 0.5 and w[1] < 0.5 * w[0]
    fused = weighted_local(np.stack([right, wrong], 1), w)
    assert (fused.argmax(1) == y).mean() > 0.95


def test_the_gateway_fuses_as_the_export_calibrated():
    logits = {"a": np.array([2.0, 0.0, -1.0]), "b": np.array([0.0, 3.0, 0.0])}
    weights = {"a": 1.5, "b": 0.5}
    got = fuse(logits, ["a", "b"], "weighted", weights)
    want = weighted_local(np.stack([logits["a"], logits["b"]])[None], np.array([1.5, 0.5]))[0]
    assert np.allclose(got, want, atol=1e-6)
    assert np.allclose(fuse({"a": logits["a"]}, ["a", "b"], "weighted", weights), 1.5 * log_softmax(logits["a"]))
    with pytest.raises(ValueError, match="weight per sensor"):
        fuse(logits, ["a", "b"], "weighted")


@pytest.mark.parametrize("change, needle", [
    ({"fusion_weights": {"cam0": 1.0}}, "must name every sensor"),
    ("negative", "finite numbers >= 0"),
    ("zeros", "not all 0"),
    ("unweighted", "fusion_weights are given but local_fusion is 'max'"),
])
def test_bad_fusion_weights_in_a_manifest_are_refused(bundle_dir, change, needle):
    import json
    data = json.loads((bundle_dir / "manifest.json").read_text())
    sensors = [s["name"] for s in data["sensors"]]
    data["local_fusion"] = "weighted"
    if change == "negative":
        data["fusion_weights"] = {s: -1.0 for s in sensors}
    elif change == "zeros":
        data["fusion_weights"] = {s: 0.0 for s in sensors}
    elif change == "unweighted":
        data["local_fusion"], data["fusion_weights"] = "max", {s: 1.0 for s in sensors}
    else:
        data.update(change)
    with pytest.raises(BundleError, match=needle):
        parse_manifest(data)
