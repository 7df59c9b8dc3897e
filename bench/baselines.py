"""The classic baselines of ``fogsplit bench data``, on the raw samples of every sensor together.

- ``nn_euclidean``: 1-nearest-neighbour, Euclidean distance on the flattened samples.
- ``nn_dtw``: 1-nearest-neighbour, dependent DTW (all channels warped together) from aeon,
  full warping window unless one is given.
- ``minirocket``: aeon's MiniRocket (10,000 kernels) and a ridge classifier with
  cross-validated regularisation (RidgeClassifierCV), seeded.

Preparation, the same for all three: the sensors' channels are stacked (``[N, C, T]``), each
channel is z-normalised with the mean and deviation of the training split (NaN ignored), and
NaN (missing values, and the padding after a short series' end) becomes 0 afterwards: the
channel mean. DTW and MiniRocket need one time axis, so they apply to series whose sensors share
a length; otherwise, and for images, they give None with the reason. aeon is imported inside
the functions that need it: it is a benchmark-only dependency (the ``bench`` extra).
"""
from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass

import numpy as np

from fogsplit.core.dataset import Dataset

log = logging.getLogger(__name__)

NAMES = ("nn_euclidean", "nn_dtw", "minirocket")
MINIROCKET_KERNELS = 10_000
MINIROCKET_MIN_LENGTH = 9     # MiniRocket's dilated kernels span 9 steps


@dataclass(frozen=True)
class Score:
    """A baseline's test accuracy, or None and why it does not apply."""

    accuracy: float | None
    seconds: float = 0.0
    reason: str | None = None


def stacked_channels(data: Dataset) -> np.ndarray | None:
    """Every sensor's channels stacked, float32 ``[N, C, T]``; None for images or sensors of
    different lengths (no shared time axis)."""
    arrays = list(data.sensors.values())
    if data.kind != "series" or len({a.shape[-1] for a in arrays}) > 1:
        return None
    return np.concatenate([a.astype(np.float32) for a in arrays], axis=1)


def flattened(data: Dataset) -> np.ndarray:
    """Every sensor's channels as rows ``[N, C_total, L]`` (images flattened; sensors of
    different lengths padded with NaN to the longest): what a Euclidean distance can compare."""
    rows = [a.reshape(a.shape[0], a.shape[1], -1).astype(np.float32) for a in data.sensors.values()]
    length = max(r.shape[2] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, 0), (0, length - r.shape[2])), constant_values=np.nan) for r in rows]
    return np.concatenate(rows, axis=1)


def znormalise(x: np.ndarray, train: np.ndarray) -> np.ndarray:
    """Per channel, with the training rows' statistics (NaN ignored); then NaN -> 0."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)      # a channel that is all NaN
        mean = np.nanmean(x[train], axis=(0, 2), keepdims=True)
        std = np.nanstd(x[train], axis=(0, 2), keepdims=True)
    mean = np.nan_to_num(mean)
    std = np.where(np.isfinite(std) & (std > 1e-8), std, 1.0)
    return np.nan_to_num((x - mean) / std, nan=0.0).astype(np.float32)


def nn_euclidean(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, chunk: int = 256) -> np.ndarray:
    """Labels of the nearest training sample (squared Euclidean distance, computed in chunks)."""
    a = train_x.reshape(len(train_x), -1).astype(np.float64)
    b = test_x.reshape(len(test_x), -1).astype(np.float64)
    norms = (a * a).sum(1)
    out = np.empty(len(b), dtype=train_y.dtype)
    for start in range(0, len(b), chunk):
        part = b[start:start + chunk]
        d = norms[None, :] - 2 * part @ a.T          # |b|^2 is the same for every candidate
        out[start:start + chunk] = train_y[d.argmin(1)]
    return out


def nn_dtw(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, window: float | None = None) -> np.ndarray:
    from aeon.classification.distance_based import KNeighborsTimeSeriesClassifier
    params = {} if window is None else {"window": window}
    clf = KNeighborsTimeSeriesClassifier(distance="dtw", distance_params=params, n_neighbors=1, n_jobs=1)
    clf.fit(train_x.astype(np.float64), train_y)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="unsafe cast")    # numba, inside aeon's DTW: harmless
        return clf.predict(test_x.astype(np.float64)).astype(train_y.dtype)


def minirocket(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, seed: int) -> np.ndarray:
    from aeon.classification.convolution_based import MiniRocketClassifier
    clf = MiniRocketClassifier(n_kernels=MINIROCKET_KERNELS, random_state=seed, n_jobs=1)
    clf.fit(train_x.astype(np.float32), train_y)
    return clf.predict(test_x.astype(np.float32)).astype(train_y.dtype)


def _timed(name: str, predict, test_y: np.ndarray) -> Score:
    started = time.perf_counter()
    predicted = predict()
    seconds = time.perf_counter() - started
    accuracy = round(float((predicted == test_y).mean()), 4)
    log.info("%s: accuracy %.4f in %.1fs", name, accuracy, seconds)
    return Score(accuracy, round(seconds, 2))


def series_reason(data: Dataset, series: np.ndarray | None) -> str | None:
    """Why the series baselines (DTW, MiniRocket) do not apply to ``data``, or None."""
    if data.kind == "image":
        return "images: DTW and MiniRocket are baselines for series"
    if series is None:
        return "the sensors have different lengths: no shared time axis"
    return None


def classic_baselines(data: Dataset, *, seed: int = 0, dtw_window: float | None = None,
                      which: tuple[str, ...] = NAMES) -> dict[str, Score]:
    """Each baseline of ``which`` trained on ``data``'s train split, scored on its test split."""
    train, test = data.split == 0, data.split == 1
    y = data.y
    out: dict[str, Score] = {}
    if "nn_euclidean" in which:
        flat = znormalise(flattened(data), train)
        out["nn_euclidean"] = _timed("1-NN Euclidean", lambda: nn_euclidean(flat[train], y[train], flat[test]),
                                     y[test])
    series = stacked_channels(data)
    why = series_reason(data, series)
    if series is not None:
        series = znormalise(series, train)
    if "nn_dtw" in which:
        out["nn_dtw"] = Score(None, reason=why) if why else _timed(
            "1-NN DTW", lambda: nn_dtw(series[train], y[train], series[test], dtw_window), y[test])
    if "minirocket" in which:
        if not why and series.shape[2] < MINIROCKET_MIN_LENGTH:
            why = f"series of {series.shape[2]} steps; MiniRocket needs at least {MINIROCKET_MIN_LENGTH}"
        out["minirocket"] = Score(None, reason=why) if why else _timed(
            "MiniRocket", lambda: minirocket(series[train], y[train], series[test], seed), y[test])
    return out
