"""The delivery contract in the tiers' logic (docs/reliability.md), driven by calling it: the
device's spool and replay, the gateway's acks, journal, late events, cloud retries and clock
bounds. No broker: tests/test_faults.py proves the same over real processes and brokers."""
from __future__ import annotations

import numpy as np
import pytest

from fakes import CELL, RATE, SENSORS, TOPICS, UNSURE, ScriptedRunner, confident, manifest, scores, status
from fogsplit.core.actions import Answer, Forward, Refuse, Send
from fogsplit.core.clock import FakeClock
from fogsplit.core.codecs import CodecSpec, encode_tensor
from fogsplit.core.frames import ACK, LATE, decode_frame, encode_ack_frame, encode_late_frame
from fogsplit.core.manifest import expect_frames
from fogsplit.core.results import Result, make_result
from fogsplit.core.settings import DeviceSettings, GatewaySettings
from fogsplit.core.transport import Message
from fogsplit.device.logic import DeviceLogic
from fogsplit.device.sources import Capture
from fogsplit.device.spool import MAX_REOFFER_S, Spool
from fogsplit.gateway.journal import Journal
from fogsplit.gateway.logic import GatewayLogic

FP32 = CodecSpec("fp32")
FEATURE = np.full((2, 2, 2), 0.5, np.float32)


def only(actions, kind):
    assert len(actions) == 1 and isinstance(actions[0], kind), actions
    return actions[0]


# -- the device's spool ---------------------------------------------------------------------------

def spool(path=None, **kw) -> Spool:
    return Spool(path, **{"max_bytes": 1 << 20, "max_age_s": 60.0, "reoffer_s": 2.0, **kw})


def test_the_spool_replays_what_was_not_acked_in_capture_order_with_a_growing_delay():
    s = spool()
    for event in (12, 10, 11):
        s.put(event, event / RATE, "m1", b"s", b"f", None, now=event / RATE)
    s.ack([11], now=1.2)
    assert s.due(now=1.5, limit=10) == []                     # not yet reoffer_s after capture
    assert [h.event for h in s.due(now=3.3, limit=10)] == [10, 12]
    s.ack([12], now=3.4)                                       # the gateway is there: it acks
    assert s.due(now=4.0, limit=10) == []                     # the next replay of 10 is 2 s later ...
    assert [h.event for h in s.due(now=5.31, limit=10)] == [10]
    assert s.due(now=8.0, limit=10) == []                      # ... then 4 s later
    assert s.stats.replayed == 3 and s.stats.acked == 2 and len(s) == 1


def test_with_no_ack_coming_back_only_the_oldest_event_probes_the_link():
    s = spool()
    for event in range(100, 110):
        s.put(event, event / RATE, "m1", b"s", None, None, now=event / RATE)
    assert len(s.due(now=13.5, limit=64)) == 10        # the first replay sends what is due
    assert [h.event for h in s.due(now=100.0, limit=64)] == [100]   # then, unanswered, one probe per period
    s.ack([100], now=100.1)
    assert [h.event for h in s.due(now=100.2, limit=64)] == list(range(101, 110))


def test_the_spool_is_bounded_in_bytes_and_age_and_counts_what_it_drops():
    s = spool(max_bytes=10_000, max_age_s=5.0)
    for event in range(20):
        s.put(event, float(event), "m1", b"x" * 900, None, None, now=float(event))
    # the oldest events' frames went first, each leaving a 16-byte lost notice in its place
    assert len(s) == 20 and s.stats.dropped_full == 10 and s.stats.bytes <= 10_000
    assert [h.event for h in s.due(now=30.0, limit=64) if h.reason is None] == list(range(10, 20))
    assert s.expire(now=20.0) == list(range(10, 15))           # older than 5 s: notices too
    assert s.stats.expired == 5 and s.stats.notices == 15
    assert s.stats.notices_expired == 10 and len(s) == 10      # notices older than twice the age bound


def test_the_spool_survives_a_restart_of_the_agent(tmp_path):
    path = tmp_path / "spool.sqlite"
    s = spool(path)
    s.put(7, 0.7, "m1", b"scores", b"feature", 2, now=0.7)
    s.put(8, 0.8, "m1", b"scores", None, None, now=0.8)
    s.ack([8], now=0.9)
    del s                                                      # no close: as if killed
    again = spool(path)
    assert again.resumed == 1 and again.stats.bytes == len(b"scores") + len(b"feature")
    (held,) = again.due(now=10.0, limit=10)
    assert (held.event, held.captured, held.model, held.scores, held.feature, held.vote) == \
           (7, 0.7, "m1", b"scores", b"feature", 2)


def test_the_backoff_between_replays_is_capped():
    s = spool(reoffer_s=2.0)
    s.put(1, 0.0, "m1", b"s", None, None, now=0.0)
    now, times = 0.0, []
    for _ in range(200):
        now += 0.5
        if s.due(now, 10):
            s.last_ack = now               # keep it out of probe mode: the cap is what is tested
            times.append(now)
    gaps = np.diff(times)
    assert gaps.max() <= MAX_REOFFER_S + 0.5 and gaps[0] < gaps[-1]


# -- the device's logic -----------------------------------------------------------------------------

def device(**settings):
    clock = FakeClock()
    runner = ScriptedRunner(scores=confident(1), feature=FEATURE)
    logic = DeviceLogic(manifest(), runner, cell=CELL, device="cam1", settings=DeviceSettings(**settings),
                        clock=clock, spool=spool())
    return logic, clock


def test_a_device_spools_each_capture_replays_it_late_and_forgets_it_once_acked():
    logic, clock = device()
    event = round(clock.time() * RATE)
    only(logic.on_capture(Capture(event, clock.time(), np.zeros((1, 8, 8), np.float32))), Send)
    assert logic.replay() == []
    clock.advance(3.5)
    late = only(logic.replay(), Send)
    frame = decode_frame(late.payload, "late", expect_frames(logic.manifest))
    assert (late.kind, frame.kind, frame.event, frame.captured) == ("late", LATE, event, pytest.approx(event / RATE))
    assert np.allclose(frame.feature, FEATURE) and frame.tensor.argmax() == 1
    ack = Message(TOPICS.ack(CELL), encode_ack_frame(model="m1", events=[event - 3, event]))
    assert logic.on_ack(ack) == []
    clock.advance(60)
    assert logic.replay() == [] and logic.snapshot().spool["acked"] == 1


def test_a_lean_device_keeps_no_spool():
    logic, clock = device(delivery="lean")
    logic.on_capture(Capture(5, 0.5, np.zeros((1, 8, 8), np.float32)))
    clock.advance(100)
    assert logic.replay() == [] and logic.snapshot().spool == {}


@pytest.mark.parametrize("payload", [b"\x93\x00", encode_ack_frame(model="other", events=[1]),
                                     b"\x93" + bytes([0]) + b"\x01\x91\xff"])
def test_a_bad_ack_is_refused(payload):
    logic, _ = device()
    assert isinstance(only(logic.on_ack(Message(TOPICS.ack(CELL), payload)), Refuse), Refuse)


# -- the gateway ------------------------------------------------------------------------------------

def gateway(*, edge=UNSURE, journal=None, **settings):
    clock = FakeClock()
    runner = ScriptedRunner(logits=edge, edge_feature=np.arange(4, dtype=np.float32))
    logic = GatewayLogic(manifest(), runner, cell=CELL, gateway="gw0", clock=clock, journal=journal,
                         settings=GatewaySettings(**{"deadline_ms": 200, "feature_deadline_ms": 400, **settings}))
    for d in SENSORS:
        logic.on_status(status(d))
    return logic, clock


def late(device: str, event: int, logits, *, captured: float | None = None, model: str = "m1") -> Message:
    payload = encode_late_frame(model=model, event=event, captured=event / RATE if captured is None else captured,
                                scores=encode_tensor(np.asarray(logits, np.float32), FP32),
                                feature=encode_tensor(FEATURE, FP32))
    return Message(TOPICS.late(CELL, device), payload)


def acked(logic) -> list[int]:
    return [e for send in logic.take_acks() for e in decode_frame(send.payload, "ack", logic.expect).events]


def test_every_answered_event_is_acked_once_in_a_batch():
    logic, clock = gateway()
    event = round(clock.time() * RATE)
    for e in (event, event + 1):
        for d in SENSORS:
            logic.on_scores(scores(d, e, confident(0)))
    assert acked(logic) == [event, event + 1] and logic.take_acks() == []


def test_a_replayed_event_never_answered_is_answered_late_from_its_frames():
    logic, clock = gateway()
    event = round(clock.time() * RATE) - 300                  # 30 s ago: a device that was cut off
    assert logic.on_late(late("cam0", event, confident(1))) == []
    logic.on_late(late("cam1", event, confident(1)))
    answer = only(logic.on_late(late("cam2", event, confident(1))), Answer)
    r = answer.result
    assert (r.event, r.exit, r.label, r.late) == (event, "local", 1, True) and r.late_s == pytest.approx(30.0)
    assert acked(logic) == [event] and logic.snapshot().late == 1
    assert b'"late": true' in r.to_json()


def test_a_replay_of_an_answered_event_is_acked_again_and_not_answered():
    logic, clock = gateway()
    event = round(clock.time() * RATE)
    for d in SENSORS:
        logic.on_scores(scores(d, event, confident(0)))
    logic.take_acks()
    assert logic.on_late(late("cam1", event, confident(0))) == []
    assert acked(logic) == [event] and logic.snapshot().reacked == 1


def test_a_restarted_gateway_answers_nothing_twice(tmp_path):
    path = tmp_path / "journal.sqlite"
    first, clock = gateway(journal=Journal(path, window_s=3600, max_rows=1000))
    event = round(clock.time() * RATE)
    for d in SENSORS:
        first.on_scores(scores(d, event, confident(0)))
    assert first.journal.unsent()                         # journaled before it was published
    del first                                              # killed before the broker acknowledged it
    clock.advance(0.5)
    again = GatewayLogic(manifest(), ScriptedRunner(logits=UNSURE, edge_feature=np.arange(4, dtype=np.float32)),
                         cell=CELL, gateway="gw0", clock=clock, settings=GatewaySettings(),
                         journal=Journal(path, window_s=3600, max_rows=1000))
    for d in SENSORS:
        again.on_status(status(d))
    assert again.journal.resumed == 1 and len(again.journal.unsent()) == 1
    assert again.on_late(late("cam2", event, confident(2))) == []
    assert again.on_scores(scores("cam1", event, confident(2))) == []   # a live frame the broker held
    assert acked(again) == [event] and again.snapshot().reacked == 2


def test_an_unanswered_forward_is_sent_again_then_answered_from_the_edge_degraded():
    logic, clock = gateway(edge=UNSURE, cloud_deadline_ms=1000, cloud_tries=3)
    event = round(clock.time() * RATE)
    one_phase = np.ones((2, 2, 2), np.float32)
    for d in SENSORS:
        actions = logic.on_scores(scores(d, event, UNSURE, feature=one_phase))
    first = only(actions, Forward)
    clock.advance(1.01)
    assert only(logic.on_timer(clock.monotonic()), Forward).payload == first.payload
    clock.advance(1.5)
    assert logic.on_timer(clock.monotonic()) == []           # the second wait is twice as long
    clock.advance(0.6)
    only(logic.on_timer(clock.monotonic()), Forward)
    clock.advance(4.1)
    answer = only(logic.on_timer(clock.monotonic()), Answer)
    assert (answer.result.exit, answer.result.degraded) == ("edge", True) and "cloud" in answer.result.reason
    stats = logic.snapshot()
    assert (stats.forwarded, stats.reforwarded, stats.cloud_timeouts) == (1, 2, 1)
    cloud = make_result(confident(0), event=event, exit="cloud", classes=logic.manifest.classes, devices=list(SENSORS),
                        captured=event / RATE, model="m1", now=clock.time())
    assert logic.on_cloud_result(Message(TOPICS.cloud_result(CELL), cloud.to_json())) == []   # too late: once only
    assert logic.snapshot().duplicate_answers == 1


def test_two_cloud_answers_to_one_event_make_one_result():
    logic, clock = gateway(edge=UNSURE)
    event = round(clock.time() * RATE)
    for d in SENSORS:
        logic.on_scores(scores(d, event, UNSURE, feature=np.ones((2, 2, 2), np.float32)))
    cloud = make_result(confident(2), event=event, exit="cloud", classes=logic.manifest.classes,
                        devices=list(SENSORS), captured=event / RATE, model="m1", now=clock.time())
    message = Message(TOPICS.cloud_result(CELL), cloud.to_json())
    assert only(logic.on_cloud_result(message), Answer).result.label == 2
    assert logic.on_cloud_result(message) == []


def test_a_cloud_answer_to_an_event_not_waiting_for_one_is_dropped():
    """A restarted gateway (or a forger) gets an answer it never asked for: the event's own
    path (the devices' replay, forwarded again) answers it, once."""
    logic, clock = gateway()
    event = round(clock.time() * RATE) - 20
    cloud = make_result(confident(2), event=event, exit="cloud", classes=logic.manifest.classes,
                        devices=list(SENSORS), captured=event / RATE, model="m1", now=clock.time())
    assert logic.on_cloud_result(Message(TOPICS.cloud_result(CELL), cloud.to_json())) == []
    assert logic.snapshot().duplicate_answers == 1 and logic.take_acks() == []


@pytest.mark.parametrize("offset_s, rule", [(5.0, "time"), (-7200.0, "time")])
def test_a_capture_time_outside_the_clock_bounds_is_refused(offset_s, rule):
    logic, clock = gateway(max_skew_s=2.0, replay_window_s=3600)
    event = round((clock.time() + offset_s) * RATE)
    refused = only(logic.on_late(late("cam0", event, confident(0))), Refuse)
    assert refused.error.rule == rule and logic.assembler.open == {}


def test_a_live_frame_for_a_future_slot_is_refused():
    logic, clock = gateway()
    event = round((clock.time() + 5.0) * RATE)               # 50 slots ahead: the slot still unwraps there
    assert only(logic.on_scores(scores("cam0", event, confident(0))), Refuse).error.rule == "time"


def test_a_lean_gateway_sends_no_acks():
    logic, clock = gateway(delivery="lean")
    event = round(clock.time() * RATE)
    for d in SENSORS:
        logic.on_scores(scores(d, event, confident(0)))
    assert logic.take_acks() == []


def test_the_journal_is_bounded_by_age_and_rows():
    journal = Journal(None, window_s=100.0, max_rows=5)
    for event in range(10):
        r = Result(event=event, label=0, cls="a", confidence=1.0, exit="local", devices=[], captured=float(event),
                   latency_ms=1.0, model="m1")
        journal.record(r, r.to_json())
    assert journal.prune(now=50.0) == 5 and journal.rows == 5 and not journal.has(4) and journal.has(5)
    assert journal.prune(now=107.5) == 3 and journal.rows == 2
    assert [Result.from_json(p).event for p in journal.since(8.0, 10)] == [8, 9]


def test_an_ack_frame_round_trips_and_bad_ones_name_the_rule():
    expect = expect_frames(manifest())
    assert decode_frame(encode_ack_frame(model="m1", events=[9, 7, 7, 8]), "ack", expect).events == (7, 8, 9)
    assert decode_frame(encode_ack_frame(model="m1", events=[7]), "ack", expect).kind == ACK
    with pytest.raises(Exception) as err:
        decode_frame(b"\x93" + bytes([expect.tag]) + b"\x07\x91\x00", "ack", expect)   # offset 0
    assert err.value.rule == "event"


def test_an_event_the_spool_drops_becomes_a_lost_notice_and_the_application_is_told():
    s = spool(max_bytes=2_000, max_age_s=5.0)
    for event in range(3):
        s.put(event, float(event), "m1", b"x" * 900, None, None, now=float(event))
    assert s.stats.dropped_full == 1 and s.stats.notices == 1
    (notice,) = s.due(now=2.1, limit=10)            # offered at once
    assert notice.event == 0 and "full" in notice.reason
    s.expire(now=6.5)                                # event 1 is older than 5 s
    assert s.stats.expired == 1 and s.stats.notices == 2

    logic, clock = gateway()
    event = round(clock.time() * RATE) - 50
    from fogsplit.core.frames import encode_lost_frame
    message = Message(TOPICS.late(CELL, "cam1"), encode_lost_frame(model="m1", event=event, captured=event / RATE,
                                                                   reason="dropped: the device's spool was full"))
    answer = only(logic.on_late(message), Answer)
    r = answer.result
    assert (r.event, r.exit, r.label, r.degraded, r.late) == (event, "lost", -1, True, True)
    assert r.reason.startswith("cam1: dropped") and acked(logic) == [event]
    assert logic.on_late(message) == [] and acked(logic) == [event]      # once only; acked again
    assert logic.snapshot().lost_notices == 1


def test_a_lost_notice_for_an_answered_event_changes_nothing():
    logic, clock = gateway()
    event = round(clock.time() * RATE)
    for d in SENSORS:
        logic.on_scores(scores(d, event, confident(0)))
    logic.take_acks()
    from fogsplit.core.frames import encode_lost_frame
    assert logic.on_late(Message(TOPICS.late(CELL, "cam1"), encode_lost_frame(
        model="m1", event=event, captured=event / RATE, reason="x"))) == []
    assert acked(logic) == [event] and logic.snapshot().lost_notices == 0


def test_a_busy_gateway_holds_the_devices_replays():
    logic, clock = gateway()
    event = round(clock.time() * RATE)
    for d in SENSORS:
        logic.on_scores(scores(d, event, confident(0)))
    (send,) = logic.take_acks(shed=1)                     # the service shed a frame
    frame = decode_frame(send.payload, "ack", logic.expect)
    assert frame.busy and frame.keep == 2 and frame.events == (event,)
    (again,) = logic.take_acks()                         # nothing new answered: busy still said
    assert decode_frame(again.payload, "ack", logic.expect).busy
    s = spool(reoffer_s=2.0)
    s.put(1, 0.0, "m1", b"s", None, None, now=0.0)
    s.ack([99], now=5.0, busy=True)
    assert s.due(now=6.0, limit=10) == []                  # held while the gateway is busy
    assert [h.event for h in s.due(now=7.1, limit=10)] == [1]


def test_a_gateway_behind_the_stream_sheds_stale_frames_and_tells_the_devices_to_thin_it():
    logic, clock = gateway(shed_after_ms=1000, max_skew_s=2.0)
    fresh = round(clock.time() * RATE)
    for d in SENSORS:                                       # the devices' usual age: 0
        logic.on_scores(scores(d, fresh, confident(0)))
    clock.advance(1.6)                                      # the gateway stalled: 1.5 s behind the stream
    keeps = []
    for _ in range(12):                                     # 1.2 s of frames handled 1.5 s after capture
        for d in SENSORS:
            assert logic.on_scores(scores(d, round((clock.time() - 1.5) * RATE), confident(0))) == []
        clock.advance(1 / RATE)
        frames = [decode_frame(a.payload, "ack", logic.expect) for a in logic.take_acks()]
        keeps.append(frames[0].keep if frames and frames[0].busy else 0)
    assert logic.snapshot().shed == 12 * len(SENSORS) and logic.assembler.open == {}
    assert keeps[0] == 0 and keeps[-1] == 2                 # a backlog that lasts: 1 event in 2 live
    for _ in range(15):                                     # caught up: fresh frames for 1.5 s
        for d in SENSORS:
            logic.on_scores(scores(d, round(clock.time() * RATE), confident(0)))
        clock.advance(1 / RATE)
        sends = logic.take_acks()
    assert not decode_frame(sends[-1].payload, "ack", logic.expect).busy    # every event live again
    assert logic.snapshot().admission["raises"] == 1


def test_a_device_clock_that_is_off_is_not_taken_for_a_backlog():
    logic, clock = gateway(shed_after_ms=1000, max_skew_s=2.0)
    for n in range(5):                                      # cam0's clock is 1.6 s behind: its frames look old
        event = round((clock.time() - 1.6) * RATE)
        assert logic.on_scores(scores("cam0", event, confident(0))) == [] and logic.snapshot().shed == 0
        clock.advance(0.1)
    assert not any(decode_frame(s.payload, "ack", logic.expect).busy for s in logic.take_acks())


def test_a_device_asked_to_thin_its_stream_spools_the_rest_and_replays_it_once_the_gateway_caught_up():
    logic, clock = device()
    busy = Message(TOPICS.ack(CELL), encode_ack_frame(model="m1", events=[1], busy=True, keep=3))
    assert logic.on_ack(busy) == []
    first = round(clock.time() * RATE)
    sent = []
    for event in range(first, first + 6):
        sent += [event for _ in logic.on_capture(Capture(event, event / RATE, np.zeros((1, 8, 8), np.float32)))]
        clock.advance(0.1)
    assert sent == [e for e in range(first, first + 6) if e % 3 == 0]
    assert logic.snapshot().held_back == 4 and logic.snapshot().keep == 3 and len(logic.spool) == 6
    clock.advance(2.5)
    logic.on_ack(busy)                                      # still busy: the spool holds its replays
    assert logic.replay() == []
    logic.on_ack(Message(TOPICS.ack(CELL), encode_ack_frame(model="m1", events=sent)))
    clock.advance(3.1)                                      # caught up: the rest comes late, in capture order
    replayed = [decode_frame(a.payload, "late", logic.expect).event for a in logic.replay()]
    assert replayed == [e for e in range(first, first + 6) if e % 3 != 0]
    event = first + 100                                     # and every new event goes live again
    assert len(logic.on_capture(Capture(event, event / RATE, np.zeros((1, 8, 8), np.float32)))) == 1


def test_a_busy_ack_lapses_when_the_gateway_falls_silent():
    logic, clock = device()
    logic.on_ack(Message(TOPICS.ack(CELL), encode_ack_frame(model="m1", events=[1], busy=True, keep=4)))
    clock.advance(2.5)                                      # no ack since: the gateway may be gone
    event = 4 * round(clock.time() * RATE) + 1
    assert len(logic.on_capture(Capture(event, event / RATE, np.zeros((1, 8, 8), np.float32)))) == 1
    assert logic.snapshot().keep == 1


def test_a_lean_device_publishes_every_event_whatever_the_gateway_says():
    logic, clock = device(delivery="lean")
    logic.on_ack(Message(TOPICS.ack(CELL), encode_ack_frame(model="m1", events=[1], busy=True, keep=4)))
    event = 4 * round(clock.time() * RATE) + 1
    assert len(logic.on_capture(Capture(event, event / RATE, np.zeros((1, 8, 8), np.float32)))) == 1


@pytest.mark.parametrize("keep", [0, 65, True, "2", 2.0, -1])
def test_an_ack_with_a_bad_keep_is_refused(keep):
    import msgpack
    expect = expect_frames(manifest())
    with pytest.raises(Exception) as err:
        decode_frame(msgpack.packb([expect.tag, 7, [], keep]), "ack", expect)
    assert err.value.rule == "layout" and "keep" in str(err.value)
    assert decode_frame(encode_ack_frame(model="m1", events=[7], busy=True, keep=64), "ack", expect).keep == 64
