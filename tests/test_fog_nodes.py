"""The fog nodes as real processes (``fogsplit fog``) over a real broker, with the gateway and the
devices of the test harness: every event is answered by the ensemble; one node killed with
SIGKILL and the answers go on, degraded, naming the nodes that took part."""
from __future__ import annotations

import shutil
import time

import numpy as np
import pytest

from fogsplit.bench.eddl import FogProbe, FogProcesses
from fogsplit.bench.harness import stream_test_set, summarize
from fogsplit.core.manifest import load_bundle
from fogsplit.core.settings import ExportOptions, GatewaySettings
from fogsplit.core.signing import sign_bundle

pytestmark = pytest.mark.slow
NODES = ("fog0", "fog1", "fog2")


@pytest.fixture(scope="module")
def fog_bundle(tmp_path_factory, bundle_dir, small_data, signing_key):
    from fogsplit.export.eddl import add_fog
    out = tmp_path_factory.mktemp("fog-bundle")
    shutil.copytree(bundle_dir, out, dirs_exist_ok=True)
    add_fog(small_data, out, ExportOptions(seed=0, progress=False, fog_nodes=3, fog_design="affine:3"), epochs=8)
    sign_bundle(out, signing_key[0])
    return out


@pytest.mark.timeout(900)   # the session's bundle and the nodes' training may be built here
def test_nodes_as_processes_answer_and_a_killed_node_degrades_without_losing_an_event(
        mosquitto, fog_bundle, trusted_keys, small_data, tmp_path):
    bundle = load_bundle(fog_bundle, trusted_keys=trusted_keys)
    fleet = f"fog{time.monotonic_ns() % 10**6}"
    procs = FogProcesses(mosquitto, fog_bundle, trusted_keys[0], fleet=fleet, cell="cell0", nodes=3, log_dir=tmp_path)
    try:
        probe = FogProbe(mosquitto, bundle.manifest, fleet=fleet, cell="cell0")
        probe.wait_online(3)
        probe.close()
        # every event past the local exit (threshold 0), and answered at the edge (threshold 1)
        settings = GatewaySettings(local_threshold=0.0, edge_threshold=1.0, fog_deadline_ms=300)
        test = small_data.test().subset(np.arange(30))
        outcome = stream_test_set(mosquitto, bundle, test, rate=20, fleet=fleet, gateway_settings=settings)
        report = summarize(outcome)
        assert report["lost"] == 0 and report["duplicates"] == 0, report
        first = [rs[0][0] for rs in outcome.results.values()]
        assert {r.exit for r in first} == {"edge"} and all(r.nodes == list(NODES) for r in first), \
            [(r.exit, r.nodes) for r in first]
        assert report["accuracy"]["overall"] > 1 / 6

        procs.kill("fog1")
        outcome = stream_test_set(mosquitto, bundle, test, rate=20, fleet=fleet, gateway_settings=settings)
        report = summarize(outcome)
        assert report["lost"] == 0 and report["duplicates"] == 0, report
        first = [rs[0][0] for rs in outcome.results.values()]
        assert all(r.exit == "edge" and r.nodes == ["fog0", "fog2"] and r.degraded for r in first), \
            [(r.exit, r.nodes, r.degraded) for r in first]
        assert outcome.gateway["fog"]["missed"]["fog1"] == 30
    finally:
        procs.stop()
        for log in sorted(tmp_path.glob("fog*.log")):
            print(log.name, log.read_text()[-2000:])
