"""``fogsplit bench cache``: the semantic cache on a redundant stream, off and on, same broker.

One run streams the same redundant image stream (export/streams.py) through a real broker
twice, with the caches off and on, and reports hit rate, accuracy, latency of hits and misses
(capture at the device to the result at a subscriber), gateway and cloud shard runs avoided,
bytes saved; then sweeps redundancy and cache size, and times lookups against cache size for
exact and ANN search.

Each pair of runs is one scenario: where a miss goes and how far away that is.

- ``wan-cloud``: the cloud sits behind a WAN (``--wan-ms`` one way on every message in and out
  of the cloud worker) and the edge exit is off, so every miss is answered by the cloud: the
  cache stands in front of remote inference, the setting of CCIED and FoggyCache.
- ``wan-edge``: the same WAN, with the bundle's edge exit on, so confident misses stop at the
  gateway shard and only the rest cross the WAN.
- ``lan-edge``: no WAN delay and the edge exit on: a miss costs a feature round trip and two
  shard runs on this machine, the least a cache can save.

The top-level figures are the first scenario's; every scenario's are in ``runs``.

A hit is an event answered with exit ``cache``; a miss an event that looked the cache up and
did not hit, which is every event the local exit did not answer (it went on to the edge or
the cloud). Events answered by the local exit never consult the cache and are reported apart.
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from fogsplit.core.cache import CacheSettings, SemanticCache
from fogsplit.bench.harness import percentiles, stream_test_set, summarize
from fogsplit.gateway.gateway import GatewaySettings
from fogsplit.bench.embedded import EmbeddedBroker
from fogsplit.core.manifest import load_bundle
from fogsplit.core.signing import load_public_key, sign_ephemeral
from fogsplit.export.datasets import multiview_images
from fogsplit.export.streams import redundant_images

log = logging.getLogger(__name__)
MISS_EXITS = ("edge", "cloud")
SCENARIOS = {"wan-cloud": {"wan": True, "edge_exit": False},
             "wan-edge": {"wan": True, "edge_exit": True},
             "lan-edge": {"wan": False, "edge_exit": True}}


class DelayedLink:
    """A transport whose every message in and out arrives ``delay_s`` late: an emulated WAN.
    Everything but publishing and subscribing (presence, stats, connect) is the inner transport's."""

    def __init__(self, inner, delay_s: float) -> None:
        self.inner, self.delay_s = inner, delay_s
        self.meter = inner.meter

    def _later(self, fn, *args) -> None:
        timer = threading.Timer(self.delay_s, fn, args)
        timer.daemon = True
        timer.start()

    def publish(self, topic: str, payload: bytes, **kwargs) -> int:
        self._later(lambda: self.inner.publish(topic, payload, **kwargs))
        return len(payload)

    def subscribe(self, topic_filter: str, handler) -> None:
        self.inner.subscribe(topic_filter, lambda msg: self._later(handler, msg))

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


# -- one pair of runs -------------------------------------------------------------------------

def cache_figures(outcome, frames: int) -> dict:
    """Hit rate and hit/miss latency of one cache-on run."""
    first = {e: rs[0] for e, rs in outcome.results.items() if e in outcome.events}
    latency = {e: (recv - r.captured) * 1000 for e, (r, recv) in first.items()}
    hits = [e for e, (r, _) in first.items() if r.exit == "cache"]
    misses = [e for e, (r, _) in first.items() if r.exit in MISS_EXITS or r.degraded]
    return {
        "hit_rate": round(len(hits) / max(1, len(hits) + len(misses)), 4),
        "answered_from_cache": round(len(hits) / frames, 4),
        "lookups": len(hits) + len(misses),
        "hit_accuracy": round(float(np.mean([first[e][0].label == outcome.events[e] for e in hits])), 4)
        if hits else None,
        "latency_ms": {"hit": percentiles([latency[e] for e in hits]),
                       "miss": percentiles([latency[e] for e in misses])},
    }


def compute_figures(off: dict, on: dict, manifest, frames: int) -> dict:
    """Shard runs off and on, per tier, and the FLOPs the cache saved."""
    runs = {}
    for name, stats in (("off", off), ("on", on)):
        runs[name] = {"device": frames * len(manifest.sensors), "gateway": stats["shard_runs"],
                      "cloud": stats["exits"]["cloud"]}
    flops = {"device": manifest.device_shard(manifest.sensor_names[0]).flops,
             "gateway": manifest.tier_shard("gateway").flops, "cloud": manifest.tier_shard("cloud").flops}
    saved = {tier: runs["off"][tier] - runs["on"][tier] for tier in flops}
    return {"shard_runs": runs, "runs_saved": saved,
            "mflops_saved_per_event": round(sum(saved[t] * flops[t] for t in flops) / frames / 1e6, 3),
            "gateway_runs_saved_fraction": round(saved["gateway"] / max(1, runs["off"]["gateway"]), 4),
            "cloud_runs_saved_fraction": round(saved["cloud"] / max(1, runs["off"]["cloud"]), 4)}


def run_pair(url: str, bundle, stream, *, rate: float, cache: CacheSettings, wan_ms: float, fleet: str,
             local_threshold: float | None = None, edge_exit: bool = True) -> dict:
    """The same stream with the caches off, then on; everything else the same. Without
    ``edge_exit`` the gateway never answers at the edge exit (threshold 0), so every event the
    local exit and the cache do not answer goes to the cloud."""
    link = (lambda t: DelayedLink(t, wan_ms / 1000.0)) if wan_ms > 0 else None
    test = stream.data
    frames = len(test)
    outcomes = {}
    for name, settings in (("off", None), ("on", cache)):
        log.info("streaming %d frames, cache %s, wan %.0f ms", frames, name, wan_ms)
        outcomes[name] = stream_test_set(url, bundle, test, rate=rate, fleet=f"{fleet}-{name}",
                                         gateway_settings=GatewaySettings(
                                             cache=settings, local_threshold=local_threshold,
                                             edge_threshold=None if edge_exit else 0.0),
                                         device_cache=settings,
                                         cloud_link=link)
    off, on = summarize(outcomes["off"]), summarize(outcomes["on"])
    return {
        "wan_ms": wan_ms, "edge_exit": edge_exit, "frames": frames, "scenes": stream.scenes,
        "repeated_fraction": round(stream.repeated_fraction, 4),
        "accuracy_off": off["accuracy"]["overall"], "accuracy_on": on["accuracy"]["overall"],
        **cache_figures(outcomes["on"], frames),
        "latency_ms_off": off["latency_ms"], "latency_ms_on_by_exit": on["latency_ms"],
        "exit_fraction_off": off["exit_fraction"], "exit_fraction_on": on["exit_fraction"],
        "lost": {"off": off["lost"], "on": on["lost"]}, "duplicates": {"off": off["duplicates"], "on": on["duplicates"]},
        "bytes_per_event": {"off": off["bytes_per_event"], "on": on["bytes_per_event"]},
        "bytes_saved_fraction": round(1 - on["bytes_per_event"] / off["bytes_per_event"], 4)
        if off["bytes_per_event"] else None,
        "compute": compute_figures(outcomes["off"].gateway, outcomes["on"].gateway, bundle.manifest, frames),
        "gateway_cache": outcomes["on"].gateway.get("cache"),
    }


# -- lookups and the ANN libraries ------------------------------------------------------------

def clustered_keys(n: int, dim: int, seed: int) -> np.ndarray:
    """Unit keys in tight clusters of about 10 (scenes seen about 10 times), feature-sized."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // 10), dim)).astype(np.float32)
    keys = centres[rng.integers(0, len(centres), n)] + 0.3 * rng.standard_normal((n, dim)).astype(np.float32)
    return keys / np.linalg.norm(keys, axis=1, keepdims=True)


def lookup_times(dim: int, sizes: list[int], queries: int = 200, seed: int = 0) -> dict:
    """Microseconds per lookup (median over ``queries``) of a full cache of each size, exact and ANN."""
    out: dict[str, dict[str, float]] = {"exact": {}, "ann": {}}
    for size in sizes:
        keys = clustered_keys(size + queries, dim, seed)
        for search in ("exact", "ann"):
            settings = CacheSettings(max_entries=size, max_bytes=1 << 36, ttl_s=1e6, k=4, threshold=0.5,
                                     min_agreement=1.0, ann_above=64 if search == "ann" else max(size, 64))
            cache = SemanticCache(dim, 8, settings)
            for i, key in enumerate(keys[:size]):
                cache.put(key, i % 8, now=0.0)
            times = []
            for q in keys[size:]:
                t = time.perf_counter()
                cache.lookup(q, now=1.0)
                times.append((time.perf_counter() - t) * 1e6)
            out[search][str(size)] = round(float(np.median(times)), 1)
        log.info("lookup at %d entries: exact %.0f us, ann %.0f us", size, out["exact"][str(size)],
                 out["ann"][str(size)])
    return out


def compare_ann_libraries(dim: int, sizes: list[int], k: int = 4, queries: int = 200, seed: int = 0) -> dict:
    """hnswlib vs faiss (HNSW) vs usearch on this project's key size: build seconds, query
    microseconds (median), recall@k against exact search, and whether entries can be removed
    (an LRU/TTL cache evicts all the time). A library that is not installed is reported so."""
    out: dict[str, dict] = {}
    for size in sizes:
        keys = clustered_keys(size + queries, dim, seed)
        base, probe = keys[:size], keys[size:]
        truth = np.argsort(-(probe @ base.T), axis=1)[:, :k]
        for name, build in (("hnswlib", _hnswlib), ("faiss", _faiss), ("usearch", _usearch)):
            try:
                started = time.perf_counter()
                search, removable = build(base, dim)
                built = time.perf_counter() - started
            except ImportError:
                out.setdefault(name, {})["installed"] = False
                continue
            times, found = [], []
            for q in probe:
                t = time.perf_counter()
                ids = search(q, k)
                times.append((time.perf_counter() - t) * 1e6)
                found.append(ids)
            recall = float(np.mean([len(set(map(int, f)) & set(map(int, tr))) / k for f, tr in zip(found, truth)]))
            out.setdefault(name, {"installed": True, "removes_entries": removable})[str(size)] = {
                "build_s": round(built, 2), "query_us": round(float(np.median(times)), 1), "recall": round(recall, 4)}
    return out


def _hnswlib(base: np.ndarray, dim: int):
    import hnswlib
    index = hnswlib.Index(space="l2", dim=dim)
    index.init_index(max_elements=len(base), M=16, ef_construction=100, allow_replace_deleted=True)
    index.set_num_threads(1)
    index.add_items(base, np.arange(len(base)))
    index.set_ef(64)
    return (lambda q, k: index.knn_query(q[None], k=k)[0][0]), True


def _faiss(base: np.ndarray, dim: int):
    import faiss
    faiss.omp_set_num_threads(1)
    index = faiss.IndexHNSWFlat(dim, 16)
    index.hnsw.efConstruction = 100
    index.add(base)
    index.hnsw.efSearch = 64
    return (lambda q, k: index.search(q[None], k)[1][0]), False   # HNSW in faiss has no remove_ids


def _usearch(base: np.ndarray, dim: int):
    from usearch.index import Index
    index = Index(ndim=dim, metric="l2sq", dtype="f32", connectivity=16, expansion_add=100, expansion_search=64)
    index.add(np.arange(len(base)), base, threads=1)
    return (lambda q, k: index.search(q, k, threads=1).keys), True


# -- the whole benchmark ----------------------------------------------------------------------

def _wan_ms(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of milliseconds") from None
    if not 0 <= value <= 10_000:
        raise argparse.ArgumentTypeError(f"the WAN delay must be 0..10000 ms, got {text}")
    return value


def _scenarios(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(text.split(",")))
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown scenarios {unknown}; known: {', '.join(SCENARIOS)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fogsplit bench cache", description=__doc__.split("\n")[0])
    p.add_argument("--bundle", type=Path, help="an exported images bundle (default: train one)")
    p.add_argument("--trusted-key", action="append", default=[], metavar="PATH",
                   help="with --bundle: a public key (.pub) whose signature on it is trusted; repeatable")
    p.add_argument("--allow-unsigned", action="store_true", help="with --bundle: accept it without a signature")
    p.add_argument("--train-events", type=int, default=4000, help="events to train a bundle on (default 4000)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--broker", help="broker URL (default: an embedded broker)")
    p.add_argument("--frames", type=int, default=1000, help="frames of the main stream (default 1000)")
    p.add_argument("--redundancy", type=float, default=0.95,
                   help="chance the next frame shows the same scene (default 0.95: scenes of ~20 frames)")
    p.add_argument("--rate", type=float, default=25.0, help="frames per second (default 25)")
    p.add_argument("--wan-ms", type=_wan_ms, default=40.0,
                   help="one-way delay on the cloud hop in the wan-* scenarios, ms (default 40)")
    p.add_argument("--scenarios", type=_scenarios, default=tuple(SCENARIOS),
                   help="comma-separated, first is the headline: " + ",".join(SCENARIOS) + " (default all)")
    p.add_argument("--local-threshold", type=float, default=None,
                   help="local exit threshold for both runs (default: the bundle's calibrated one)")
    p.add_argument("--entries", type=int, default=4096, help="cache bound in entries (default 4096)")
    p.add_argument("--cache-bytes", type=int, default=32 << 20, help="cache bound in bytes (default 32 MiB)")
    p.add_argument("--sweep-redundancy", type=float, nargs="*", default=[0.0, 0.5, 0.8, 0.95])
    p.add_argument("--sweep-entries", type=int, nargs="*", default=[4, 32, 4096])
    p.add_argument("--sweep-frames", type=int, default=400)
    p.add_argument("--lookup-sizes", type=int, nargs="*", default=[256, 1024, 4096, 16384])
    p.add_argument("--ann-sizes", type=int, nargs="*", default=[1000, 10000])
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("--txt", type=Path, help="write the table here too")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("fogsplit.gateway", "fogsplit.deviceagent", "fogsplit.cloudworker", "fogsplit.core.mqtt"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if not 0 <= args.redundancy < 1 or any(not 0 <= r < 1 for r in args.sweep_redundancy):
        raise SystemExit("fogsplit bench cache: redundancy must be in [0, 1)")

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fogsplit-cache-") as tmp:
        if args.bundle:
            bundle = load_bundle(args.bundle, trusted_keys=[load_public_key(k) for k in args.trusted_key],
                                 allow_unsigned=args.allow_unsigned)
        else:
            trained = train_bundle(Path(tmp) / "bundle", args)
            bundle = load_bundle(trained, trusted_keys=[sign_ephemeral(trained)])
        embedded = None if args.broker else EmbeddedBroker().start()
        url = args.broker or embedded.url
        fleet = f"cache{int(time.time()) % 100000}"
        cache = CacheSettings(max_entries=args.entries, max_bytes=args.cache_bytes, ann_above=max(args.entries, 4096))
        try:
            main_stream = redundant_images(args.frames, seed=args.seed + 100, redundancy=args.redundancy)
            common = dict(rate=args.rate, local_threshold=args.local_threshold)
            runs = []
            for name in args.scenarios:
                scenario = SCENARIOS[name]
                pair = run_pair(url, bundle, main_stream, cache=cache, fleet=f"{fleet}-{name}",
                                wan_ms=args.wan_ms if scenario["wan"] else 0.0, edge_exit=scenario["edge_exit"],
                                **common)
                runs.append({"scenario": name, **pair})
            headline = SCENARIOS[args.scenarios[0]]
            common.update(wan_ms=args.wan_ms if headline["wan"] else 0.0, edge_exit=headline["edge_exit"])
            sweep = {"scenario": args.scenarios[0], "redundancy": [], "entries": []}
            for r in args.sweep_redundancy:
                pair = run_pair(url, bundle, redundant_images(args.sweep_frames, seed=args.seed + 200, redundancy=r),
                                cache=cache, fleet=f"{fleet}-r{int(r * 100)}", **common)
                sweep["redundancy"].append(_sweep_row(pair, redundancy=r))
            for entries in args.sweep_entries:
                small = CacheSettings(max_entries=entries, max_bytes=args.cache_bytes, ann_above=max(entries, 4096))
                pair = run_pair(url, bundle, redundant_images(args.sweep_frames, seed=args.seed + 300,
                                                              redundancy=args.redundancy),
                                cache=small, fleet=f"{fleet}-e{entries}", **common)
                sweep["entries"].append(_sweep_row(pair, entries=entries))
        finally:
            if embedded:
                embedded.stop()
        m = bundle.manifest
        gateway_dim = int(np.prod(m.tier_shard("gateway").inputs["fused"][1:]))
        report = {
            "model": m.model_id, "broker": "embedded" if embedded else url, "rate": args.rate,
            "thresholds": {**m.thresholds, **({"local": args.local_threshold} if args.local_threshold is not None else {})},
            "redundancy": args.redundancy, "cache_settings": cache.to_dict(),
            "calibration": m.cache.to_dict() if m.cache else None,
            "scenario": runs[0]["scenario"], "wan_ms": runs[0]["wan_ms"],
            **{k: runs[0][k] for k in ("hit_rate", "accuracy_off", "accuracy_on", "latency_ms")},
            "runs": runs, "sweep": sweep,
            "key_dims": {"gateway": gateway_dim, "device": int(np.prod(m.feature_shape))},
            "lookup_us": lookup_times(gateway_dim, args.lookup_sizes),
            "ann_libraries": compare_ann_libraries(gateway_dim, args.ann_sizes),
            "seconds": round(time.perf_counter() - started, 1),
        }
    report["done_when"] = done_when(runs)
    text = format_table(report)
    print(text)
    for path, body in ((args.json, json.dumps(report, indent=2) + "\n"), (args.txt, text + "\n")):
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(body)
    return 0


def train_bundle(out: Path, args) -> Path:
    from fogsplit.export.pipeline import ExportOptions, export_bundle
    log.info("training a bundle on %d events", args.train_events)
    export_bundle(multiview_images(n_events=args.train_events, seed=args.seed), out,
                  ExportOptions(epochs=args.epochs, seed=args.seed, progress=False))
    return out


def _sweep_row(pair: dict, **knob) -> dict:
    return {**knob, "frames": pair["frames"], "repeated_fraction": pair["repeated_fraction"],
            "hit_rate": pair["hit_rate"], "answered_from_cache": pair["answered_from_cache"],
            "accuracy_off": pair["accuracy_off"], "accuracy_on": pair["accuracy_on"],
            "bytes_saved_fraction": pair["bytes_saved_fraction"],
            "gateway_runs_saved_fraction": pair["compute"]["gateway_runs_saved_fraction"],
            "latency_ms": pair["latency_ms"]}


def done_when(runs: list[dict]) -> list[dict]:
    """Issue 5's three figures for each pair of runs, each with its number."""
    out = []
    for run in runs:
        hit, miss = run["latency_ms"]["hit"], run["latency_ms"]["miss"]
        ratio = round(hit["p50"] / miss["p50"], 3) if hit and miss else None
        out.append({"scenario": run["scenario"], "wan_ms": run["wan_ms"],
                    "hit_rate_at_least_0.5": run["hit_rate"] >= 0.5,
                    "accuracy_within_1_point": run["accuracy_on"] >= run["accuracy_off"] - 0.01,
                    "hit_p50_over_miss_p50": ratio,
                    "hit_latency_at_most_a_fifth": ratio is not None and ratio <= 0.2})
    return out


def format_table(r: dict) -> str:
    def lat(v):
        return "-" if v is None else f"{v['p50']:.1f}/{v['p99']:.1f}"

    lines = [f"fogsplit bench cache: model {r['model']}, broker {r['broker']}, {r['rate']:.0f} frames/s, "
             f"exit thresholds {r['thresholds']}",
             "  scenario   wan_ms frames scenes  hit_rate  acc_off  acc_on  hit p50/p99 ms  miss p50/p99 ms  ratio  "
             "bytes/ev off->on  gateway runs saved  cloud runs saved"]
    for run, check in zip(r["runs"], r["done_when"]):
        c = run["compute"]
        lines.append(f"  {run['scenario']:<9} {run['wan_ms']:>6.0f} {run['frames']:>6} {run['scenes']:>6}  {run['hit_rate']:>8.3f}  "
                     f"{run['accuracy_off']:>7.3f}  {run['accuracy_on']:>6.3f}  {lat(run['latency_ms']['hit']):>14}  "
                     f"{lat(run['latency_ms']['miss']):>15}  {check['hit_p50_over_miss_p50']!s:>5}  "
                     f"{run['bytes_per_event']['off']:>7.0f}->{run['bytes_per_event']['on']:<7.0f}  "
                     f"{c['gateway_runs_saved_fraction']:>18.3f}  {c['cloud_runs_saved_fraction']:>16.3f}")
    lines.append(f"  sweeps in scenario {r['sweep']['scenario']}")
    lines.append("  sweep of redundancy (repeated fraction): hit_rate, accuracy off -> on, bytes saved")
    for row in r["sweep"]["redundancy"]:
        lines.append(f"    r={row['redundancy']:<5} ({row['repeated_fraction']:.2f})  {row['hit_rate']:.3f}  "
                     f"{row['accuracy_off']:.3f} -> {row['accuracy_on']:.3f}  {row['bytes_saved_fraction']}")
    lines.append("  sweep of cache size (entries): hit_rate, accuracy off -> on, bytes saved")
    for row in r["sweep"]["entries"]:
        lines.append(f"    {row['entries']:>6}  {row['hit_rate']:.3f}  {row['accuracy_off']:.3f} -> "
                     f"{row['accuracy_on']:.3f}  {row['bytes_saved_fraction']}")
    lines.append(f"  lookup us by entries ({r['key_dims']['gateway']}-value keys): " + "  ".join(
        f"{size}: exact {r['lookup_us']['exact'][size]} ann {r['lookup_us']['ann'][size]}"
        for size in r["lookup_us"]["exact"]))
    for name, fig in r["ann_libraries"].items():
        if not fig.get("installed"):
            lines.append(f"  {name}: not installed")
            continue
        lines.append(f"  {name} (removes entries: {fig['removes_entries']}): " + "  ".join(
            f"{size}: build {v['build_s']}s query {v['query_us']}us recall {v['recall']}"
            for size, v in fig.items() if isinstance(v, dict)))
    lines.append(f"  time {r['seconds']}s")
    return "\n".join(lines)
