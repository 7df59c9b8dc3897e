"""The rollout state machine without a broker: chunks in any order, duplicates, a missing chunk,
a bad sha256, bad signatures, activation in the past and the future, health and rollback."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import pytest

from fogsplit.core.clock import FakeClock
from fogsplit.core.manifest import write_manifest
from fogsplit.core.models import ModelSet, peek_tag
from fogsplit.core.frames import SCORES, encode_slot_frame, frame_tag
from fogsplit.core.codecs import CodecSpec
from fogsplit.core.rollout import Forget, Offer, Prepare, Report, RolloutAgent, RolloutError, Schedule, Trust, \
    chunk_topic_parts, parse_offer
from fogsplit.core.settings import RolloutSettings
from fogsplit.core.signing import load_public_key, new_key_pair, sign_bundle
from fogsplit.core.store import BundleStore
from fakes import manifest

CHUNK = 1024
SHARD = "gateway"


def make_bundle(root: Path, key: Path, *, dataset: str = "b", size: int = 3000) -> Path:
    """A signed bundle whose shards are plain bytes (the agent never runs them)."""
    root.mkdir(parents=True)
    m = manifest()
    shards = []
    for i, s in enumerate(m.shards):
        data = bytes((i * 7 + j) % 251 for j in range(size))
        (root / s.file).write_bytes(data)
        shards.append(dataclasses.replace(s, sha256=hashlib.sha256(data).hexdigest()))
    write_manifest(dataclasses.replace(m, shards=tuple(shards), dataset=dataset), root)
    sign_bundle(root, key)
    return root


@pytest.fixture
def keys(tmp_path):
    key, pub = new_key_pair(tmp_path / "keys", "ops")
    return key, pub


@pytest.fixture
def bundle(tmp_path, keys):
    return make_bundle(tmp_path / "b", keys[0])


def offer_of(path: Path, activate_at: float | None = None, rollout: str = "r1") -> tuple[Offer, list[bytes]]:
    body = json.loads((path / "manifest.json").read_text())
    data = (path / "gateway.onnx").read_bytes()
    chunks = [data[i:i + CHUNK] for i in range(0, len(data), CHUNK)]
    files = {n: (path / n).read_bytes() for n in ("manifest.json", "manifest.sig")}
    counts = {s["name"]: math.ceil((path / s["file"]).stat().st_size / CHUNK) for s in body["shards"]}
    return Offer(rollout, body["model_id"], files, counts, CHUNK, activate_at), chunks


def agent(tmp_path, keys, clock, **settings) -> RolloutAgent:
    s = RolloutSettings(store=str(tmp_path / "store"), health_events=3, **settings)
    return RolloutAgent(tier="gateway", name="gw0", cell="c0", shards=[SHARD], running="aaaaaaaaaaaa",
                        store=BundleStore(s.store, keep=s.keep), trust=Trust([load_public_key(keys[1])]),
                        settings=s, clock=clock)


def states(outs) -> list[str]:
    return [o.body["state"] for o in outs if isinstance(o, Report)]


def stage(a: RolloutAgent, offer: Offer, chunks: list[bytes]):
    outs = a.on_offer(offer)
    for i in reversed(range(len(chunks))):          # out of order
        outs += a.on_chunk(offer.model, SHARD, i, chunks[i])
    return outs


def test_chunks_out_of_order_and_duplicated_stage_the_bundle(tmp_path, keys, bundle):
    a = agent(tmp_path, keys, FakeClock())
    offer, chunks = offer_of(bundle)
    outs = a.on_offer(offer)
    outs += a.on_chunk(offer.model, SHARD, 2, chunks[2])
    outs += a.on_chunk(offer.model, SHARD, 2, chunks[2])
    outs += a.on_chunk(offer.model, "cloud", 0, b"not mine")
    assert states(outs) == []
    outs += a.on_chunk(offer.model, SHARD, 0, chunks[0]) + a.on_chunk(offer.model, SHARD, 1, chunks[1])
    assert states(outs) == ["staged"]
    prepared = [o for o in outs if isinstance(o, Prepare)]
    assert prepared[0].bundle.manifest.model_id == offer.model
    assert (tmp_path / "store" / offer.model / "gateway.onnx").read_bytes() == (bundle / "gateway.onnx").read_bytes()
    assert not (tmp_path / "store" / offer.model / "cloud.onnx").exists()   # only this tier's shards
    assert a.counters["duplicates"] == 1


def test_chunks_ahead_of_their_offer_are_held(tmp_path, keys, bundle):
    a = agent(tmp_path, keys, FakeClock())
    offer, chunks = offer_of(bundle)
    outs = [o for i, c in enumerate(chunks) for o in a.on_chunk(offer.model, SHARD, i, c)]
    assert outs == []
    assert states(a.on_offer(offer)) == ["staged"]


def test_a_missing_chunk_refuses_the_bundle_after_the_timeout(tmp_path, keys, bundle):
    clock = FakeClock()
    a = agent(tmp_path, keys, clock, stage_timeout_s=30)
    offer, chunks = offer_of(bundle)
    assert states(a.on_offer(offer) + a.on_chunk(offer.model, SHARD, 0, chunks[0])) == []
    clock.advance(31)
    outs = a.on_timer()
    assert states(outs) == ["refused"]
    assert "missing chunks" in outs[0].body["reason"] and "gateway[1]" in outs[0].body["reason"]
    assert a.on_offer(offer) == []                   # never staged again by this process


def test_a_bad_sha256_is_refused(tmp_path, keys, bundle):
    a = agent(tmp_path, keys, FakeClock())
    offer, chunks = offer_of(bundle)
    chunks[1] = bytes([chunks[1][0] ^ 1]) + chunks[1][1:]
    outs = stage(a, offer, chunks)
    assert states(outs) == ["refused"] and "sha256" in outs[-1].body["reason"]
    assert not (tmp_path / "store" / offer.model).exists()


@pytest.mark.parametrize("damage, reason", [("tamper", "tampered"), ("unknown", "unknown key"),
                                             ("unsigned", "unsigned")])
def test_a_bad_signature_is_refused(tmp_path, keys, bundle, damage, reason):
    a = agent(tmp_path, keys, FakeClock())
    offer, chunks = offer_of(bundle)
    files = dict(offer.files)
    if damage == "tamper":
        files["manifest.json"] = files["manifest.json"].replace(b'"local": 0.5', b'"local": 0.6')
    elif damage == "unknown":
        other, _ = new_key_pair(tmp_path / "other", "intruder")
        sign_bundle(bundle, other)
        files["manifest.sig"] = (bundle / "manifest.sig").read_bytes()
    else:
        del files["manifest.sig"]
    outs = stage(a, dataclasses.replace(offer, files=files), chunks)
    assert states(outs) == ["refused"]
    assert outs[-1].body["reason"].startswith(reason)


def test_an_offer_over_the_byte_bound_or_without_my_shard_is_refused(tmp_path, keys, bundle):
    a = agent(tmp_path, keys, FakeClock(), max_bytes=2048)
    offer, _ = offer_of(bundle)
    outs = a.on_offer(offer)
    assert states(outs) == ["refused"] and "rollout.max_bytes" in outs[0].body["reason"]
    b = agent(tmp_path / "2", keys, FakeClock())
    outs = b.on_offer(dataclasses.replace(offer, chunks={"cloud": 3}))
    assert states(outs) == ["refused"] and "no shard gateway" in outs[0].body["reason"]


def test_activation_in_the_future_then_health_ok(tmp_path, keys, bundle):
    clock = FakeClock()
    a = agent(tmp_path, keys, clock)
    offer, chunks = offer_of(bundle)
    stage(a, offer, chunks)
    at = clock.time() + 5
    outs = a.on_offer(dataclasses.replace(offer, activate_at=at))
    assert outs == [Schedule(offer.model, at)]
    assert a.running == "aaaaaaaaaaaa"
    clock.advance(5)
    outs = a.on_timer()
    assert states(outs) == ["active"] and outs[0].body["health"] == "checking"
    assert a.store.active() == offer.model
    outs = a.on_events(offer.model, 2, degraded=1) + a.on_events(offer.model, 1)
    assert states(outs) == ["active"] and outs[0].body["health"] == "ok"
    clock.advance(a.settings.drain_s)
    assert Forget("aaaaaaaaaaaa") in a.on_timer()


def test_activation_in_the_past_switches_at_once(tmp_path, keys, bundle):
    clock = FakeClock()
    a = agent(tmp_path, keys, clock)
    offer, chunks = offer_of(bundle, activate_at=clock.time() - 3)
    outs = stage(a, offer, chunks)
    assert states(outs) == ["staged", "active"]
    assert Schedule(offer.model, clock.time() - 3) in outs
    assert a.running == offer.model


def test_a_failed_health_check_rolls_back_by_itself(tmp_path, keys, bundle):
    clock = FakeClock()
    a = agent(tmp_path, keys, clock)
    offer, chunks = offer_of(bundle, activate_at=clock.time())
    stage(a, offer, chunks)
    outs = a.on_events(offer.model, 1, failure="shard gateway.onnx gave non-finite logits")
    assert states(outs) == ["rolled-back"]
    report = outs[-1].body
    assert "non-finite" in report["reason"] and report["active"] == "aaaaaaaaaaaa"
    assert Schedule("aaaaaaaaaaaa", report["revert_at"]) in outs and report["revert_at"] > clock.time()
    assert a.running == "aaaaaaaaaaaa" and a.store.active() is None
    assert a.on_offer(offer) == []


def test_all_events_degraded_fails_the_health_check(tmp_path, keys, bundle):
    clock = FakeClock()
    a = agent(tmp_path, keys, clock)
    offer, chunks = offer_of(bundle, activate_at=clock.time())
    stage(a, offer, chunks)
    assert states(a.on_events(offer.model, 3, degraded=3)) == ["rolled-back"]


def test_a_peer_rollback_is_followed(tmp_path, keys, bundle):
    clock = FakeClock()
    a = agent(tmp_path, keys, clock)
    offer, chunks = offer_of(bundle, activate_at=clock.time())
    stage(a, offer, chunks)
    at = clock.time() + 1
    outs = a.on_peer_status({"rollout": "r1", "model": offer.model, "state": "rolled-back", "tier": "device",
                             "name": "cam0", "reason": "health check failed", "revert_at": at})
    assert states(outs) == ["rolled-back"] and Schedule("aaaaaaaaaaaa", at) in outs
    assert "device cam0" in outs[-1].body["reason"]


def test_a_restarted_tier_reports_the_model_it_runs(tmp_path, keys, bundle):
    clock = FakeClock()
    a = agent(tmp_path, keys, clock)
    offer, chunks = offer_of(bundle, activate_at=clock.time())
    stage(a, offer, chunks)
    a.on_events(offer.model, 3)
    b = RolloutAgent(tier="gateway", name="gw0", cell="c0", shards=[SHARD], running=offer.model, store=a.store,
                     trust=a.trust, settings=a.settings, clock=clock)
    outs = b.on_offer(offer)
    assert states(outs) == ["active"] and outs[0].body["health"] == "ok"
    assert a.store.load_active(shards=[SHARD], trust=a.trust).manifest.model_id == offer.model


@pytest.mark.parametrize("payload", [b"not json", b"[]", b'{"model": "x"}',
                                     json.dumps({"rollout": "r", "model": "../../etc", "files": {}, "chunks": {},
                                                 "chunk_bytes": 10, "activate_at": None, "abort": None}).encode(),
                                     json.dumps({"rollout": "r", "model": "abcdef123456",
                                                 "files": {"../manifest.json": ""}, "chunks": {},
                                                 "chunk_bytes": 10, "activate_at": None, "abort": None}).encode(),
                                     json.dumps({"rollout": "r", "model": "abcdef123456",
                                                 "files": {"manifest.json": "!!"}, "chunks": {"g": 1},
                                                 "chunk_bytes": 10, "activate_at": "soon", "abort": None}).encode()])
def test_a_malformed_offer_is_refused_with_a_reason(payload):
    with pytest.raises(RolloutError):
        parse_offer(payload)


def test_chunk_topics_are_checked():
    assert chunk_topic_parts("fogsplit/v1/f/model/abcdef123456/shard/gateway/3") == ("abcdef123456", "gateway", 3)
    for bad in ("fogsplit/v1/f/model/ABC/shard/gateway/3", "fogsplit/v1/f/model/abcdef123456/shard/gateway/x"):
        with pytest.raises(RolloutError):
            chunk_topic_parts(bad)


def test_the_model_set_owns_events_by_capture_time():
    models = ModelSet("aaaaaa", "A")
    models.add("bbbbbb", "B")
    models.switch("bbbbbb", 100.0)
    assert models.logic_at(99.9) == "A" and models.logic_at(100.0) == "B"
    assert models.owns("aaaaaa", 99.0) and not models.owns("aaaaaa", 100.0)
    models.switch("aaaaaa", 150.0)                   # a rollback
    assert models.logic_at(120) == "B" and models.logic_at(150) == "A"
    frame = encode_slot_frame(SCORES, model="bbbbbb", event=7, tensor=__import__("numpy").zeros(3, "float32"),
                              codec=CodecSpec("fp32"))
    assert peek_tag(frame) == frame_tag("bbbbbb") and models.by_tag(frame) == "B"
    models.forget("bbbbbb")
    assert models.by_tag(frame) is None and models.logic_at(120) == "A"


def test_the_store_keeps_the_newest_and_the_active(tmp_path):
    store = BundleStore(tmp_path, keep=2)
    for i, model in enumerate(["aaaaaa", "bbbbbb", "cccccc", "dddddd"]):
        store.staging(model)
        store.commit(model)
        (tmp_path / model / "manifest.json").write_text("{}")
        import os
        os.utime(tmp_path / model, (i, i))
    store.set_active("aaaaaa")
    assert sorted(store.prune()) == ["bbbbbb"]
    assert store.active() == "aaaaaa" and store.has("cccccc") and store.has("dddddd")
    (tmp_path / "active").write_text("../../x")
    assert store.active() is None
