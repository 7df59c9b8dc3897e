"""The UEA/UCR time-series archive's ``.ts`` files, read into a multi-sensor :class:`Dataset`.

The files are the ones shipped inside the ``aeon`` wheel (``aeon/datasets/data/<Name>/``); they
are located without importing aeon, and parsed here, so that reading them costs numpy only.

Format (https://www.aeon-toolkit.org, "ts file format"): ``#`` comments, then header lines
``@problemName``, ``@timeStamps``, ``@missing``, ``@univariate``, ``@dimensions``,
``@equalLength``, ``@seriesLength``, ``@classLabel true <labels...>``, then ``@data`` and one
case a line: ``dim0values:dim1values:...:label``, values comma-separated, ``?`` missing.

Conventions (those of the ``.npz`` format): variable-length series are padded with NaN after
their end to the longest length of the train and test files together (NaN after the end marks
the end); a missing value inside a series stays NaN. The archive's own split is kept (train 0,
test 1), classes are ``@classLabel``'s, in its order, and the dimensions are grouped into
sensors by a ``{"sensor": [dims...]}`` mapping (:data:`PRESETS` for the archive sets).
"""
from __future__ import annotations

import importlib.util
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fogsplit.core.dataset import Dataset, make_dataset
from fogsplit.core.errors import DataError

log = logging.getLogger(__name__)

PREFIX = "uea:"
# How the archive sets' dimensions become sensors (devices).
PRESETS: dict[str, dict[str, list[int]]] = {
    # a wrist-worn smartwatch: 3-axis accelerometer, 3-axis gyroscope
    "BasicMotions": {"accel": [0, 1, 2], "gyro": [3, 4, 5]},
    # 12 LPC cepstrum coefficients, split into three bands of four
    "JapaneseVowels": {"lpc0": [0, 1, 2, 3], "lpc1": [4, 5, 6, 7], "lpc2": [8, 9, 10, 11]},
}
_FLAGS = ("timestamps", "missing", "univariate", "equallength")
_HEADERS = {"problemname", "dimensions", "serieslength", "classlabel", "targetlabel", "data", *_FLAGS}


@dataclass(frozen=True)
class TsFile:
    """One parsed ``.ts`` file: ``x`` is float32 ``[N, D, T]``, NaN after each series' end."""

    path: Path
    problem: str
    x: np.ndarray
    labels: np.ndarray          # [N] indices into ``classes``
    classes: tuple[str, ...]
    lengths: np.ndarray         # [N] each series' own length

    @property
    def dimensions(self) -> int:
        return int(self.x.shape[1])


@dataclass(frozen=True)
class Archive:
    """A train/test pair before it becomes a :class:`Dataset`: the raw arrays."""

    name: str
    x: np.ndarray               # float32 [N, D, T], train then test
    y: np.ndarray               # int64 [N]
    split: np.ndarray           # int8 [N]: 0 train, 1 test
    classes: tuple[str, ...]
    lengths: np.ndarray         # int64 [N]
    source: str


# -- locating the files ------------------------------------------------------------------------

def aeon_data_dir() -> Path | None:
    """``aeon/datasets/data`` of the installed aeon, found without importing aeon; None without it."""
    spec = importlib.util.find_spec("aeon")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"


def archive_files(name: str) -> tuple[Path, Path]:
    """``<Name>_TRAIN.ts`` and ``<Name>_TEST.ts`` of an archive set shipped with aeon."""
    source = PREFIX + name
    root = aeon_data_dir()
    if root is None:
        raise DataError(source, "the UEA files ship inside the aeon wheel, and aeon is not installed: "
                                "pip install 'fogsplit[bench]' (or pip install aeon)")
    train, test = root / name / f"{name}_TRAIN.ts", root / name / f"{name}_TEST.ts"
    if not train.is_file() or not test.is_file():
        have = sorted(p.parent.name for p in root.glob("*/*_TRAIN.ts"))
        raise DataError(source, f"no {train.name} and {test.name} in {root}; the sets there are {have}")
    return train, test


def pair_of(train: Path) -> Path:
    """The ``*_TEST.ts`` beside a ``*_TRAIN.ts``."""
    if not train.name.upper().endswith("_TRAIN.TS"):
        raise DataError(str(train), "expected a file named <Name>_TRAIN.ts (its <Name>_TEST.ts is read beside it)")
    stem = train.name[:-len("_TRAIN.ts")]
    for suffix in ("_TEST.ts", "_test.ts", "_TEST.TS"):
        if (test := train.with_name(stem + suffix)).is_file():
            return test
    raise DataError(str(train), f"no {stem}_TEST.ts beside it")


# -- parsing one file --------------------------------------------------------------------------

class _Header:
    """The header lines of one file, checked as they come."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.problem = path.stem.rsplit("_", 1)[0]
        self.flags: dict[str, bool] = {}
        self.dimensions: int | None = None
        self.length: int | None = None
        self.classes: tuple[str, ...] | None = None

    def error(self, line: int, problem: str) -> DataError:
        return DataError(f"{self.path}:{line}", problem)

    def add(self, line: int, text: str) -> None:
        key, _, rest = text[1:].partition(" ")
        key, rest = key.lower(), rest.strip()
        if key not in _HEADERS:
            raise self.error(line, f"unknown header @{text[1:].split()[0] if text[1:].split() else ''}; "
                                   f"expected one of @problemName, @timeStamps, @missing, @univariate, "
                                   f"@dimensions, @equalLength, @seriesLength, @classLabel, @data")
        if key == "problemname":
            self.problem = rest or self.problem
        elif key in _FLAGS:
            if rest.lower() not in ("true", "false"):
                raise self.error(line, f"@{key} must be true or false, got {rest!r}")
            self.flags[key] = rest.lower() == "true"
            if key == "timestamps" and self.flags[key]:
                raise self.error(line, "@timeStamps true: series with time stamps are not supported")
        elif key in ("dimensions", "serieslength"):
            if not rest.isdigit() or int(rest) < 1:
                raise self.error(line, f"@{key} must be a positive integer, got {rest!r}")
            setattr(self, "dimensions" if key == "dimensions" else "length", int(rest))
        elif key == "targetlabel":
            raise self.error(line, "@targetLabel: a regression problem; only classification (@classLabel) is read")
        elif key == "classlabel":
            self.classes = self._classes(line, rest)

    def _classes(self, line: int, rest: str) -> tuple[str, ...]:
        flag, *labels = rest.split()
        if flag.lower() != "true":
            raise self.error(line, f"@classLabel {flag}: no class labels; only labelled files are read")
        if len(labels) < 2:
            raise self.error(line, f"@classLabel true names {len(labels)} classes; at least 2 are needed")
        if len(set(labels)) != len(labels):
            raise self.error(line, f"@classLabel repeats a label: {labels}")
        return tuple(labels)

    def finish(self, line: int) -> None:
        """Checks once ``@data`` is reached."""
        if self.classes is None:
            raise self.error(line, "@data comes before any @classLabel true <labels...> line")
        if self.flags.get("univariate") and self.dimensions not in (None, 1):
            raise self.error(line, f"@univariate true but @dimensions {self.dimensions}")
        if self.flags.get("univariate"):
            self.dimensions = 1


def _values(header: _Header, line: int, dim: int, text: str) -> np.ndarray:
    """One dimension of one case: comma-separated numbers, ``?`` for a missing value."""
    parts = text.split(",")
    if not text.strip():
        raise header.error(line, f"dimension {dim} has no values")
    try:
        values = np.array(parts, dtype=np.float64)
    except ValueError:
        values = np.empty(len(parts))
        for i, part in enumerate(parts):
            part = part.strip()
            if part == "?":
                if header.flags.get("missing") is False:
                    raise header.error(line, f"dimension {dim}, value {i}: '?' (missing) but the header says "
                                             "@missing false") from None
                values[i] = math.nan
                continue
            try:
                values[i] = float(part)
            except ValueError:
                raise header.error(line, f"dimension {dim}, value {i}: {part[:40]!r} is not a number") from None
    if np.isinf(values).any():
        raise header.error(line, f"dimension {dim}, value {int(np.isinf(values).argmax())}: infinite")
    return values


def _case(header: _Header, line: int, text: str) -> tuple[list[np.ndarray], int]:
    """One data line: its dimensions and its label's index."""
    *dims, label = text.split(":")
    expected = header.dimensions
    if expected is not None and len(dims) != expected:
        raise header.error(line, f"{len(dims)} dimensions, the header says {expected} "
                                 f"(a case is dim0:dim1:...:label)")
    label = label.strip()
    if label not in header.classes:
        raise header.error(line, f"unknown label {label[:40]!r}; @classLabel names {list(header.classes)}")
    series = [_values(header, line, d, part) for d, part in enumerate(dims)]
    lengths = {len(s) for s in series}
    if len(lengths) > 1:
        raise header.error(line, f"its dimensions have different lengths {[len(s) for s in series]}; "
                                 "the dimensions of one case must be as long as each other")
    length = lengths.pop()
    if header.flags.get("equallength") and header.length is not None and length != header.length:
        raise header.error(line, f"series of length {length}, the header says @seriesLength {header.length}")
    return series, header.classes.index(label)


def read_ts(path: str | Path) -> TsFile:
    """Parse one ``.ts`` file; a :class:`DataError` names the file, the line and the problem."""
    path = Path(path)
    if not path.is_file():
        raise DataError(str(path), "no such file")
    header = _Header(path)
    cases: list[list[np.ndarray]] = []
    labels: list[int] = []
    in_data = False
    number = 0
    try:
        with path.open(encoding="utf-8") as lines:
            for number, raw in enumerate(lines, start=1):
                text = raw.strip()
                if not text or text.startswith("#"):
                    continue
                if not in_data:
                    if not text.startswith("@"):
                        raise header.error(number, f"expected a header line (@...) before @data, got {text[:40]!r}")
                    header.add(number, text)
                    if text.lower().startswith("@data"):
                        header.finish(number)
                        in_data = True
                    continue
                if header.dimensions is None:       # no @dimensions: the first case says
                    header.dimensions = text.count(":")
                series, label = _case(header, number, text)
                cases.append(series)
                labels.append(label)
    except UnicodeDecodeError as exc:
        raise header.error(number + 1, f"not a text file ({exc.reason})") from exc
    if not in_data:
        raise header.error(number, "the file ends before its @data line (truncated?)")
    if not cases:
        raise header.error(number, "no cases after @data (truncated?)")
    lengths = np.array([len(s[0]) for s in cases], dtype=np.int64)
    x = np.full((len(cases), header.dimensions, int(lengths.max())), np.nan, dtype=np.float32)
    for i, series in enumerate(cases):
        x[i, :, :lengths[i]] = np.stack(series)
    return TsFile(path=path, problem=header.problem, x=x, labels=np.array(labels, dtype=np.int64),
                  classes=header.classes, lengths=lengths)


# -- a train/test pair -------------------------------------------------------------------------

def read_archive(train_path: str | Path, test_path: str | Path | None = None) -> Archive:
    """Both files of a set, padded with NaN to one length, as raw arrays (no sensor split yet)."""
    train_path = Path(train_path)
    test_path = Path(test_path) if test_path is not None else pair_of(train_path)
    train, test = read_ts(train_path), read_ts(test_path)
    source = f"{train_path} + {test_path.name}"
    if train.dimensions != test.dimensions:
        raise DataError(source, f"train has {train.dimensions} dimensions, test {test.dimensions}")
    if train.classes != test.classes:
        raise DataError(source, f"train and test name different classes: {list(train.classes)} "
                                f"against {list(test.classes)}")
    length = max(train.x.shape[2], test.x.shape[2])
    x = np.full((len(train.x) + len(test.x), train.dimensions, length), np.nan, dtype=np.float32)
    x[:len(train.x), :, :train.x.shape[2]] = train.x
    x[len(train.x):, :, :test.x.shape[2]] = test.x
    return Archive(name=train.problem, x=x, y=np.concatenate([train.labels, test.labels]),
                   split=np.repeat(np.array([0, 1], np.int8), [len(train.x), len(test.x)]),
                   classes=train.classes, lengths=np.concatenate([train.lengths, test.lengths]), source=source)


def split_sensors(x: np.ndarray, sensors: dict[str, list[int]], source: str) -> dict[str, np.ndarray]:
    """``[N, D, T]`` -> one ``[N, len(dims), T]`` array per sensor."""
    dims = x.shape[1]
    seen: dict[int, str] = {}
    out = {}
    for name, picks in sensors.items():
        if not picks:
            raise DataError(source, f"sensor {name!r} is given no dimensions")
        for d in picks:
            if not isinstance(d, (int, np.integer)) or not 0 <= d < dims:
                raise DataError(source, f"sensor {name!r}: dimension {d!r} is not in 0..{dims - 1}")
            if d in seen:
                raise DataError(source, f"dimension {d} is given to both {seen[d]!r} and {name!r}")
            seen[int(d)] = name
        out[name] = np.ascontiguousarray(x[:, list(picks)])
    return out


def default_sensors(name: str, dimensions: int) -> dict[str, list[int]]:
    """The preset of an archive set, else one sensor ``x`` holding every dimension."""
    preset = PRESETS.get(name)
    if preset is not None and max(d for dims in preset.values() for d in dims) < dimensions:
        return preset
    return {"x": list(range(dimensions))}


def load_uea(spec: str | Path, sensors: dict[str, list[int]] | None = None) -> Dataset:
    """``uea:<Name>`` (a set shipped with aeon) or a path to ``<Name>_TRAIN.ts``, as a :class:`Dataset`."""
    text = str(spec)
    if text.startswith(PREFIX):
        train, test = archive_files(text[len(PREFIX):])
    else:
        train, test = Path(text), pair_of(Path(text))
    archive = read_archive(train, test)
    sensors = sensors or default_sensors(archive.name, archive.x.shape[1])
    log.info("%s: %d train + %d test cases, %d dimensions as sensors %s, lengths %d..%d", archive.name,
             int((archive.split == 0).sum()), int((archive.split == 1).sum()), archive.x.shape[1],
             list(sensors), int(archive.lengths.min()), int(archive.lengths.max()))
    return make_dataset(split_sensors(archive.x, sensors, archive.source), archive.y, split=archive.split,
                        classes=list(archive.classes), name=archive.name, source=archive.source)


def is_uea(spec: str) -> bool:
    """Whether ``load_data`` should hand ``spec`` to :func:`load_uea`."""
    return spec.startswith(PREFIX) or spec.lower().endswith(".ts")
