"""The UEA/UCR .ts reader (export/uea.py): the archive files in the aeon wheel, and bad files."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fogsplit.core.errors import DataError
from fogsplit.export import uea
from fogsplit.export.datasets import load_data

needs_aeon = pytest.mark.skipif(uea.aeon_data_dir() is None, reason="aeon is not installed (the bench extra)")

HEADER = """# a comment
@problemName Tiny
@timeStamps false
@missing true
@univariate false
@dimensions 2
@equalLength false
@classLabel true up down
@data
"""
ROWS = "1,2,3,4:5,6,7,8:up\n1,?,3:4,5,6:down\n9,8:7,6:up\n"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def tiny(tmp_path) -> Path:
    """A Tiny_TRAIN.ts / Tiny_TEST.ts pair: 2 dimensions, variable length, one missing value."""
    write(tmp_path / "Tiny_TEST.ts", HEADER + "1,1,1,1,1:2,2,2,2,2:down\n3,3:4,4:up\n")
    return write(tmp_path / "Tiny_TRAIN.ts", HEADER + ROWS)


# -- the archive sets ---------------------------------------------------------------------------

@needs_aeon
def test_basic_motions_as_shipped():
    data = load_data("uea:BasicMotions")
    assert data.name == "BasicMotions"
    assert data.classes == ("Standing", "Running", "Walking", "Badminton")
    assert (data.split == 0).sum() == 40 and (data.split == 1).sum() == 40
    assert {k: v.shape for k, v in data.sensors.items()} == {"accel": (80, 3, 100), "gyro": (80, 3, 100)}
    assert all(np.isfinite(v).all() for v in data.sensors.values())
    assert set(np.unique(data.y)) == {0, 1, 2, 3}
    assert np.bincount(data.y[data.split == 0]).tolist() == [10, 10, 10, 10]


@needs_aeon
def test_japanese_vowels_is_nan_padded_after_each_end():
    archive = uea.read_archive(*uea.archive_files("JapaneseVowels"))
    assert archive.x.shape == (640, 12, 29)
    assert (archive.split == 0).sum() == 270 and (archive.split == 1).sum() == 370
    assert archive.classes == tuple(str(i) for i in range(1, 10))
    assert archive.lengths.min() == 7 and archive.lengths.max() == 29
    for row, length in zip(archive.x, archive.lengths):
        assert np.isfinite(row[:, :length]).all() and np.isnan(row[:, length:]).all()
    data = load_data("uea:JapaneseVowels")
    assert {k: v.shape for k, v in data.sensors.items()} == {f"lpc{i}": (640, 4, 29) for i in range(3)}
    assert np.array_equal(data.sensors["lpc1"], archive.x[:, 4:8], equal_nan=True)


@needs_aeon
def test_a_train_file_path_reads_its_test_file_beside_it():
    train, _ = uea.archive_files("BasicMotions")
    data = load_data(str(train))
    assert len(data) == 80 and data.sensor_names == ["accel", "gyro"]


@needs_aeon
def test_an_unknown_set_lists_the_ones_there():
    with pytest.raises(DataError, match="BasicMotions") as err:
        load_data("uea:NoSuchSet")
    assert err.value.source == "uea:NoSuchSet"


@needs_aeon
def test_finding_the_files_does_not_import_aeon():
    code = ("import sys; from fogsplit.export.uea import load_uea; load_uea('uea:BasicMotions'); "
            "assert 'aeon' not in sys.modules, 'aeon was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_without_aeon_the_error_says_how_to_get_it(monkeypatch):
    monkeypatch.setattr(uea, "aeon_data_dir", lambda: None)
    with pytest.raises(DataError, match=r"aeon is not installed: pip install 'fogsplit\[bench\]'"):
        load_data("uea:BasicMotions")


def test_the_locator_reports_a_missing_aeon(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "aeon" else real(name, *a))
    assert uea.aeon_data_dir() is None


# -- the format ---------------------------------------------------------------------------------

def test_a_small_pair_pads_to_the_longest_of_train_and_test(tiny):
    archive = uea.read_archive(tiny)
    assert archive.name == "Tiny" and archive.classes == ("up", "down")
    assert archive.x.shape == (5, 2, 5)                       # the test file's 5 steps are the longest
    assert archive.y.tolist() == [0, 1, 0, 1, 0] and archive.split.tolist() == [0, 0, 0, 1, 1]
    assert archive.lengths.tolist() == [4, 3, 2, 5, 2]
    assert np.isnan(archive.x[1, 0, 1])                       # '?' inside a series stays missing
    assert archive.x[1, 0, 2] == 3 and np.isnan(archive.x[1, :, 3:]).all()
    assert archive.x.dtype == np.float32


def test_sensors_take_the_dimensions_they_are_given(tiny):
    data = uea.load_uea(tiny, sensors={"a": [1], "b": [0]})
    assert data.sensor_names == ["a", "b"]
    assert np.array_equal(data.sensors["a"][:, 0], uea.read_archive(tiny).x[:, 1], equal_nan=True)
    assert uea.load_uea(tiny).sensor_names == ["x"]          # no preset: one sensor, every dimension


@pytest.mark.parametrize("sensors, problem", [
    ({"a": [0, 2]}, "dimension 2 is not in 0..1"),
    ({"a": [0], "b": [0]}, "dimension 0 is given to both 'a' and 'b'"),
    ({"a": []}, "given no dimensions"),
])
def test_a_bad_sensor_mapping_is_refused(tiny, sensors, problem):
    with pytest.raises(DataError, match=problem):
        uea.load_uea(tiny, sensors=sensors)


def test_univariate_without_dimensions(tmp_path):
    path = write(tmp_path / "U_TRAIN.ts", "@problemName U\n@univariate true\n@equalLength true\n@seriesLength 3\n"
                                          "@classLabel true a b\n@data\n1,2,3:a\n4,5,6:b\n")
    ts = uea.read_ts(path)
    assert ts.x.shape == (2, 1, 3) and ts.labels.tolist() == [0, 1]


@pytest.mark.parametrize("text, line, problem", [
    (HEADER[:HEADER.index("@univariate")], 4, "ends before its @data line"),       # truncated in the header
    (HEADER, 9, "no cases after @data"),                                            # truncated after @data
    (HEADER + "1,2,3:4,5", 10, "1 dimensions, the header says 2"),                  # truncated in a row
    (HEADER.replace("@missing true", "@missing maybe"), 4, "@missing must be true or false"),
    (HEADER.replace("@dimensions 2", "@dimensions two"), 6, "@dimensions must be a positive integer"),
    (HEADER.replace("@problemName", "@problem"), 2, "unknown header @problem"),
    (HEADER.replace("@classLabel true up down", "@classLabel false"), 8, "no class labels"),
    (HEADER.replace("@timeStamps false", "@timeStamps true"), 3, "time stamps are not supported"),
    ("1,2:3,4:up\n" + HEADER, 1, "expected a header line"),
    (HEADER + ROWS + "1,2:3,4:5,6:up\n", 13, "3 dimensions, the header says 2"),
    (HEADER + "1,2,x3:4,5,6:up\n", 10, "dimension 0, value 2: 'x3' is not a number"),
    (HEADER + "1,2:4,5,6:up\n", 10, "different lengths [2, 3]"),
    (HEADER + ROWS + "1,2:4,5:sideways\n", 13, "unknown label 'sideways'"),
    (HEADER + "1,2:,:up\n", 10, "is not a number"),
    (HEADER + "1,2:4,inf:up\n", 10, "dimension 1, value 1: infinite"),
    (HEADER.replace("@missing true", "@missing false") + "1,?:4,5:up\n", 10, "@missing false"),
    (HEADER.replace("@equalLength false", "@equalLength true\n@seriesLength 3") + "1,2:4,5:up\n", 11,
     "series of length 2, the header says @seriesLength 3"),
])
def test_a_malformed_file_names_the_file_the_line_and_the_problem(tmp_path, text, line, problem):
    path = write(tmp_path / "Bad_TRAIN.ts", text)
    with pytest.raises(DataError) as err:
        uea.read_ts(path)
    assert err.value.source == f"{path}:{line}"
    assert problem in err.value.problem


def test_a_train_file_needs_its_test_file(tmp_path):
    path = write(tmp_path / "Alone_TRAIN.ts", HEADER + ROWS)
    with pytest.raises(DataError, match="no Alone_TEST.ts beside it"):
        load_data(str(path))
    with pytest.raises(DataError, match="<Name>_TRAIN.ts"):
        load_data(str(write(tmp_path / "odd.ts", HEADER + ROWS)))


def test_train_and_test_must_agree(tiny):
    tiny.with_name("Tiny_TEST.ts").write_text(HEADER.replace("up down", "up down left") + "1:2:left\n")
    with pytest.raises(DataError, match="different classes"):
        uea.read_archive(tiny)


def test_a_binary_file_is_refused(tmp_path):
    path = tmp_path / "Bin_TRAIN.ts"
    path.write_bytes(b"@problemName Bin\n\xff\xfe\x00\x01")
    with pytest.raises(DataError, match="not a text file"):
        uea.read_ts(path)
