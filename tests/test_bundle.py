"""Bundles: what export writes is verified; anything altered is refused with a reason."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from fogsplit.core.errors import BundleError
from fogsplit.export.pipeline import ExportOptions
from fogsplit.core.manifest import MANIFEST, load_bundle
from fogsplit.core.runner import ShardRunner
from fogsplit.core.signing import sign_bundle

pytestmark = pytest.mark.slow


@pytest.fixture
def copy(bundle_dir, tmp_path):
    return shutil.copytree(bundle_dir, tmp_path / "b")


def edit_manifest(path, change):
    data = json.loads((path / MANIFEST).read_text())
    change(data)
    (path / MANIFEST).write_text(json.dumps(data))


def test_exported_bundle_is_complete(bundle_dir, trusted_keys, small_data):
    bundle = load_bundle(bundle_dir, trusted_keys=trusted_keys)
    m = bundle.manifest
    assert m.sensor_names == small_data.sensor_names and m.classes == small_data.classes
    assert {s.tier for s in m.shards} == {"device", "gateway", "cloud"}
    assert all(s.params > 0 and s.flops > 0 for s in m.shards)
    assert 0 <= m.thresholds["local"] <= 1 and m.codecs["feature"].name == ExportOptions().feature_codec
    runner = ShardRunner(bundle.shard_path(m.device_shard("cam0")))
    out = runner.run(x=small_data.sensors["cam0"][:4].astype(np.float32))
    assert out["scores"].shape == (4, m.num_classes) and out["feature"].shape[1:] == m.feature_shape


def test_tampered_shard_is_refused(copy, trusted_keys):
    with open(copy / "gateway.onnx", "ab") as f:
        f.write(b"\x00")
    with pytest.raises(BundleError, match="sha256"):
        load_bundle(copy, trusted_keys=trusted_keys)
    load_bundle(copy, shards=["cloud"], trusted_keys=trusted_keys)  # a tier that does not run the gateway shard is not affected


def test_missing_shard_is_refused(copy, trusted_keys):
    (copy / "cloud.onnx").unlink()
    with pytest.raises(BundleError, match="missing"):
        load_bundle(copy, shards=["cloud"], trusted_keys=trusted_keys)


@pytest.mark.parametrize("change,needle", [
    (lambda d: d.update(extra=1), "unknown keys ['extra']"),
    (lambda d: d.pop("classes"), "missing keys ['classes']"),
    (lambda d: d.update(schema=99), "schema 99"),
    (lambda d: d["shards"][0].update(file="../etc/passwd"), "plain file name"),
    (lambda d: d["thresholds"].update(local=1.5), "exit threshold 'local'"),
    (lambda d: d["codecs"]["feature"].update(name="lz77"), "unknown codec"),
    (lambda d: d.update(edge_fusion="sum"), "fusion"),
    (lambda d: d["sensors"][0].update(shape=[1, 2, 3]), "model id"),
    (lambda d: d["shards"].pop(), "no cloud shard"),
])
def test_malformed_manifest_is_refused(copy, change, needle, signing_key, trusted_keys):
    edit_manifest(copy, change)
    sign_bundle(copy, signing_key[0])   # signed, and still refused for what it says
    with pytest.raises(BundleError) as err:
        load_bundle(copy, trusted_keys=trusted_keys)
    assert needle in str(err.value)


def test_not_json_and_not_a_bundle(copy, tmp_path, signing_key, trusted_keys):
    (copy / MANIFEST).write_text("{broken")
    sign_bundle(copy, signing_key[0])
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(copy, trusted_keys=trusted_keys)
    with pytest.raises(BundleError, match="no manifest.json"):
        load_bundle(tmp_path / "nothing", trusted_keys=trusted_keys)
