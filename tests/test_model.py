"""The DDNN: shapes of every exit, fusion semantics, and a short reproducible training run."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fogsplit.core.dataset import Dataset
from fogsplit.export.datasets import imu_series, multiview_images
from fogsplit.export.model import DDNN, Exits, ModelSpec, fuse_features, fuse_scores
from fogsplit.export.train import (TrainReport, channel_stats, exit_losses, predict,
                                   sample_present, train)


@pytest.fixture(scope="module")
def series() -> Dataset:
    return imu_series(n_events=160, devices=3, num_classes=3, window=32, seed=2)


def _model(spec: ModelSpec, seed: int = 0) -> DDNN:
    torch.manual_seed(seed)
    return DDNN(spec)


@pytest.mark.parametrize("kind, shape", [("image", (3, 32, 32)), ("series", (3, 64))])
@pytest.mark.parametrize("edge_fusion", ["concat", "max", "mean"])
def test_every_exit_and_shard_output_has_the_documented_shape(kind, shape, edge_fusion) -> None:
    spec = ModelSpec(("a", "b", "c"), kind, shape, num_classes=5, edge_fusion=edge_fusion)
    model = _model(spec).eval()
    x = torch.rand(2, 3, *shape) * 255
    present = torch.tensor([[True, False, True], [False, False, True]])
    with torch.no_grad():
        exits = model(x, present)
        scores, feature = model.devices["a"](x[:, 0])
        fused = fuse_features(torch.stack([feature] * 3, 1), present, edge_fusion)
        edge, edge_feature = model.gateway(fused)
        cloud = model.cloud(edge_feature)
    assert exits.device.shape == (2, 3, 5)
    for logits in (exits.local, exits.edge, exits.cloud, scores, edge, cloud):
        assert logits.shape == (2, 5)
    assert feature.shape == (2, *spec.feature_shape)
    assert fused.shape == (2, spec.fused_channels, *spec.feature_shape[1:])
    assert edge_feature.shape == (2, *spec.edge_feature_shape)


def test_image_feature_is_about_256_values() -> None:
    spec = ModelSpec(tuple(f"cam{k}" for k in range(6)), "image", (3, 32, 32), 6)
    assert spec.feature_shape == (4, 8, 8)


def test_spec_for_dataset_reads_the_data_and_takes_overrides(series: Dataset) -> None:
    spec = ModelSpec.for_dataset(series, feature_channels=2, local_fusion="mean")
    assert spec.sensors == ("imu0", "imu1", "imu2")
    assert (spec.kind, spec.shapes, spec.num_classes) == ("series", ((3, 32),) * 3, 3)
    assert (spec.feature_channels, spec.local_fusion, spec.edge_fusion) == (2, "mean", "concat")


@pytest.mark.parametrize("bad", [dict(kind="audio"), dict(sample_shape=(3, 3)), dict(sample_shape=(0, 32)),
                                 dict(sample_shape=((3, 32), (3, 32))), dict(sample_shape=(3, 8, 8)),
                                 dict(local_fusion="concat"), dict(edge_fusion="sum"),
                                 dict(sensors=())])
def test_spec_rejects_what_cannot_be_built(bad) -> None:
    values = dict(sensors=("a",), kind="series", sample_shape=(3, 32), num_classes=3)
    with pytest.raises(ValueError):
        ModelSpec(**{**values, **bad})


SCORES = torch.tensor([[[1.0, 9.0], [5.0, -2.0], [3.0, 4.0]],
                       [[7.0, 0.0], [2.0, 6.0], [-1.0, -8.0]]])
PRESENT = torch.tensor([[True, False, True], [False, False, True]])


def test_fuse_scores_max_ignores_absent_devices() -> None:
    fused = fuse_scores(SCORES, PRESENT, "max")
    assert torch.equal(fused, torch.tensor([[3.0, 9.0], [-1.0, -8.0]]))


def test_fuse_scores_mean_averages_present_devices_only() -> None:
    fused = fuse_scores(SCORES, PRESENT, "mean")
    assert torch.allclose(fused, torch.tensor([[2.0, 6.5], [-1.0, -8.0]]))


def test_fuse_features_over_present_devices_keeps_spatial_layout() -> None:
    features = torch.arange(2 * 3 * 2 * 4, dtype=torch.float32).reshape(2, 3, 2, 4)
    features[0, 1] = 1000.0                                  # absent: must never show up
    maxed = fuse_features(features, PRESENT, "max")
    meaned = fuse_features(features, PRESENT, "mean")
    assert maxed.shape == meaned.shape == (2, 2, 4)
    assert torch.equal(maxed[0], torch.maximum(features[0, 0], features[0, 2]))
    assert torch.allclose(meaned[0], (features[0, 0] + features[0, 2]) / 2)
    assert torch.equal(maxed[1], features[1, 2]) and torch.equal(meaned[1], features[1, 2])


def test_fuse_features_concat_is_in_sensor_order_and_zero_fills_absent_devices() -> None:
    features = torch.rand(2, 3, 2, 4, 4) + 1
    fused = fuse_features(features, PRESENT, "concat")
    assert fused.shape == (2, 6, 4, 4)
    assert torch.equal(fused[0, 0:2], features[0, 0])
    assert torch.equal(fused[0, 2:4], torch.zeros(2, 4, 4))
    assert torch.equal(fused[0, 4:6], features[0, 2])
    assert torch.equal(fused[1, 0:4], torch.zeros(4, 4, 4))


def test_unknown_fusion_mode_is_refused() -> None:
    with pytest.raises(ValueError):
        fuse_scores(SCORES, PRESENT, "median")


def test_an_absent_device_does_not_change_the_fused_exits() -> None:
    spec = ModelSpec(("a", "b"), "series", (3, 32), 4)
    model = _model(spec).eval()
    x = torch.randn(4, 2, 3, 32)
    present = torch.tensor([[True, False]] * 4)
    garbage = x.clone()
    garbage[:, 1] = 1e3 * torch.randn(4, 3, 32)
    with torch.no_grad():
        a, b = model(x, present), model(garbage, present)
    for name in ("local", "edge", "cloud"):
        assert torch.allclose(getattr(a, name), getattr(b, name))


def test_device_dropout_never_drops_every_device() -> None:
    rng = np.random.default_rng(0)
    present = sample_present(rng, 5000, 3, dropout=0.9)
    assert present.any(axis=1).all()
    assert 0.05 < present.mean() < 0.5                      # and it does drop devices
    assert sample_present(rng, 100, 4, dropout=0.0).all()


def _total_loss(model: DDNN, data: Dataset) -> float:
    logits = {k: torch.from_numpy(v) for k, v in predict(model, data).items()}
    y = torch.from_numpy(data.y)
    losses = exit_losses(Exits(**logits), y, torch.ones(len(data), 3, dtype=torch.bool))
    return float(sum(losses.values()))


def test_training_lowers_the_loss_and_sets_normalisation(series: Dataset) -> None:
    model = _model(ModelSpec.for_dataset(series))
    train_set = series.train()
    for name, (mean, std) in channel_stats(train_set).items():
        model.devices[name].set_normalization(mean, std)
    before = _total_loss(model, train_set)
    report = train(model, series, epochs=12, batch_size=32, seed=0, progress=False)
    after = _total_loss(model, train_set)
    assert isinstance(report, TrainReport)
    assert report.epochs == 12 and report.seconds > 0 and np.isfinite(report.final_loss)
    assert set(report.accuracy) == {"device", "local", "edge", "cloud"}
    assert after < 0.6 * before
    assert report.accuracy["cloud"] > 0.6
    expected = train_set.sensors["imu1"].mean(axis=(0, 2))
    assert np.allclose(model.devices["imu1"].mean.flatten().numpy(), expected, atol=1e-5)
    assert not model.training


def test_training_is_reproducible_for_a_seed(series: Dataset) -> None:
    def run(seed: int) -> dict[str, torch.Tensor]:
        model = _model(ModelSpec.for_dataset(series))
        train(model, series, epochs=2, batch_size=32, seed=seed, progress=False)
        return model.state_dict()

    first, again, other = run(0), run(0), run(1)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_image_model_trains_one_epoch_and_predicts_every_exit() -> None:
    data = multiview_images(n_events=40, cameras=2, num_classes=3, seed=0)
    model = _model(ModelSpec.for_dataset(data))
    train(model, data, epochs=1, batch_size=16, progress=False)
    present = np.ones((len(data), 2), bool)
    present[::2, 0] = False
    logits = predict(model, data, present)
    assert logits["device"].shape == (40, 2, 3)
    assert all(logits[k].shape == (40, 3) and logits[k].dtype == np.float32
               for k in ("local", "edge", "cloud"))
    with pytest.raises(ValueError, match="at least one present device"):
        predict(model, data, np.zeros((40, 2), bool))


def test_train_refuses_data_of_other_sensors_and_bad_settings(series: Dataset) -> None:
    other = ModelSpec(("x", "y", "z"), "series", (3, 32), 3)
    with pytest.raises(ValueError, match="sensors"):
        train(_model(other), series, epochs=1, progress=False)
    model = _model(ModelSpec.for_dataset(series))
    with pytest.raises(ValueError, match="exit_weights"):
        train(model, series, epochs=1, exit_weights={"fog": 1.0}, progress=False)
    with pytest.raises(ValueError, match="device_dropout"):
        train(model, series, epochs=1, device_dropout=1.0, progress=False)
