"""The semantic cache as a data structure, the redundant stream, and the threshold calibration."""
from __future__ import annotations

import json

import numpy as np
import pytest

from fogsplit.core.cache import CacheSettings, SemanticCache, cell_vote, exact_search, normalise, vote
from fogsplit.core.errors import BundleError, ConfigError
from fogsplit.export.cache_calibrate import calibrate_cache_threshold, calibrate_cell_threshold, unit_rows
from fogsplit.export.streams import redundant_images, scene_ids
from fogsplit.core.manifest import MANIFEST, parse_manifest


def clustered(n: int, dim: int, clusters: int, spread: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Keys around ``clusters`` random centres; the label of a key is its centre's index mod 4."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    which = rng.integers(0, clusters, n)
    return (centres[which] + spread * rng.standard_normal((n, dim))).astype(np.float32), which % 4


def settings(**overrides) -> CacheSettings:
    return CacheSettings(**{"max_entries": 64, "max_bytes": 1 << 20, "ttl_s": 100.0, "k": 3,
                            "threshold": 0.5, "min_agreement": 1.0, "ann_above": 64, **overrides})


# -- keys and votes ---------------------------------------------------------------------------

def test_keys_are_unit_norm_whatever_the_scale():
    x = np.arange(12, dtype=np.float32).reshape(3, 4) + 1
    assert np.linalg.norm(normalise(x)) == pytest.approx(1.0)
    assert np.allclose(normalise(x), normalise(100 * x))
    assert not normalise(np.zeros(5)).any()


def test_vote_needs_neighbours_within_the_threshold_that_agree():
    near_agree = vote(np.array([2, 2, 1]), np.array([0.1, 0.2, 0.9]), classes=4, threshold=0.5, min_agreement=1.0)
    assert near_agree.label == 2 and near_agree.neighbours == 2 and near_agree.distribution[2] == 1.0
    mixed = vote(np.array([2, 1, 2]), np.array([0.1, 0.2, 0.3]), classes=4, threshold=0.5, min_agreement=1.0)
    assert mixed.label is None and mixed.neighbours == 3
    assert vote(np.array([2, 1, 2]), np.array([0.1, 0.2, 0.3]), classes=4, threshold=0.5,
                min_agreement=0.6).label == 2
    far = vote(np.array([2]), np.array([0.7]), classes=4, threshold=0.5, min_agreement=1.0)
    assert far.label is None and far.neighbours == 0 and far.nearest == pytest.approx(0.7)
    assert vote(np.array([], int), np.array([]), classes=4, threshold=0.5, min_agreement=1.0).label is None


def test_cell_vote_needs_a_quorum_of_agreeing_devices():
    assert cell_vote({"a": 1, "b": 1, "c": None, "d": None}, quorum=0.5) == 1
    assert cell_vote({"a": 1, "b": None, "c": None, "d": None}, quorum=0.5) is None
    assert cell_vote({"a": 1, "b": 2, "c": 1, "d": 1}, quorum=0.5) is None
    assert cell_vote({}, quorum=0.5) is None
    assert cell_vote({"a": 3}, quorum=1.0) == 3


# -- the cache ----------------------------------------------------------------------------------

def test_lookup_finds_the_label_of_a_nearby_key_and_misses_a_far_one():
    keys, labels = clustered(40, 16, 8, 0.05)
    cache = SemanticCache(16, 4, settings())
    for t, (key, label) in enumerate(zip(keys, labels)):
        cache.put(key, int(label), now=float(t))
    rng = np.random.default_rng(1)
    hit = cache.lookup(keys[0] + 0.01 * rng.standard_normal(16), now=50.0)
    assert hit.hit and hit.label == labels[0]
    miss = cache.lookup(rng.standard_normal(16), now=50.0)
    assert not miss.hit
    stats = cache.stats()
    assert (stats.lookups, stats.hits, stats.entries, stats.search) == (2, 1, 40, "exact")


def test_exact_search_returns_the_k_nearest_in_order():
    keys = unit_rows(np.eye(5, dtype=np.float32) + 0.1)
    live = np.ones(5, bool)
    live[1] = False
    slots, distances = exact_search(keys, live, keys[1], 2)
    assert 1 not in slots and len(slots) == 2 and np.all(np.diff(distances) >= 0)


def test_least_recently_used_entry_goes_first():
    cache = SemanticCache(4, 4, settings(max_entries=3, threshold=0.1, k=1))
    eye = np.eye(4, dtype=np.float32)
    for i in range(3):
        cache.put(eye[i], i, now=float(i))
    assert cache.lookup(eye[0], now=3.0).label == 0   # entry 0 is now the most recently used
    cache.put(eye[3], 3, now=4.0)                        # so entry 1 goes
    assert len(cache) == 3 and cache.stats().evicted_lru == 1
    assert cache.lookup(eye[1], now=5.0).label is None
    assert [cache.lookup(eye[i], now=6.0).label for i in (0, 2, 3)] == [0, 2, 3]


def test_entries_expire_after_their_ttl():
    cache = SemanticCache(4, 4, settings(ttl_s=10.0, k=1, threshold=0.1))
    cache.put(np.array([1, 0, 0, 0], np.float32), 1, now=0.0)
    assert cache.lookup(np.array([1, 0, 0, 0], np.float32), now=9.0).label == 1
    assert cache.lookup(np.array([1, 0, 0, 0], np.float32), now=10.5).label is None
    assert len(cache) == 0 and cache.stats().evicted_ttl == 1


def test_memory_stays_within_the_bound_on_a_long_stream():
    """20000 inserts of 256-value keys into a cache bounded at 256 kB: never above it."""
    max_bytes = 256 * 1024
    cache = SemanticCache(256, 6, settings(max_entries=100_000, max_bytes=max_bytes, ann_above=100_000, ttl_s=1e6))
    assert cache.capacity == max_bytes // SemanticCache.bytes_per_entry(256, ann=False) < 100_000
    rng = np.random.default_rng(0)
    peak = 0
    for t in range(20_000):
        cache.put(rng.standard_normal(256), t % 6, now=float(t))
        if t % 97 == 0:
            cache.lookup(rng.standard_normal(256), now=float(t))
        peak = max(peak, cache.nbytes)
    assert peak <= max_bytes
    assert len(cache) == cache.capacity and cache.stats().evicted_lru == 20_000 - cache.capacity


def test_entry_bound_holds_with_the_ann_index():
    keys, labels = clustered(3000, 32, 50, 0.1)
    cache = SemanticCache(32, 4, settings(max_entries=1000, max_bytes=1 << 22, ann_above=200, ttl_s=1e6))
    for t, (key, label) in enumerate(zip(keys, labels)):
        cache.put(key, int(label), now=float(t))
    stats = cache.stats()
    assert stats.search == "ann" and stats.entries == 1000 and stats.nbytes <= 1 << 22


def test_clear_empties_the_cache():
    cache = SemanticCache(8, 4, settings())
    for i in range(10):
        cache.put(np.full(8, i + 1.0) + np.arange(8), i % 4, now=0.0)
    cache.clear()
    assert len(cache) == 0 and cache.stats().cleared == 1
    assert not cache.lookup(np.full(8, 1.0) + np.arange(8), now=1.0).hit
    cache.put(np.ones(8), 1, now=2.0)
    assert cache.lookup(np.ones(8), now=3.0).label == 1


def test_ann_search_agrees_with_exact_search():
    keys, labels = clustered(2500, 64, 100, 0.3, seed=2)
    queries, _ = clustered(200, 64, 100, 0.3, seed=2)
    ann = SemanticCache(64, 4, settings(max_entries=4000, max_bytes=1 << 26, ann_above=500, k=4, threshold=0.6, ttl_s=1e6))
    exact = SemanticCache(64, 4, settings(max_entries=4000, max_bytes=1 << 26, ann_above=4000, k=4, threshold=0.6, ttl_s=1e6))
    for t, (key, label) in enumerate(zip(keys, labels)):
        ann.put(key, int(label), now=float(t))
        exact.put(key, int(label), now=float(t))
    assert ann.stats().search == "ann" and exact.stats().search == "exact"
    overlap, same_vote = [], []
    for q in queries:
        a, _ = ann.nearest(normalise(q), 4)
        e, _ = exact.nearest(normalise(q), 4)
        overlap.append(len(set(a.tolist()) & set(e.tolist())) / 4)
        same_vote.append(ann.lookup(q, now=3000.0).label == exact.lookup(q, now=3000.0).label)
    assert np.mean(overlap) >= 0.95 and np.mean(same_vote) >= 0.97
    assert ann.stats().hits > 50


def test_threshold_changes_at_run_time_and_bad_values_are_refused():
    cache = SemanticCache(4, 4, settings(threshold=0.0, k=1))
    cache.put(np.array([1, 0.1, 0, 0], np.float32), 2, now=0.0)
    assert not cache.lookup(np.array([1, 0, 0, 0], np.float32), now=1.0).hit
    cache.set_threshold(0.5)
    assert cache.lookup(np.array([1, 0, 0, 0], np.float32), now=1.0).label == 2
    for bad in (-0.1, 2.5, float("nan"), "0.3", True):
        with pytest.raises(ConfigError, match="threshold"):
            cache.set_threshold(bad)


def test_a_key_of_the_wrong_size_or_a_bad_label_is_refused():
    cache = SemanticCache(4, 4, settings())
    with pytest.raises(ValueError, match="4"):
        cache.put(np.ones(5), 1, now=0.0)
    with pytest.raises(ValueError, match="label"):
        cache.put(np.ones(4), 7, now=0.0)
    with pytest.raises(ValueError, match="finite"):
        cache.lookup(np.array([1, np.nan, 0, 0]), now=0.0)


@pytest.mark.parametrize("body, names", [
    ({"max_entries": 0}, "max_entries"),
    ({"max_bytes": 10}, "max_bytes"),
    ({"ttl_s": -1}, "ttl_s"),
    ({"k": 0, "threshold": 3}, "k=0.*threshold=3"),
    ({"min_agreement": 0.4}, "min_agreement"),
    ({"enabled": "yes"}, "enabled"),
    ({"ann": "faiss"}, "ann"),
])
def test_bad_settings_are_refused_naming_the_field(body, names):
    with pytest.raises(ConfigError, match=names):
        CacheSettings.from_dict(body)


def test_unknown_settings_are_refused():
    with pytest.raises(ConfigError, match="unknown keys \\['entries'\\]"):
        CacheSettings.from_dict({"entries": 10})
    with pytest.raises(ConfigError, match="object"):
        CacheSettings.from_dict([1, 2])
    assert CacheSettings.from_dict({"max_entries": 10}).max_entries == 10


def test_a_byte_bound_too_small_for_one_key_is_refused():
    with pytest.raises(ConfigError, match="not even one"):
        SemanticCache(100_000, 4, settings(max_bytes=1024))


# -- the redundant stream ---------------------------------------------------------------------

def test_redundancy_sets_how_long_scenes_last():
    rng = np.random.default_rng(0)
    for redundancy in (0.0, 0.5, 0.9):
        scene = scene_ids(20_000, redundancy, rng)
        repeats = float((np.diff(scene) == 0).mean())
        assert repeats == pytest.approx(redundancy, abs=0.02)
    with pytest.raises(ValueError, match="redundancy"):
        scene_ids(10, 1.0, rng)


def test_frames_of_a_scene_are_alike_and_share_a_label():
    stream = redundant_images(120, seed=3, redundancy=0.9)
    data, scene = stream.data, stream.scene
    assert len(data) == 120 and data.sensor_names == [f"cam{k}" for k in range(6)]
    assert stream.scenes < 40 and stream.repeated_fraction > 0.7
    for s in np.unique(scene):
        assert len(set(data.y[scene == s].tolist())) == 1
    x = data.sensors["cam0"].astype(np.float32)
    same = [np.abs(x[i + 1] - x[i]).mean() for i in range(119) if scene[i] == scene[i + 1]]
    other = [np.abs(x[i + 1] - x[i]).mean() for i in range(119) if scene[i] != scene[i + 1]]
    assert np.mean(same) < 0.5 * np.mean(other)
    again = redundant_images(120, seed=3, redundancy=0.9)
    assert np.array_equal(again.data.sensors["cam3"], data.sensors["cam3"])
    assert len(data.test()) == 120


# -- calibration ------------------------------------------------------------------------------

def test_calibrated_threshold_separates_near_duplicates_from_other_scenes():
    rng = np.random.default_rng(4)
    centres = rng.standard_normal((60, 32))
    which = np.repeat(np.arange(60), 3)
    keys = centres[which] + 0.05 * rng.standard_normal((180, 32))
    y = which % 6
    answers = y.copy()
    answers[:18] = (answers[:18] + 1) % 6      # the model is wrong on 10%
    point = calibrate_cache_threshold(keys, answers, y, classes=6, k=2, min_agreement=1.0, max_accuracy_loss=0.01)
    within = np.linalg.norm(unit_rows(keys[0:1]) - unit_rows(keys[1:2]))
    across = np.linalg.norm(unit_rows(centres[0:1]) - unit_rows(centres[1:2]))
    assert within <= point.threshold < across
    assert point.hit_rate > 0.9 and point.queries == 180


def test_calibration_refuses_to_cache_when_every_neighbour_misleads():
    rng = np.random.default_rng(5)
    keys = rng.standard_normal((100, 8))
    y = rng.integers(0, 5, 100)
    point = calibrate_cache_threshold(keys, y, y, classes=5, k=3, min_agreement=1.0, max_accuracy_loss=0.0)
    nearest = min(np.linalg.norm(unit_rows(keys[i:i + 1]) - unit_rows(keys[j:j + 1]))
                  for i in range(100) for j in range(i + 1, 100) if y[i] != y[j])
    assert point.threshold < nearest


def test_cell_calibration_uses_the_quorum_of_devices():
    rng = np.random.default_rng(6)
    centres = rng.standard_normal((40, 16))
    which = np.repeat(np.arange(40), 3)
    y = which % 4
    devices = [centres[which] + 0.05 * rng.standard_normal((120, 16)) for _ in range(3)]
    point = calibrate_cell_threshold(devices, [y] * 3, y, y, classes=4, k=2, min_agreement=1.0, quorum=0.5,
                                     max_accuracy_loss=0.01)
    assert point.threshold > 0 and point.hit_rate > 0.9 and point.hit_accuracy == 1.0
    blind = calibrate_cell_threshold(devices, [(y + 1) % 4] * 3, y, y, classes=4, k=2, min_agreement=1.0,
                                     quorum=0.5, max_accuracy_loss=0.01)
    assert blind.hit_rate == 0.0    # no device's own exit agrees with its cache: no vote


# -- the manifest's cache section ---------------------------------------------------------------

@pytest.mark.slow
def test_the_bundle_carries_a_calibrated_cache_section_parsed_strictly(bundle_dir):
    data = json.loads((bundle_dir / MANIFEST).read_text())
    manifest = parse_manifest(data)
    assert manifest.cache is not None and 0 <= manifest.cache.gateway.threshold <= 2
    assert manifest.cache.gateway.queries > 0 and manifest.cache.k >= 1
    for path, value, message in ((("cache", "colour"), "red", "unknown keys \\['colour'\\] in cache"),
                                 (("cache", "gateway", "threshold"), 3.0, "cache.gateway.threshold"),
                                 (("cache", "device", "spread"), 1, "unknown keys \\['spread'\\] in cache.device"),
                                 (("cache", "k"), 0, "cache.k")):
        broken = json.loads(json.dumps(data))
        node = broken
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        with pytest.raises(BundleError, match=message):
            parse_manifest(broken)
    del data["cache"]["quorum"]
    with pytest.raises(BundleError, match="missing keys \\['quorum'\\]"):
        parse_manifest(data)


# -- the gateway's and the device's caches ----------------------------------------------------

def _manifest_with_cache(bundle_dir):
    from fogsplit.core.manifest import check_bundle_contents
    return check_bundle_contents(bundle_dir)


def test_resolve_takes_what_the_operator_left_unset_from_the_bundle():
    from fogsplit.core.cache import resolve
    from fogsplit.core.manifest import CachePoint, CacheSpec
    point = CachePoint(threshold=0.8, hit_rate=0.1, hit_accuracy=0.9, model_accuracy=0.9, queries=100)
    spec = CacheSpec(k=5, min_agreement=1.0, quorum=0.5, max_accuracy_loss=0.01, gateway=point,
                     device=CachePoint(threshold=0.6, hit_rate=0.1, hit_accuracy=0.9, model_accuracy=0.9, queries=100))
    assert resolve(CacheSettings(), spec, "gateway").threshold == 0.8
    assert resolve(CacheSettings(), spec, "device").threshold == 0.6
    assert resolve(CacheSettings(threshold=0.2, k=2), spec, "device").threshold == 0.2
    assert resolve(CacheSettings(k=2), spec, "device").k == 2
    with pytest.raises(ConfigError, match="no cache calibration"):
        resolve(CacheSettings(), None, "gateway")
    assert resolve(CacheSettings(threshold=0.4), None, "gateway").k == 4


def test_vote_logits_give_the_label_the_share_it_won():
    from fogsplit.core.exits import softmax
    from fogsplit.gateway.caching import vote_logits
    p = softmax(vote_logits(2, 0.75, 4))
    assert int(np.argmax(p)) == 2 and p[2] == pytest.approx(0.75) and p[0] == pytest.approx(0.25 / 3)
    assert softmax(vote_logits(1, 1.0, 6))[1] == pytest.approx(1.0, abs=1e-4)


@pytest.mark.slow
def test_gateway_cache_learns_edge_exits_and_held_cloud_answers_and_forgets_on_a_new_model(bundle_dir):
    from fogsplit.gateway.caching import GatewayCache
    manifest = _manifest_with_cache(bundle_dir)
    shape = manifest.tier_shard("gateway").inputs["fused"][1:]
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(shape), rng.standard_normal(shape)
    gw = GatewayCache(manifest, CacheSettings(threshold=0.3))
    assert not gw.lookup(a, now=0.0).hit
    assert gw.learn(a, 2, "edge", manifest.model_id, now=0.0)
    assert gw.lookup(a + 0.01 * rng.standard_normal(shape), now=1.0).label == 2
    assert not gw.learn(b, 1, "local", manifest.model_id, now=1.0)       # local exits are not cached
    gw.hold(7, b, now=1.0)
    assert not gw.on_result(7, 1, "cloud", "another-model", now=2.0)     # another model's answer
    assert not gw.on_result(8, 1, "cloud", manifest.model_id, now=2.0)   # not a forward held here
    assert gw.on_result(7, 1, "cloud", manifest.model_id, now=2.0)
    assert gw.lookup(b, now=3.0).label == 1
    assert manifest.cache.quorum == 0.5
    assert gw.devices_agree({"cam0": 1, "cam1": 1, "cam2": 1, "cam3": None}, expected=6) == 1
    assert gw.devices_agree({"cam0": 1, "cam1": None, "cam2": None}, expected=6) is None
    assert not gw.use_model(manifest.model_id) and len(gw.cache) == 2
    assert gw.use_model("retrained-model") and len(gw.cache) == 0
    snapshot = gw.snapshot()
    assert snapshot["gateway_hits"] == 2 and snapshot["device_hits"] == 1 and snapshot["filled"] == 2


@pytest.mark.slow
def test_device_cache_searches_exactly_learns_from_edge_and_cloud_and_votes_with_its_own_exit(bundle_dir):
    from fogsplit.device.caching import DeviceCache
    manifest = _manifest_with_cache(bundle_dir)
    with pytest.raises(ConfigError, match="searches exactly"):
        DeviceCache(manifest, CacheSettings(max_entries=10_000, ann_above=4096))
    cache = DeviceCache(manifest, CacheSettings(max_entries=64, threshold=0.2))
    feature = np.random.default_rng(1).standard_normal(manifest.feature_shape)
    says_3, says_0 = np.eye(manifest.num_classes)[3], np.eye(manifest.num_classes)[0]
    assert cache.vote(feature, says_3, now=0.0) is None
    assert not cache.learn(feature, 3, "cache", manifest.model_id, now=0.0)
    assert not cache.learn(feature, 99, "cloud", manifest.model_id, now=0.0)
    assert cache.learn(feature, 3, "cloud", manifest.model_id, now=0.0)
    assert cache.vote(feature, says_3, now=1.0) == 3
    assert cache.vote(feature, says_0, now=1.0) is None   # its own view points elsewhere: no vote
    assert cache.use_model("other") and cache.vote(feature, says_3, now=2.0) is None
