"""Redundant streams: the same scene seen over consecutive frames, then a new one (numpy only).

IoT streams repeat themselves (a camera sees the same parked car for minutes); that is what a
semantic cache is for. A scene here is one object in front of the cell's cameras, drawn exactly
as :func:`fogsplit.export.datasets.multiview_scene` draws an event. Each frame of the scene
re-renders it with small changes in pose (position, rotation), light (exposure, shading) and
fresh pixel noise, while the background, clutter and which cameras see the object stay put.

``redundancy`` is the probability that the next frame continues the current scene, so scenes
last ``1 / (1 - redundancy)`` frames on average; 0 gives independent events, like the
training data.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from fogsplit.core.dataset import Dataset

from fogsplit.export.datasets import SHAPES, CameraRig, ViewParams, multiview_scene, render_views


@dataclass(frozen=True)
class Drift:
    """How much one frame of a scene differs from the scene's first draw (standard deviations)."""

    center: float = 0.03       # image units ([-1, 1] across): about half a pixel
    rotation: float = 0.05     # radians
    exposure: float = 0.04     # log-factor of brightness
    shading: float = 0.03


@dataclass(frozen=True)
class Stream:
    """Frames in order with the scene each belongs to (``scene`` [N], non-decreasing)."""

    data: Dataset
    scene: np.ndarray

    @property
    def scenes(self) -> int:
        return int(self.scene.max()) + 1 if self.scene.size else 0

    @property
    def repeated_fraction(self) -> float:
        """Share of frames that show a scene already shown the frame before."""
        return float((np.diff(self.scene) == 0).mean()) if self.scene.size > 1 else 0.0


def scene_ids(n_frames: int, redundancy: float, rng: np.random.Generator) -> np.ndarray:
    """Scene index of each frame: a new scene starts with probability ``1 - redundancy``."""
    if not 0 <= redundancy < 1:
        raise ValueError(f"redundancy must be in [0, 1), got {redundancy}")
    if n_frames < 1:
        raise ValueError(f"n_frames must be >= 1, got {n_frames}")
    new = rng.random(n_frames) >= redundancy
    new[0] = True
    return np.cumsum(new) - 1


def drift_views(base: ViewParams, scene: np.ndarray, drift: Drift, rng: np.random.Generator) -> ViewParams:
    """One view per frame: the scene's base view nudged in pose and light."""
    views = base.take(scene)
    m = len(views)
    return replace(
        views,
        center=views.center + rng.normal(0, drift.center, (m, 2)),
        rotation=views.rotation + rng.normal(0, drift.rotation, m),
        exposure=views.exposure * np.exp(rng.normal(0, drift.exposure, m)),
        shading=views.shading + rng.normal(0, drift.shading, (m, 2)),
    )


def redundant_images(n_frames: int = 1000, cameras: int = 6, num_classes: int = 6, seed: int = 0,
                     redundancy: float = 0.9, drift: Drift | None = None,
                     rig: CameraRig | None = None) -> Stream:
    """A multi-camera stream of ``n_frames`` in which scenes repeat with ``redundancy``.

    Same cameras, classes and rendering as :func:`~fogsplit.export.datasets.multiview_images`,
    so a bundle trained on that data runs on this stream unchanged. Every frame is in the test
    split (a stream is for serving, not training).
    """
    if not 2 <= num_classes <= len(SHAPES):
        raise ValueError(f"num_classes must be in 2..{len(SHAPES)}, got {num_classes}")
    rig = rig or CameraRig.default(cameras)
    drift = drift or Drift()
    rng = np.random.default_rng(seed)
    scene = scene_ids(n_frames, redundancy, rng)
    labels = rng.integers(0, num_classes, int(scene[-1]) + 1)
    sensors = {}
    for cam, base in enumerate(multiview_scene(labels, rig, rng)):
        sensors[f"cam{cam}"] = render_views(drift_views(base, scene, drift, rng), rng)[0]
    data = Dataset(sensors=sensors, y=labels[scene].astype(np.int64), split=np.ones(n_frames, np.int8),
                   classes=tuple(SHAPES[:num_classes]), name=f"redundant_images(r={redundancy})")
    return Stream(data=data, scene=scene)
