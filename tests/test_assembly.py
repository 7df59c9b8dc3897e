import numpy as np
import pytest

from fogsplit.core.assembly import Assembler
from fogsplit.core.exits import entropy_exit, normalized_entropy
from fogsplit.core.fusion import fuse

SENSORS = ["a", "b", "c"]
V = np.zeros(2)


def test_event_is_ready_when_every_online_device_reported():
    asm = Assembler(SENSORS, deadline_s=0.1)
    assert asm.add(1, "a", V, captured=10.0, now=0.0) is None
    assert asm.add(1, "b", V, captured=9.5, now=0.01) is None
    ev = asm.add(1, "c", V, captured=10.2, now=0.02)
    assert ev is not None and ev.devices == SENSORS and ev.captured == 9.5


def test_offline_device_is_not_waited_for():
    asm = Assembler(SENSORS, deadline_s=0.1)
    asm.online.discard("c")
    asm.add(1, "a", V, 0.0, 0.0)
    assert asm.add(1, "b", V, 0.0, 0.0) is not None


def test_silent_device_delays_the_event_until_its_deadline_only():
    asm = Assembler(SENSORS, deadline_s=0.1)
    asm.add(1, "a", V, 0.0, now=0.0)
    asm.add(1, "b", V, 0.0, now=0.05)
    assert asm.expired(0.09) == []
    assert asm.next_deadline() == pytest.approx(0.1)
    assert [e.event for e in asm.expired(0.1)] == [1]


def test_duplicate_and_late_frames_change_nothing():
    asm = Assembler(SENSORS, deadline_s=0.1)
    asm.add(1, "a", np.ones(2), 0.0, 0.0)
    assert asm.add(1, "a", np.zeros(2), 0.0, 0.0) is None
    assert asm.open[1].parts["a"][0] == 1
    asm.finish(1)
    assert asm.add(1, "b", V, 0.0, 0.2) is None and 1 not in asm.open and asm.is_finished(1)


def test_open_events_are_bounded():
    asm = Assembler(SENSORS, deadline_s=10.0, max_open=2)
    for e in range(3):
        asm.add(e, "a", V, 0.0, now=float(e))
    assert [ev.event for ev in asm.expired(2.0)] == [0]


def test_fusion_semantics_with_a_missing_device():
    parts = {"a": np.array([1.0, 5.0]), "c": np.array([3.0, 1.0])}
    assert np.array_equal(fuse(parts, SENSORS, "max"), [3.0, 5.0])
    assert np.array_equal(fuse(parts, SENSORS, "mean"), [2.0, 3.0])
    assert np.array_equal(fuse(parts, SENSORS, "concat"), [1.0, 5.0, 0.0, 0.0, 3.0, 1.0])
    with pytest.raises(ValueError):
        fuse({}, SENSORS, "max")
    with pytest.raises(ValueError):
        fuse(parts, SENSORS, "median")


def test_normalized_entropy_bounds_and_exit():
    assert normalized_entropy(np.zeros(4)) == pytest.approx(1.0)
    assert normalized_entropy(np.array([100.0, 0, 0, 0])) == pytest.approx(0.0, abs=1e-6)
    assert entropy_exit(np.array([10.0, 0.0, 0.0]), 0.1)
    assert not entropy_exit(np.array([1.0, 0.9, 0.8]), 0.5)
    assert not entropy_exit(np.array([100.0, 0.0]), 0.0)
