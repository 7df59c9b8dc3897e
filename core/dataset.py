"""Multi-sensor datasets in memory and on disk.

On-disk format (one ``.npz``):

- ``x_<sensor>``: one array per sensor, ``[N, C, H, W]`` (image) or ``[N, C, T]`` (time series).
  Every sensor of a file has the same kind (all series or all images); their channel counts and
  sizes may differ (an accelerometer at 50 Hz beside a microphone at 8 kHz): the export plans
  each device shard so that the features meet on one grid. Sizes start at ``MIN_SIZE`` (4).
  Float arrays may hold NaN: a missing value, or, after the last value of a series, the end of a
  shorter series (variable length). Infinite values are refused.
- ``y``: ``[N]`` integer labels in ``0..num_classes-1``.
- ``split`` (optional): ``[N]``, 0 for train and 1 for test; otherwise a seeded 80/20 split.
- ``classes`` (optional): ``[num_classes]`` strings; otherwise ``class0``, ``class1``, ...
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fogsplit.core.errors import DataError

MAX_SENSORS = 64
MIN_SIZE = 4   # the shortest series, the smallest image side: the device shard downsamples by 4
SPLIT_SEED = 0


@dataclass(frozen=True)
class Dataset:
    """Samples of several co-located sensors that observe the same events."""

    sensors: dict[str, np.ndarray]
    y: np.ndarray
    split: np.ndarray
    classes: tuple[str, ...]
    name: str = "data"

    @property
    def sensor_names(self) -> list[str]:
        return list(self.sensors)

    @property
    def kind(self) -> str:
        """``image`` for ``[N, C, H, W]`` sensors, ``series`` for ``[N, C, T]``."""
        return "image" if next(iter(self.sensors.values())).ndim == 4 else "series"

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The sample shape ``[C, ...]`` of each sensor."""
        return {k: tuple(int(d) for d in v.shape[1:]) for k, v in self.sensors.items()}

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The one sample shape all sensors share; a ValueError when they differ."""
        shapes = set(self.shapes.values())
        if len(shapes) > 1:
            raise ValueError(f"the sensors of {self.name} have different shapes {self.shapes}")
        return shapes.pop()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, mask_or_index: np.ndarray, name: str | None = None) -> "Dataset":
        return Dataset(
            sensors={k: v[mask_or_index] for k, v in self.sensors.items()},
            y=self.y[mask_or_index],
            split=self.split[mask_or_index],
            classes=self.classes,
            name=name or self.name,
        )

    def train(self) -> "Dataset":
        return self.subset(self.split == 0, f"{self.name}:train")

    def test(self) -> "Dataset":
        return self.subset(self.split == 1, f"{self.name}:test")

    def arrays(self) -> list[np.ndarray]:
        """Each sensor's samples ``[N, C, ...]``, in sensor order."""
        return [self.sensors[k] for k in self.sensors]


def make_dataset(sensors: dict[str, np.ndarray], y: np.ndarray, *,
                 split: np.ndarray | None = None, classes: list[str] | None = None,
                 name: str = "data", source: str = "dataset") -> Dataset:
    """Validate arrays and build a :class:`Dataset`; raises :class:`DataError` naming the array."""
    if not sensors:
        raise DataError(source, "no sensor arrays (expected at least one array named x_<sensor>)")
    if len(sensors) > MAX_SENSORS:
        raise DataError(source, f"{len(sensors)} sensors; at most {MAX_SENSORS} are supported")
    y = np.asarray(y)
    if y.ndim != 1:
        raise DataError(source, f"array 'y' must have shape [N], got {list(y.shape)}")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(source, f"array 'y' must hold integer labels, got dtype {y.dtype}")
    n = y.shape[0]
    if n < 2:
        raise DataError(source, f"array 'y' has {n} samples; at least 2 are needed")
    if y.min() < 0:
        raise DataError(source, f"array 'y' has negative label {int(y.min())}")
    first: tuple[str, int] | None = None
    checked: dict[str, np.ndarray] = {}
    for key, arr in sensors.items():
        arr = np.asarray(arr)
        label = f"x_{key}"
        if not key or not key.replace("_", "").replace("-", "").isalnum() or len(key) > 32:
            raise DataError(source, f"sensor name {key!r} must be 1-32 letters, digits, '-' or '_'")
        _check_samples(arr, label, source)
        if arr.shape[0] != n:
            raise DataError(source, f"array '{label}' has {arr.shape[0]} samples but 'y' has {n}")
        if first is None:
            first = (label, arr.ndim)
        elif arr.ndim != first[1]:
            raise DataError(source, f"array '{label}' is {_KIND[arr.ndim]} {list(arr.shape)} but '{first[0]}' is "
                                    f"{_KIND[first[1]]}: all sensors of a file must be of one kind")
        checked[key] = arr
    if classes is None:
        classes = [f"class{i}" for i in range(int(y.max()) + 1)]
    classes = [str(c) for c in classes]
    if int(y.max()) >= len(classes):
        raise DataError(source, f"array 'y' has label {int(y.max())} but 'classes' names only {len(classes)}")
    if len(classes) < 2:
        raise DataError(source, "at least 2 classes are needed")
    if split is None:
        rng = np.random.default_rng(SPLIT_SEED)
        split = (rng.random(n) >= 0.8).astype(np.int8)
    else:
        split = np.asarray(split)
        if split.shape != (n,):
            raise DataError(source, f"array 'split' must have shape [{n}], got {list(split.shape)}")
        if not np.isin(split, (0, 1)).all():
            raise DataError(source, "array 'split' may hold only 0 (train) and 1 (test)")
        split = split.astype(np.int8)
    if not (split == 0).any() or not (split == 1).any():
        raise DataError(source, "the split leaves no train or no test samples")
    return Dataset(sensors=checked, y=y.astype(np.int64), split=split, classes=tuple(classes), name=name)


_KIND = {3: "a series", 4: "an image"}


def _check_samples(arr: np.ndarray, label: str, source: str) -> None:
    """One sensor's samples: ``[N, C, T]`` or ``[N, C, H, W]``, numeric, sizes >= MIN_SIZE, NaN
    allowed (missing, or past the end of a shorter series), infinities refused."""
    if arr.ndim not in (3, 4):
        raise DataError(source, f"array '{label}' must be [N, C, T] or [N, C, H, W], got {list(arr.shape)}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise DataError(source, f"array '{label}' must be numeric, got dtype {arr.dtype}")
    if arr.shape[1] < 1:
        raise DataError(source, f"array '{label}' has no channels: {list(arr.shape)}")
    small = [d for d in arr.shape[2:] if d < MIN_SIZE]
    if small:
        what = "a series length" if arr.ndim == 3 else "an image side"
        raise DataError(source, f"array '{label}' has {what} of {small[0]} in {list(arr.shape)}; "
                                f"the shortest supported is {MIN_SIZE}")
    if np.issubdtype(arr.dtype, np.floating):
        if np.isinf(arr).any():
            raise DataError(source, f"array '{label}' contains infinite values")
        empty = np.isnan(arr).reshape(arr.shape[0], -1).all(axis=1)
        if empty.any():
            raise DataError(source, f"array '{label}' sample {int(np.flatnonzero(empty)[0])} is all NaN: "
                                    "no value was captured")


def _open_npz(path: Path):
    """The archive at ``path``, opened lazily (arrays are read when asked for), or a DataError."""
    source = str(path)
    if not path.is_file():
        raise DataError(source, "no such file")
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise DataError(source, f"not a readable .npz file ({exc})") from exc
    if not hasattr(archive, "files"):
        raise DataError(source, "a single array, not a .npz archive of x_<sensor>, y, split")
    return archive


def load_npz(path: str | Path) -> Dataset:
    """Read a dataset in the documented ``.npz`` format."""
    path = Path(path)
    source = str(path)
    with _open_npz(path) as archive:
        names = list(archive.files)
        unknown = [k for k in names if not k.startswith("x_") and k not in ("y", "split", "classes")]
        if unknown:
            raise DataError(source, f"unknown arrays {unknown}; expected x_<sensor>, y, split, classes")
        if "y" not in names:
            raise DataError(source, "missing array 'y' (integer labels [N])")
        try:
            sensors = {k[2:]: archive[k] for k in names if k.startswith("x_")}
            classes = [str(c) for c in archive["classes"]] if "classes" in names else None
            split = archive["split"] if "split" in names else None
            y = archive["y"]
        except ValueError as exc:
            raise DataError(source, f"an array could not be read ({exc})") from exc
    return make_dataset(sensors, y, split=split, classes=classes, name=path.stem, source=source)


def save_npz(dataset: Dataset, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"x_{k}": v for k, v in dataset.sensors.items()}
    np.savez_compressed(path, y=dataset.y, split=dataset.split,
                        classes=np.array(dataset.classes), **arrays)
    return path


# -- replay files: what one device reads ------------------------------------------------------

def save_replay(dataset: Dataset, sensor: str, path: str | Path, split: str = "test") -> Path:
    """Write one sensor's samples of ``split`` (train, test or all) as a replay file.

    The file keeps the documented format (``x_<sensor>``, ``y``, ``split``, ``classes``) with
    that one sensor, and ``split`` all 1 when the samples are test samples, so that a device
    replays them with its default ``split = "test"``. It holds no training samples, so it is
    for devices (:func:`load_sensor`), not for ``fogsplit export``."""
    if sensor not in dataset.sensors:
        raise DataError(dataset.name, f"no sensor {sensor!r} (it has {dataset.sensor_names})")
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be train, test or all, got {split!r}")
    part = dataset if split == "all" else (dataset.test() if split == "test" else dataset.train())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **{f"x_{sensor}": part.sensors[sensor]}, y=part.y, split=part.split,
                        classes=np.array(part.classes))
    return path


def load_sensor(path: str | Path, sensor: str, split: str = "test") -> np.ndarray:
    """The samples of one sensor in a ``.npz`` of the documented format (a replay file or a
    whole data set), reading only ``x_<sensor>`` and ``split`` (or ``y``): ``np.load`` reads
    an archive's arrays one by one, when asked for, so a device never holds its peers' data."""
    path = Path(path)
    source, key = str(path), f"x_{sensor}"
    with _open_npz(path) as archive:
        names = list(archive.files)
        if key not in names:
            have = [k[2:] for k in names if k.startswith("x_")]
            raise DataError(source, f"no array '{key}': this file holds sensors {have}; make a replay file of "
                                    f"this device with: fogsplit data replay --sensor {sensor} ...")
        try:
            samples = archive[key]
            marks = archive["split"] if "split" in names else None
            count = samples.shape[0] if marks is not None or "y" not in names else archive["y"].shape[0]
        except ValueError as exc:
            raise DataError(source, f"an array could not be read ({exc})") from exc
    _check_samples(samples, key, source)
    if split == "all":
        chosen = samples
    else:
        if marks is None:
            marks = (np.random.default_rng(SPLIT_SEED).random(count) >= 0.8).astype(np.int8)
        if marks.shape != (samples.shape[0],) or not np.isin(marks, (0, 1)).all():
            raise DataError(source, f"array 'split' must be [{samples.shape[0]}] of 0 (train) and 1 (test)")
        chosen = samples[marks == (1 if split == "test" else 0)]
    if len(chosen) == 0:
        raise DataError(source, f"array '{key}' has no {split} samples (a replay file holds the test samples; "
                                "give split = \"all\" or make one of the part you want)")
    return chosen
