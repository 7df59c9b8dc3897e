"""The built-in generators: deterministic, well-formed, and with uninformative sensors."""
from __future__ import annotations

import numpy as np
import pytest

from fogsplit.core.dataset import Dataset
from fogsplit.export import datasets
from fogsplit.export.datasets import (ACTIVITIES, SHAPES, CameraRig, ImuRig, imu_series,
                                      multiview_images, multiview_scene, render_view,
                                      render_views)


@pytest.fixture(scope="module")
def images() -> Dataset:
    return multiview_images(n_events=60, cameras=3, num_classes=4, seed=3)


@pytest.fixture(scope="module")
def series() -> Dataset:
    return imu_series(n_events=80, devices=3, num_classes=5, window=32, seed=3)


def _same(a: Dataset, b: Dataset) -> bool:
    return (a.sensor_names == b.sensor_names and np.array_equal(a.y, b.y)
            and np.array_equal(a.split, b.split)
            and all(np.array_equal(a.sensors[k], b.sensors[k]) for k in a.sensors))


def test_images_shapes_dtypes_and_classes(images: Dataset) -> None:
    assert images.sensor_names == ["cam0", "cam1", "cam2"]
    assert images.kind == "image"
    for values in images.sensors.values():
        assert values.shape == (60, 3, 32, 32)
        assert values.dtype == np.uint8
    assert images.classes == SHAPES[:4]
    assert images.y.min() >= 0 and images.y.max() < 4
    assert images.name == "multiview_images"


def test_series_shapes_dtypes_and_classes(series: Dataset) -> None:
    assert series.sensor_names == ["imu0", "imu1", "imu2"]
    assert series.kind == "series"
    for values in series.sensors.values():
        assert values.shape == (80, 3, 32)
        assert values.dtype == np.float32
        assert np.isfinite(values).all()
    assert series.classes == ACTIVITIES[:5]


@pytest.mark.parametrize("make", [multiview_images, imu_series])
def test_split_is_explicit_and_sized(make) -> None:
    ds = make(n_events=50, seed=1, test_fraction=0.2)
    assert set(np.unique(ds.split)) == {0, 1}
    assert (ds.split == 1).sum() == 10
    assert len(ds.train()) == 40 and len(ds.test()) == 10


@pytest.mark.parametrize("make", [multiview_images, imu_series])
def test_same_seed_same_arrays_other_seed_other_arrays(make) -> None:
    a, b, c = make(n_events=40, seed=5), make(n_events=40, seed=5), make(n_events=40, seed=6)
    assert _same(a, b)
    assert not _same(a, c)
    assert not np.array_equal(a.sensors[a.sensor_names[0]], c.sensors[c.sensor_names[0]])


def test_generators_validate_through_make_dataset(monkeypatch) -> None:
    calls = []
    real = datasets.make_dataset

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(datasets, "make_dataset", spy)
    multiview_images(n_events=10, cameras=2)
    imu_series(n_events=10, devices=2)
    assert len(calls) == 2
    assert all(call["split"] is not None and call["classes"] for call in calls)


@pytest.mark.parametrize("kwargs", [{"num_classes": 1}, {"num_classes": len(SHAPES) + 1},
                                    {"cameras": 0}, {"test_fraction": 1.0}])
def test_images_reject_bad_arguments(kwargs) -> None:
    with pytest.raises(ValueError):
        multiview_images(n_events=10, **kwargs)


def test_rig_must_match_the_camera_count() -> None:
    with pytest.raises(ValueError, match="3 cameras"):
        multiview_images(n_events=10, cameras=3, rig=CameraRig.default(2))
    with pytest.raises(ValueError, match="2 devices"):
        imu_series(n_events=10, devices=2, rig=ImuRig.default(4))


def test_some_views_miss_the_object_and_then_carry_no_class_information() -> None:
    labels = np.arange(200) % 6
    views = multiview_scene(labels, CameraRig.default(4), np.random.default_rng(0))
    images, coverage = render_views(views[0], np.random.default_rng(1))
    empty = coverage == 0
    assert 0.1 < empty.mean() < 0.5        # out of view sometimes, not mostly
    assert (coverage[~empty] > 0.02).all()
    relabelled = views[0].take(slice(None))
    relabelled.shape = (relabelled.shape + 1) % 6
    other, _ = render_views(relabelled, np.random.default_rng(1))
    assert np.array_equal(images[empty], other[empty])       # clutter only: the class is invisible
    assert not np.array_equal(images[~empty], other[~empty])


def test_cameras_share_the_object_colour_but_not_the_pose() -> None:
    views = multiview_scene(np.zeros(30, int), CameraRig.default(2), np.random.default_rng(0))
    assert np.array_equal(views[0].color, views[1].color)
    assert not np.array_equal(views[0].rotation, views[1].rotation)


def test_render_view_draws_the_requested_shape_where_asked() -> None:
    rng = np.random.default_rng(0)
    common = dict(noise=0.0, parts=np.full((2, 8), -1.0), exposure=1.0, rotation=0.0,
                  squash=1.0, scale=0.5, color=(1.0, 1.0, 1.0), shading=(0.0, 0.0),
                  background=(0.1, 0.1, 0.1), gradient=(0.0, 0.0),
                  blobs=np.tile([0.0, 0.0, 0.2, 0.0, 0.0, 0.0], (3, 1)))
    left = render_view(SHAPES.index("disc"), rng, center=(-0.5, 0.0), **common)
    right = render_view(SHAPES.index("disc"), rng, center=(0.5, 0.0), **common)
    ring = render_view(SHAPES.index("ring"), rng, center=(0.5, 0.0), **common)
    assert left.shape == (3, 32, 32) and left.dtype == np.uint8
    assert left[:, 16, 8].min() > 200 and left[:, 16, 24].max() < 60
    assert right[:, 16, 24].min() > 200
    assert ring[:, 16, 24].max() < 60                        # the ring's hole
    assert ring[:, 16, 24 - 6].min() > 200                   # the ring itself


def test_some_imu_devices_are_idle() -> None:
    rig = ImuRig(mount=np.stack([np.eye(3)] * 2), gain=np.ones(2), idle=np.array([0.0, 1.0]))
    moving = imu_series(n_events=40, devices=2, seed=0, rig=rig)
    active, idle = moving.sensors["imu0"], moving.sensors["imu1"]
    # an idle device reads roughly 1 g of gravity in a random direction, little motion
    assert np.median(np.linalg.norm(idle.mean(axis=2), axis=1)) == pytest.approx(1.0, abs=0.15)
    run = moving.y == ACTIVITIES.index("run")
    assert active[run].std(axis=2).mean() > 1.5 * idle[run].std(axis=2).mean()


def test_activities_differ_in_cadence() -> None:
    t = np.arange(256) / datasets.SAMPLE_RATE
    peaks = {}
    for activity, name in enumerate(ACTIVITIES):
        low, high = datasets.CADENCE[name]
        freq = np.full(1, (low + high) / 2)
        up = datasets.body_motion(activity, t, freq, np.zeros(1), np.ones(1))[0, 2]
        spectrum = np.abs(np.fft.rfft(up - up.mean()))
        peaks[name] = np.fft.rfftfreq(t.size, 1 / datasets.SAMPLE_RATE)[spectrum.argmax()]
    assert peaks["run"] > peaks["walk"] > peaks["stairs"]
