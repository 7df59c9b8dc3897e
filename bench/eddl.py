"""EDDL over fog nodes: what each node costs, what the ensemble keeps, what a lost node takes.

    fogsplit bench eddl [--data images] [--real uea:BasicMotions] [--nodes 3] [--design affine:3]
                        [--json out.json]

For each data set: export a DDNN bundle, take its frozen device features (onnxruntime), train
three edge parts on them with the same recipe (docs/eddl.md): dense, BIBD over fog nodes, and
random blocks of the BIBD's density; then measure per node FLOPs, parameters, peak memory
(a process running only that shard) and onnxruntime latency against the dense edge part;
accuracy of dense, BIBD (its full head), random-sparse, each node head alone and the ensemble;
the ensemble with each single node lost; bytes between the gateway and the nodes per event; and,
on the first data set, the round trip from the gateway's slices to the ensemble with the nodes as
``fogsplit fog`` processes over a real broker, against one node process running the dense part,
then with one node process killed.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from fogsplit.bench.embedded import EmbeddedBroker
from fogsplit.bench.flags import broker_url, positive
from fogsplit.bench.report import timed_main
from fogsplit.core.frames import FOG_ANSWER, FOG_SLICE, encode_fog_frame
from fogsplit.core.manifest import Manifest, check_bundle_contents
from fogsplit.core.mqtt import MqttTransport, wait_until
from fogsplit.core.runner import ShardRunner
from fogsplit.core.signing import load_private_key, new_key_pair, sign_bundle
from fogsplit.core.topics import Topics
from fogsplit.core.transport import Message
from fogsplit.core.wire import ALIAS_PROPERTY_BYTES, publish_packet_size
from fogsplit.gateway.fog import FogGather

log = logging.getLogger(__name__)

BENCH_EVENTS = 4000
DEADLINE_S = 0.2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fogsplit bench eddl", description=__doc__.split("\n")[0])
    p.add_argument("--data", default="images", help="the first data set (default images); its live run too")
    p.add_argument("--real", default="uea:BasicMotions", help="a real data set (default uea:BasicMotions); "
                   "'none' to skip")
    p.add_argument("--nodes", type=positive(int), default=3, help="fog nodes (default 3)")
    p.add_argument("--design", default="affine:3", help="design for --data (default affine:3)")
    p.add_argument("--real-design", default="affine:2",
                   help="design for --real (default affine:2: a two-sensor set has 8 fused channels)")
    p.add_argument("--events", type=positive(int), help=f"events of a built-in set (default {BENCH_EVENTS})")
    p.add_argument("--epochs", type=positive(int), help="DDNN training epochs (default: the export's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--live-events", type=positive(int), default=200, help="events of the live run (default 200)")
    p.add_argument("--broker", type=broker_url, help="use this broker (default: start one)")
    p.add_argument("--workdir", type=Path, help="where bundles go (default: a temporary directory)")
    p.add_argument("--reuse", action="store_true",
                   help="take the DDNN bundle already exported in --workdir instead of training it again")
    p.add_argument("--json", type=Path, help="write the figures here")
    return p


# -- the fog nodes as processes ----------------------------------------------------------------

class FogProcesses:
    """``fogsplit fog`` processes for every node of a bundle; waits until each is online."""

    def __init__(self, url: str, bundle_dir: Path, trusted_key: Path, *, fleet: str, cell: str,
                 nodes: int, log_dir: Path) -> None:
        self.procs: dict[str, subprocess.Popen] = {}
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for k in range(nodes):
            out = open(log_dir / f"fog{k}.log", "w")
            self.procs[f"fog{k}"] = subprocess.Popen(
                [sys.executable, "-m", "fogsplit.cli", "fog", "--bundle", str(bundle_dir), "--node", str(k),
                 "--broker", url, "--fleet", fleet, "--cell", cell, "--trusted-key", str(trusted_key)],
                stdout=out, stderr=subprocess.STDOUT, env=env)

    def kill(self, node: str) -> None:
        """A real crash: SIGKILL, no clean offline (the broker sends the will later)."""
        self.procs[node].send_signal(signal.SIGKILL)
        self.procs[node].wait(10)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


class FogProbe:
    """The gateway's side of the nodes (gateway/fog.py's FogGather) on its own connection:
    send an event's slices, wait for the answers or the deadline, note who answered."""

    def __init__(self, url: str, manifest: Manifest, *, fleet: str, cell: str) -> None:
        self.topics, self.cell = Topics(fleet), cell
        self.gather = FogGather(manifest)
        self.lock = threading.Condition()
        self.online: set[str] = set()
        self.transport = MqttTransport(url, f"probe-{fleet}")
        self.transport.subscribe(self.topics.fog_answer(cell, "+"), self._on_answer)
        self.transport.subscribe(self.topics.fog_status(cell, "+"), self._on_status)
        self.transport.connect()

    def _on_answer(self, msg: Message) -> None:
        with self.lock:
            self.gather.on_answer(msg)
            self.lock.notify_all()

    def _on_status(self, msg: Message) -> None:
        with self.lock:
            self.gather.on_status(msg)
            state = json.loads(msg.payload).get("state")
            node = msg.topic.split("/")[-2]
            (self.online.add if state == "online" else self.online.discard)(node)
            self.lock.notify_all()

    def wait_online(self, nodes: int, timeout: float = 60) -> None:
        if not wait_until(lambda: len(self.online) >= nodes, timeout=timeout):
            raise RuntimeError(f"only {sorted(self.online)} of {nodes} fog nodes came online")

    def round_trip(self, event: int, fused: np.ndarray) -> tuple[float, list[str], np.ndarray | None]:
        start = time.perf_counter()
        with self.lock:
            slices = self.gather.ask(self.cell, event, fused, [])
        for s in slices:
            self.transport.publish(self.topics.fog_slice(s.cell, s.node), s.payload, qos=0)
        with self.lock:
            self.lock.wait_for(lambda: self.gather.ready(event), timeout=DEADLINE_S)
            got = self.gather.finish(event)
        return (time.perf_counter() - start) * 1000.0, got.nodes, got.logits

    def close(self) -> None:
        self.transport.close()


def live(url: str, bundle_dir: Path, key: Path, fused: np.ndarray, y: np.ndarray, *, workdir: Path,
         kill: str | None = None, tag: str = "") -> dict:
    """Round trips with every node a process; then, if ``kill``, with that node killed."""
    m = check_bundle_contents(bundle_dir)
    fleet = f"eddl{tag}{time.monotonic_ns() % 10**6}"
    procs = FogProcesses(url, bundle_dir, key, fleet=fleet, cell="c0", nodes=len(m.fog.nodes), log_dir=workdir)
    probe = FogProbe(url, m, fleet=fleet, cell="c0")
    try:
        probe.wait_online(len(m.fog.nodes))
        for i in range(10):
            probe.round_trip(10**9 + i, fused[i % len(fused)])          # warm-up
        out = {"all": _pass(probe, fused, y, 2 * 10**9)}
        if kill is not None:
            procs.kill(kill)
            out["killed"] = {"node": kill, **_pass(probe, fused, y, 3 * 10**9)}
        return out
    finally:
        probe.close()
        procs.stop()


def _pass(probe: FogProbe, fused: np.ndarray, y: np.ndarray, base: int) -> dict:
    ms, nodes, hits, answered = [], {}, 0, 0
    for i in range(len(fused)):
        t, took, logits = probe.round_trip(base + i, fused[i])
        ms.append(t)
        nodes[tuple(took)] = nodes.get(tuple(took), 0) + 1
        if logits is not None:
            answered += 1
            hits += int(np.argmax(logits) == y[i])
    p = np.percentile(ms, [50, 95])
    return {"events": len(fused), "answered": answered, "accuracy": round(hits / len(fused), 4),
            "p50": round(float(p[0]), 2), "p95": round(float(p[1]), 2),
            "nodes_taking_part": {",".join(k) or "none": v for k, v in nodes.items()}}


# -- one data set ------------------------------------------------------------------------------

def shard_latency_ms(path: Path, x: np.ndarray, runs: int = 200) -> float:
    """Median onnxruntime time of one call on ``x``, one thread (per sample: divide by the batch)."""
    runner = ShardRunner(path, threads=1)
    for _ in range(10):
        runner.run(slice=x)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        runner.run(slice=x)
        times.append((time.perf_counter() - start) * 1000.0)
    return round(float(np.median(times)), 4)


_MEMORY = """
import sys, numpy as np
from fogsplit.core.runner import ShardRunner

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1])

base = status("VmRSS:")
runner = ShardRunner(sys.argv[1], threads=1)
x = np.zeros([1, *map(int, sys.argv[2:])], np.float32)
for _ in range(20):
    runner.run(slice=x)
print(status("VmHWM:") - base, status("VmHWM:"))
"""


def peak_memory_kb(path: Path, shape: tuple[int, ...]) -> dict:
    """Peak resident memory (VmHWM) of a process that loads only this shard and runs it: above
    what the process held once onnxruntime was imported, and in all."""
    out = subprocess.run([sys.executable, "-c", _MEMORY, str(path), *map(str, shape)], capture_output=True,
                         text=True, check=True, timeout=120)
    delta, total = map(int, out.stdout.split())
    return {"shard_kb": delta, "process_kb": total}


def wire_bytes(manifest: Manifest, topics: Topics, cell: str = "c0") -> dict:
    """Bytes on the wire per event between the gateway and the nodes (MQTT 5, topic aliases)."""
    fog = manifest.fog
    fused = manifest.tier_shard("gateway").inputs["fused"][1:]
    out_slice, back = 0, 0
    for node in fog.nodes:
        shard = manifest.shard(node.shard)
        s = encode_fog_frame(FOG_SLICE, model="m", event=1 << 40, codec=fog.slice_codec,
                             tensor=np.zeros([len(node.channels), *fused[1:]], np.float32))
        a = encode_fog_frame(FOG_ANSWER, model="m", event=1 << 40, codec=fog.answer_codec,
                             logits=np.zeros(manifest.num_classes), tensor=np.zeros(shard.outputs["feature"][1:]))
        out_slice += publish_packet_size("", len(s), 0, mqtt5=True, properties_len=ALIAS_PROPERTY_BYTES)
        back += publish_packet_size("", len(a), 0, mqtt5=True, properties_len=ALIAS_PROPERTY_BYTES)
    return {"gateway_to_nodes": out_slice, "nodes_to_gateway": back, "total": out_slice + back}


def cloud_accuracy(out: Path, manifest: Manifest, models: dict, test) -> dict:
    """The bundle's cloud shard on what each edge part forwards, against the gateway's own feature."""
    import torch
    cloud = ShardRunner(out / manifest.tier_shard("cloud").file, threads=1)

    def acc(feature: np.ndarray) -> float:
        return round(float((cloud.run(edge_feature=feature)["logits"].argmax(1) == test.y).mean()), 4)

    with torch.no_grad():
        fed = {kind: acc(model(torch.from_numpy(test.fused)).feature.numpy()) for kind, model in models.items()}
    return {"gateway_feature": acc(test.target), **fed}


def run_dataset(name: str, design_name: str, args, workdir: Path, key: tuple[Path, Path], *,
                url: str | None) -> dict:
    import torch
    from fogsplit.core.settings import ExportOptions
    from fogsplit.export.datasets import BUILTIN, load_data
    from fogsplit.export.bibd import design as make_design
    from fogsplit.export.eddl import BlockEdge, DenseEdge, bundle_features, evaluate, layout_for, random_layout, \
        train_edge, write_fog
    from fogsplit.export.pipeline import export_bundle

    torch.set_num_threads(min(2, torch.get_num_threads()))
    data = load_data(name, seed=args.seed, events=args.events or (BENCH_EVENTS if name in BUILTIN else None))
    out = workdir / name.replace(":", "_")
    options = ExportOptions(seed=args.seed, progress=False, **({"epochs": args.epochs} if args.epochs else {}))
    started = time.perf_counter()
    reuse = args.reuse and (out / "manifest.json").is_file()
    manifest = check_bundle_contents(out) if reuse else export_bundle(data, out, options).manifest
    frozen = bundle_features(out, manifest, data, options)
    chosen = make_design(design_name)
    layout = layout_for(manifest, chosen, args.nodes)
    models = {}
    for kind, model in (("bibd", BlockEdge(layout)), ("random_sparse", BlockEdge(random_layout(layout, args.seed))),
                        ("dense", DenseEdge(layout, frozen["fit"].fused.shape[1]))):
        torch.manual_seed(args.seed)
        models[kind] = train_edge(model, frozen["fit"], seed=args.seed)
    reports = {kind: evaluate(model, frozen["test"]) for kind, model in models.items()}
    manifest = write_fog(out, manifest, models["bibd"], frozen, chosen.name, metrics={"fog_test_accuracy": reports["bibd"]})
    sign_bundle(out, load_private_key(key[0]))
    dense_dir = workdir / (out.name + "-dense")
    shutil.copytree(out, dense_dir, dirs_exist_ok=True)
    dense_manifest = write_fog(dense_dir, check_bundle_contents(dense_dir), models["dense"], frozen, "dense")
    sign_bundle(dense_dir, load_private_key(key[0]))

    fog = manifest.fog
    x = frozen["test"].fused
    dense_shard = dense_dir / dense_manifest.shard(dense_manifest.fog.nodes[0].shard).file
    dense_latency = shard_latency_ms(dense_shard, x[:1])
    dense_batch = round(shard_latency_ms(dense_shard, x[:64], runs=50) / 64, 4)
    nodes = []
    for n, node in enumerate(fog.nodes):
        spec = manifest.shard(node.shard)
        nodes.append({"node": node.name, "blocks": [list(b) for b in node.blocks],
                      "input_channels": len(node.channels), "flops": spec.flops, "params": spec.params,
                      "flops_fraction": round(spec.flops / fog.dense_flops, 4),
                      "params_fraction": round(spec.params / fog.dense_params, 4),
                      "latency_ms": shard_latency_ms(out / spec.file, x[:1, list(node.channels)]),
                      "latency_ms_per_sample_batch64": round(shard_latency_ms(
                          out / spec.file, x[:64, list(node.channels)], runs=50) / 64, 4),
                      "peak_memory": peak_memory_kb(out / spec.file, (len(node.channels), *x.shape[2:]))})
    result = {
        "data": name, "design": chosen.name, "v": chosen.v, "b": chosen.b, "k": chosen.k, "density": round(chosen.density, 4),
        "test_events": len(frozen["test"].y), "fused_channels": int(x.shape[1]),
        "dense": {"flops": fog.dense_flops, "params": fog.dense_params, "latency_ms": dense_latency,
                  "latency_ms_per_sample_batch64": dense_batch,
                  "peak_memory": peak_memory_kb(dense_shard, x.shape[1:])},
        "ddnn_gateway_shard": {"flops": manifest.tier_shard("gateway").flops,
                               "params": manifest.tier_shard("gateway").params,
                               "edge_accuracy": manifest.metrics.get("test_exit_accuracy", {}).get("edge")},
        "nodes": nodes,
        "accuracy": {"dense": reports["dense"]["full"], "bibd": reports["bibd"]["full"],
                     "random_sparse": reports["random_sparse"]["full"], "ensemble": reports["bibd"]["ensemble"],
                     "random_sparse_ensemble": reports["random_sparse"]["ensemble"],
                     "edge_answer": reports["bibd"].get("edge_answer"), "local": reports["bibd"].get("local"),
                     "node_heads": reports["bibd"]["node_heads"]},
        "node_lost_accuracy": reports["bibd"]["node_lost"],                  # the gateway's edge answer
        "node_lost_ensemble_accuracy": reports["bibd"]["node_lost_ensemble"],  # the node heads alone
        "cloud_accuracy": cloud_accuracy(out, manifest, models, frozen["test"]),
        "bytes_per_event": {**wire_bytes(manifest, Topics("demo")),
                            "dense_one_node": wire_bytes(dense_manifest, Topics("demo"))["total"]},
        "seconds": round(time.perf_counter() - started, 1),
    }
    if url is not None:
        n = min(args.live_events, len(x))
        fused, y = x[:n], frozen["test"].y[:n]
        bibd = live(url, out, key[1], fused, y, workdir=workdir, kill="fog0", tag="b")
        dense = live(url, dense_dir, key[1], fused, y, workdir=workdir, tag="d")
        result["latency_ms"] = {"dense_one_node": dense["all"]["p50"], "bibd_nodes": bibd["all"]["p50"],
                                "dense_one_node_p95": dense["all"]["p95"], "bibd_nodes_p95": bibd["all"]["p95"]}
        result["live"] = {"bibd": bibd, "dense_one_node": dense, "deadline_ms": DEADLINE_S * 1000}
    return result


def run(args) -> dict:
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fogsplit-eddl-"))
    workdir.mkdir(parents=True, exist_ok=True)
    key = (workdir / "bench.key", workdir / "bench.pub")
    if not key[0].is_file():
        key = new_key_pair(workdir, "bench")
    sets = [(args.data, args.design)] + ([(args.real, args.real_design)] if args.real != "none" else [])
    results = []
    if args.broker:
        results.append(run_dataset(*sets[0], args, workdir, key, url=args.broker))
    else:
        with EmbeddedBroker() as url:
            results.append(run_dataset(*sets[0], args, workdir, key, url=url))
    for name, design_name in sets[1:]:
        results.append(run_dataset(name, design_name, args, workdir, key, url=None))
    first = results[0]
    return {**{k: first[k] for k in ("nodes", "accuracy", "node_lost_accuracy", "bytes_per_event", "latency_ms")},
            "datasets": results}


def format_table(result: dict) -> str:
    lines = []
    for r in result["datasets"]:
        a = r["accuracy"]
        lines.append(f"{r['data']} ({r['design']}, density {r['density']}, {r['test_events']} test events): "
                     f"dense {a['dense']}, bibd {a['bibd']}, random-sparse {a['random_sparse']}, "
                     f"ensemble {a['ensemble']}, edge answer (with the local exit) {a.get('edge_answer')}, "
                     f"node heads {a['node_heads']}, one node lost {r['node_lost_accuracy']} "
                     f"(ensemble alone {r['node_lost_ensemble_accuracy']})")
        for n in r["nodes"]:
            lines.append(f"  {n['node']}: FLOPs {n['flops_fraction']:.3f}, params {n['params_fraction']:.3f} of dense, "
                         f"{n['latency_ms']} ms (dense {r['dense']['latency_ms']} ms), per sample at batch 64 "
                         f"{n['latency_ms_per_sample_batch64']} ms (dense {r['dense']['latency_ms_per_sample_batch64']} ms), "
                         f"{n['input_channels']}/{r['fused_channels']} input channels")
        lines.append(f"  bytes/event gateway<->nodes {r['bytes_per_event']}")
        if "latency_ms" in r:
            lines.append(f"  round trip p50: dense one node {r['latency_ms']['dense_one_node']} ms, "
                         f"bibd nodes {r['latency_ms']['bibd_nodes']} ms; killed fog0: {r['live']['bibd']['killed']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return timed_main(build_parser().parse_args(argv), run, format_table)


if __name__ == "__main__":
    raise SystemExit(main())
