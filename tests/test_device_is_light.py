"""The device agent runs on a Pi with onnxruntime, numpy, paho-mqtt and msgpack: nothing heavier."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fogsplit.core.dataset import save_npz
from fogsplit.core.mqtt import MqttTransport, wait_until
from fogsplit.core.topics import Topics

HEAVY = ("torch", "onnx", "tqdm", "matplotlib", "iotcore", "hnswlib", "faiss", "usearch")

# Runs the real `fogsplit device` command in a fresh interpreter in which importing any heavy
# package fails, then prints what was loaded.
PROGRAM = f"""
import importlib.abc, sys
HEAVY = {HEAVY!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in HEAVY:
            raise ImportError(f'the device path must not import {{name}}')
sys.meta_path.insert(0, Block())
from fogsplit.cli import main
code = main(sys.argv[1:])
print('LOADED', ' '.join(sorted(m for m in sys.modules if m.split('.')[0] in ('onnxruntime', 'numpy', 'paho', 'msgpack'))))
sys.exit(code)
"""


@pytest.mark.slow
def test_device_command_runs_without_torch_or_onnx(embedded, bundle_dir, trusted_keys, small_data, tmp_path):
    data = save_npz(small_data, tmp_path / "replay.npz")
    topics = Topics("light")
    seen = []
    watcher = MqttTransport(embedded, "light-watch")
    watcher.subscribe(topics.scores("cell0", "cam1"), lambda m: seen.append(m.payload))
    watcher.subscribe(topics.device_status("cell0", "cam1"), lambda m: seen.append(json.loads(m.payload)["state"]))
    watcher.connect()
    proc = subprocess.run([sys.executable, "-c", PROGRAM, "device", "--bundle", str(bundle_dir), "--device", "cam1",
                           "--trusted-key", str(trusted_keys[0]),
                           "--broker", embedded, "--fleet", "light", "--data", str(data), "--rate", "20",
                           "--count", "5", "--cache"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "LOADED" in proc.stdout and "onnxruntime" in proc.stdout
    assert wait_until(lambda: seen.count("offline") == 1, timeout=5)
    assert "online" in seen and sum(isinstance(s, bytes) for s in seen) == 5
    watcher.close()


def test_device_modules_import_nothing_heavy():
    code = ("import sys; import fogsplit.device.agent, fogsplit.device.caching, fogsplit.device.sources, fogsplit.cli, "
            "fogsplit.core.manifest, fogsplit.core.cache; "
            f"print([m for m in sys.modules if m.split('.')[0] in {HEAVY!r}])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
