"""Fuzzing the tiers in process: a hostile frame is refused or served, never raised.

Frames come from bench/mutate.py: real frames made by the session bundle's own shards with the
encoders of core/frames.py, mutated by Hypothesis (each field drawn right or wrong, byte edits,
random bytes) and by the seeded fast mutator. They reach the tiers two ways, both broker-free:

- the logic objects (GatewayLogic, DeviceLogic, CloudLogic) of the small fakes manifest (fp32
  codecs, so NaN and inf payloads get through to the checks), called directly per topic kind;
- the real services of one cell on the in-memory broker (fogsplit.bench.fuzz.InProcess), with
  the session bundle's shards, so routing is the services' own and every topic they subscribe
  to is fuzzed.

Anything raised other than a refusal (a ``Refuse`` action or a ``FrameError``) is a crash. The
crashes this fuzzing found (issue 11 part 8) are kept in ``FOUND``, each with its exact frame
and the signature its crash had: each is replayed below and must now be refused, not raised.
"""
from __future__ import annotations

import json
import logging
import traceback

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from fakes import CELL, RATE, SENSORS, TOPICS, ScriptedRunner, confident, manifest, scores  # noqa: E402
from fogsplit.bench.fuzz import InProcess, quiet_tiers  # noqa: E402
from fogsplit.bench.mutate import (INPUT_KINDS, Fuzzed, Mutator, bundle_seeds, classify, context_of,  # noqa: E402
                                   demo_context, hypothesis_frames, synthetic_seeds)
from fogsplit.core.actions import Answer, Forward, Refuse, RequestFeatures, Send  # noqa: E402
from fogsplit.core.clock import FakeClock  # noqa: E402
from fogsplit.core.codecs import CodecSpec  # noqa: E402
from fogsplit.core.errors import FrameError  # noqa: E402
from fogsplit.core.frames import FEATURE, SCORES, decode_frame  # noqa: E402
from fogsplit.core.manifest import expect_frames, load_bundle  # noqa: E402
from fogsplit.core.roster import parse_status  # noqa: E402
from fogsplit.core.settings import DeviceSettings, GatewaySettings  # noqa: E402
from fogsplit.core.topics import Topics  # noqa: E402
from fogsplit.core.transport import Message  # noqa: E402
from fogsplit.cloud.logic import CloudLogic  # noqa: E402
from fogsplit.device.logic import DeviceLogic  # noqa: E402
from fogsplit.gateway.logic import GatewayLogic  # noqa: E402

ACTIONS = (Answer, Forward, Refuse, RequestFeatures, Send)
FUZZ_CELL = "cell0"
DEEP_JSON = b"[" * 1000 + b"]" * 1000
DEEP_MSGPACK = b"\x91" * 1000 + b"\xc0"
HUGE = b"1" + b"0" * 400            # a JSON integer no float holds

# Crashes this fuzzing found, now fixed (issue 11 part 8): (id, kind, payload, the signature
# its crash had: exception and where).
FOUND = [
    ("cmd-deep-json", "cmd", DEEP_JSON, r"RecursionError at commands\.py.*parse_thresholds"),
    ("cmd-huge-int", "cmd", b'{"local": ' + HUGE + b"}", r"OverflowError at commands\.py"),
    ("result-deep-json", "result", DEEP_JSON, r"RecursionError at results\.py.*from_json"),
    ("cloud-result-deep-json", "cloud_result", DEEP_JSON, r"RecursionError at gateway\.py.*_on_cloud_result"),
    ("cloud-result-model-not-hashable", "cloud_result", b'{"model": []}', r"TypeError at gateway\.py.*_on_cloud_result"),
    ("cloud-result-event-past-int64", "cloud_result",
     b'{"event": 9223372036854775808, "label": 0, "class": "a", "confidence": 0.5, "exit": "cloud", "devices": [],'
     b' "captured": 1.0, "latency_ms": 1.0, "model": "MODEL", "degraded": false}', r"OverflowError at journal\.py"),
    ("cloud-result-captured-null", "cloud_result",
     b'{"event": 12345, "label": 0, "class": "a", "confidence": 0.5, "exit": "cloud", "devices": [],'
     b' "captured": null, "latency_ms": 1.0, "model": "MODEL", "degraded": false}',
     r"TypeError at logic\.py.*on_cloud_result"),
    ("replay-deep-json", "replay", DEEP_JSON, r"RecursionError at gateway\.py.*_on_replay"),
    ("replay-client-wildcard", "replay", b'{"client": "+", "since": 0.0}', r"ValueError at (loopback|mqtt|client)\.py"),
    ("replay-since-huge-int", "replay", b'{"client": "app1", "since": ' + HUGE + b"}",
     r"OverflowError at gateway\.py.*_on_replay"),
    ("status-deep-json", "status", DEEP_JSON, r"RecursionError at gateway\.py.*_on_status"),
    ("status-deep-json-parse-status", "status", DEEP_JSON, r"RecursionError at roster\.py.*parse_status"),
    ("status-model-not-hashable", "status", b'{"state": "online", "model": {}}', r"TypeError at gateway\.py.*_on_status"),
    ("status-offline-rate-list", "status", b'{"state": "offline", "rate": []}', r"TypeError at roster\.py.*parse_status"),
    ("status-offline-rate-text", "status", b'{"state": "offline", "rate": "x"}', r"ValueError at roster\.py.*parse_status"),
    ("status-offline-rate-huge-int", "status", b'{"state": "offline", "rate": ' + HUGE + b"}",
     r"OverflowError at roster\.py.*parse_status"),
    ("status-offline-negative-rate-then-scores", "status", b'{"state": "offline", "rate": -5.0}',
     r"ValueError at frames\.py.*unwrap_slot"),
    ("status-offline-nan-rate-then-scores", "status", b'{"state": "offline", "rate": NaN}',
     r"ValueError at roster\.py.*event_of"),
    ("status-offline-infinite-rate-then-scores", "status", b'{"state": "offline", "rate": 1e308}',
     r"OverflowError at roster\.py.*event_of"),
    ("status-offline-huge-rate-then-scores", "status", b'{"state": "offline", "rate": 1e12}',
     r"OverflowError at (journal|roster)\.py"),
    ("gateway-status-deep-json", "gateway_status", DEEP_JSON, r"RecursionError at agent\.py.*_on_gateway_status"),
    ("forward-deep-msgpack", "forward", DEEP_MSGPACK, r"RecursionError at frames\.py.*_check"),
    ("scores-deep-msgpack", "scores", DEEP_MSGPACK, r"RecursionError at frames\.py.*_check"),
]
def signature_of(text: str, exc: BaseException) -> str:
    """A crash's signature from its formatted traceback, as fogsplit.bench.fuzz.Crash spells it."""
    where = [ln.strip() for ln in text.splitlines() if ln.strip().startswith('File "')]
    ours = [ln for ln in where if "/work/main/" in ln or "fogsplit" in ln] or where
    return f"{type(exc).__name__} at {ours[-1].split('/')[-1] if ours else '?'}"


def describe(crashes) -> str:
    return "\n\n".join(f"{c.signature} [{c.tier} {c.handler}] on {c.frame.topic}\npayload {c.frame.payload.hex()}\n"
                       f"{c.traceback}" for c in crashes[:3])


# -- the services of one cell, with the session bundle ---------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def quiet():
    """The tiers log a line per refused frame: silence them here, and only here."""
    loggers = [logging.getLogger(name) for name in ("fogsplit", "fogsplit.core.service", "fogsplit.gateway",
                                                    "fogsplit.device", "fogsplit.cloud")]
    levels = [logger.level for logger in loggers]
    quiet_tiers()
    yield
    for logger, level in zip(loggers, levels):
        logger.setLevel(level)


@pytest.fixture(scope="session")
def fuzz_bundle(bundle_dir, trusted_keys):
    return load_bundle(bundle_dir, trusted_keys=trusted_keys)


@pytest.fixture(scope="session")
def fuzz_seeds(fuzz_bundle):
    topics = Topics("fuzz")
    ctx = context_of(fuzz_bundle.manifest, topics, FUZZ_CELL, rate=RATE)
    return ctx, bundle_seeds(fuzz_bundle, topics, FUZZ_CELL, rate=RATE, now=1_700_000_000.0)


def make_cell(fuzz_bundle, ctx) -> InProcess:
    return InProcess(fuzz_bundle, cell=FUZZ_CELL, topics=ctx.topics, clock=FakeClock(), rate=RATE)


@pytest.fixture(scope="module")
def cell(fuzz_bundle, fuzz_seeds):
    """One cell that every Hypothesis example of a test feeds: state piles up, as in the field."""
    harness = make_cell(fuzz_bundle, fuzz_seeds[0])
    yield harness
    harness.close()


def test_seeds_are_frames_the_tiers_take(fuzz_bundle, fuzz_seeds):
    ctx, seeds = fuzz_seeds
    expect = expect_frames(fuzz_bundle.manifest)
    leaves = {"scores": "scores", "feature": "feature", "request": "request", "forward": "forward", "late": "late",
              "ack": "ack"}
    for seed in seeds:
        assert classify(seed.topic, ctx.topics) == seed.kind, seed.topic
        if seed.kind in leaves:
            decode_frame(seed.payload, leaves[seed.kind], expect)          # raises if not a valid frame
        elif seed.kind in ("result", "status", "cmd", "replay", "cloud_result", "gateway_status"):
            assert isinstance(json.loads(seed.payload), dict)
    assert {"scores", "feature", "request", "forward", "result", "status", "cmd"} <= {s.kind for s in seeds}


def test_the_seeded_mutator_is_reproducible_and_reaches_every_input_topic(fuzz_seeds):
    ctx, seeds = fuzz_seeds
    first = Mutator(seeds, ctx, seed=5, clock=lambda: 1_700_000_000.0).take(2000)
    again = Mutator(seeds, ctx, seed=5, clock=lambda: 1_700_000_000.0).take(2000)
    assert [(f.topic, f.payload) for f in first] == [(f.topic, f.payload) for f in again]
    assert {f.kind for f in first} == {s.kind for s in seeds if s.kind in INPUT_KINDS or s.kind == "raw"}
    families = {f.mutation.split(":")[0] for f in first}
    assert families == {"bytes", "structure", "random", "crafted", "topic", "valid"}
    assert sum(f.payload == s.payload for f in first for s in seeds[:1]) < 50      # mutations, not copies


def test_the_real_cell_answers_its_events(fuzz_bundle, fuzz_seeds):
    """The harness itself: devices capture, the gateway answers every event once."""
    harness = make_cell(fuzz_bundle, fuzz_seeds[0])
    first = round(harness.clock.time() * RATE)
    for i in range(5):
        harness.capture(first + i)
        harness.tick(0.5)
    harness.tick(3.0)
    events = [json.loads(r)["event"] for r in harness.results]
    assert sorted(set(events)) == list(range(first, first + 5)) and len(events) == 5
    assert harness.tally.crashes == []


@settings(max_examples=400, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_no_hypothesis_frame_crashes_a_service(cell, fuzz_seeds, data):
    ctx, seeds = fuzz_seeds
    frame = data.draw(hypothesis_frames(seeds, ctx))
    before = len(cell.tally.crashes)
    cell.feed(frame)
    if cell.tally.frames % 10 == 0:
        cell.capture(round(cell.clock.time() * RATE))
        cell.tick(0.3, frame)
    found = cell.tally.crashes[before:]
    assert not found, describe(found)


def test_seeded_mutations_crash_no_service_and_the_cell_still_answers(fuzz_bundle, fuzz_seeds):
    ctx, seeds = fuzz_seeds
    harness = make_cell(fuzz_bundle, ctx)
    mutator = Mutator(seeds, ctx, seed=11, clock=harness.clock.time, spoof=False)
    for i in range(4000):
        harness.feed(mutator.next())
        if i % 20 == 19:
            harness.tick(0.1)
            harness.capture(round(harness.clock.time() * RATE))
    found = harness.tally.crashes
    assert not found, describe(found)
    harness.tick(5.0)
    answered = len(harness.results)
    first = round(harness.clock.time() * RATE)
    for i in range(5):
        harness.capture(first + i)
        harness.tick(0.5)
    for _ in range(60):       # mostly stale frames, more than the cell's own: load, so the gateway may
        harness.tick(0.5)     # have asked the devices to thin their stream; the rest comes late
    events = {json.loads(r)["event"] for r in harness.results[answered:]}
    assert set(range(first, first + 5)) <= events
    harness.close()


@pytest.mark.parametrize("case", FOUND, ids=[k[0] for k in FOUND])
def test_a_frame_that_once_crashed_a_tier_is_refused_and_the_cell_goes_on(fuzz_bundle, fuzz_seeds, case):
    name, kind, payload, signature = case
    ctx, _ = fuzz_seeds
    harness = make_cell(fuzz_bundle, ctx)
    payload = payload.replace(b"MODEL", fuzz_bundle.manifest.model_id.encode())
    topic = ctx.topic(kind, device=ctx.sensors[0])
    harness.feed(Fuzzed(kind, topic, payload, name))
    first = round(harness.clock.time() * RATE)
    for i in range(3):
        harness.capture(first + i)
        harness.tick(0.4)
    harness.close()
    if name == "status-deep-json-parse-status":      # the logic's own parse, past the service's
        with pytest.raises(FrameError):
            parse_status(payload, "cam0")
        return
    assert not harness.tally.crashes, describe(harness.tally.crashes)


# -- the logic objects, fp32 codecs ------------------------------------------------------------------

class LogicCell:
    """The fakes' manifest with scripted shards: the logic objects of one cell, fed per kind."""

    def __init__(self) -> None:
        self.clock = FakeClock()
        m = manifest()
        self.gateway = GatewayLogic(
            m, ScriptedRunner(logits=confident(2), edge_feature=np.arange(4, dtype=np.float32)), cell=CELL,
            gateway="gw0", settings=GatewaySettings(deadline_ms=200, feature_deadline_ms=400), clock=self.clock)
        self.devices = [DeviceLogic(m, ScriptedRunner(scores=confident(1), feature=np.ones((2, 2, 2), np.float32)),
                                     cell=CELL, device=d, settings=DeviceSettings(), clock=self.clock)
                        for d in SENSORS]
        self.cloud = CloudLogic(
            m, ScriptedRunner(logits=confident(0)), clock=self.clock)
        for d in SENSORS:
            self.gateway.on_status(Message(TOPICS.device_status(CELL, d),
                                           json.dumps({"state": "online", "model": "m1", "rate": RATE}).encode()))

    def handlers(self, kind: str) -> list:
        g = self.gateway
        by_kind = {"scores": [g.on_scores], "feature": [g.on_feature], "status": [g.on_status],
                   "cmd": [g.on_command] + [d.on_command for d in self.devices],
                   "late": [getattr(g, "on_late", None)], "cloud_result": [getattr(g, "on_cloud_result", None)],
                   "result": [getattr(g, "on_result", None)] + [d.on_result for d in self.devices],
                   "request": [d.on_request for d in self.devices],
                   "ack": [getattr(d, "on_ack", None) for d in self.devices], "forward": [self.cloud.on_forward]}
        return [h for h in by_kind.get(kind, []) if h is not None]


@pytest.fixture(scope="module")
def logic_cell():
    return LogicCell()


LOGIC_CTX = demo_context(TOPICS, CELL)
LOGIC_SEEDS = synthetic_seeds(LOGIC_CTX, shapes={SCORES: (3,), FEATURE: (2, 2, 2), "forward": (4,)},
                              codecs={SCORES: CodecSpec("fp32"), FEATURE: CodecSpec("fp32"),
                                      "forward": CodecSpec("fp32")}, now=FakeClock().time())


@settings(max_examples=400, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(frame=hypothesis_frames(LOGIC_SEEDS, LOGIC_CTX))
def test_no_frame_makes_a_logic_object_raise(logic_cell, frame):
    for handler in logic_cell.handlers(frame.kind):
        try:
            actions = handler(Message(frame.topic, frame.payload))
        except FrameError:
            continue
        except Exception:  # noqa: BLE001
            raise AssertionError(f"{frame.kind} frame {frame.payload.hex()} raised:\n{traceback.format_exc()}")
        assert isinstance(actions, list) and all(isinstance(a, ACTIONS) for a in actions), actions
    logic_cell.clock.advance(0.05)
    logic_cell.gateway.on_timer(logic_cell.clock.monotonic())


def test_a_flood_of_seeded_mutations_leaves_the_logic_answering():
    cell_ = LogicCell()
    mutator = Mutator(LOGIC_SEEDS, LOGIC_CTX, seed=3, clock=cell_.clock.time, spoof=False)
    crashes = []
    for i in range(5000):
        frame = mutator.next()
        for handler in cell_.handlers(frame.kind):
            try:
                handler(Message(frame.topic, frame.payload))
            except FrameError:
                pass
            except Exception as exc:  # noqa: BLE001
                crashes.append((signature_of(traceback.format_exc(), exc), frame.topic, frame.payload.hex()))
        if i % 20 == 19:
            cell_.clock.advance(0.1)
            cell_.gateway.on_timer(cell_.clock.monotonic())
    assert not crashes, crashes[:3]
    cell_.clock.advance(5.0)
    cell_.gateway.on_timer(cell_.clock.monotonic())
    event = round(cell_.clock.time() * RATE)
    answers = [a for d in SENSORS for a in cell_.gateway.on_scores(scores(d, event, confident(1)))
               if isinstance(a, Answer)]
    if not answers:
        cell_.clock.advance(1.0)
        answers = [a for a in cell_.gateway.on_timer(cell_.clock.monotonic()) if isinstance(a, Answer)]
    assert [a.result.event for a in answers] == [event]


def test_the_fuzz_context_names_every_input_topic():
    ctx = demo_context(Topics("f"), "c")
    for kind in INPUT_KINDS:
        try:
            topic = ctx.topic(kind)
        except KeyError:          # a reliable-delivery topic not in this tree's topic table
            continue
        assert classify(topic, ctx.topics) == kind, (kind, topic)
