"""The gateway's overload control as a plain object (gateway/admission.py): lag in, ``keep`` out."""
from __future__ import annotations

import pytest

from fogsplit.core.frames import MAX_KEEP
from fogsplit.gateway.admission import BASELINE_S, CALM_S, REACT_S, Admission


def periods(adm: Admission, now: float, count: int, *, age: float, frames: int = 20, step: float = 0.05,
            device: str = "cam0") -> tuple[list[int], float]:
    keeps = []
    for _ in range(count):
        for _ in range(frames):
            adm.lag(device, age, now)
        now += step
        keeps.append(adm.update(now))
    return keeps, now


def test_a_gateway_that_keeps_up_takes_every_event_and_is_not_busy():
    adm = Admission(target_s=0.25, now=0.0)
    keeps, _ = periods(adm, 0.0, 40, age=0.01)
    assert set(keeps) == {1} and not adm.busy and adm.stats.busy_s == 0


def test_behind_the_stream_keep_doubles_once_per_reaction_time_up_to_its_bound():
    adm = Admission(target_s=0.25, now=0.0)
    _, now = periods(adm, 0.0, 40, age=0.01)               # two seconds at the usual age
    keeps, now = periods(adm, now, int(REACT_S / 0.05) * 4, age=1.0)
    assert keeps[0] == 1 and adm.busy                      # a backlog lasts: REACT_S before the first step
    assert sorted(set(keeps)) == [1, 2, 4, 8] and keeps == sorted(keeps)     # then one doubling per REACT_S
    keeps, _ = periods(adm, now, 200, age=1.0)
    assert keeps[-1] == MAX_KEEP and adm.stats.thinned_s > 0


def test_while_the_backlog_drains_keep_holds():
    adm = Admission(target_s=0.25, now=0.0)
    _, now = periods(adm, 0.0, 40, age=0.01)
    keeps, now = periods(adm, now, int(REACT_S / 0.05) + 2, age=1.0)
    assert keeps[-1] == 2
    for n in range(40):                                    # the lag falls: the doubling did its job
        keeps, now = periods(adm, now, 1, age=0.95 - 0.02 * n)
        assert keeps == [2]


def test_a_lag_burst_shorter_than_the_reaction_time_changes_nothing():
    adm = Admission(target_s=0.25, now=0.0)
    _, now = periods(adm, 0.0, 40, age=0.01)
    keeps, now = periods(adm, now, int(REACT_S / 0.05) - 2, age=0.6)
    keeps2, _ = periods(adm, now, 40, age=0.01)
    assert set(keeps + keeps2) == {1}


def test_caught_up_keep_falls_by_a_quarter_per_calm_period_back_to_one():
    adm = Admission(target_s=0.25, now=0.0)
    _, now = periods(adm, 0.0, 40, age=0.01)
    _, now = periods(adm, now, 60, age=1.0)
    top = adm.keep
    assert top > 4
    keeps, _ = periods(adm, now, int(30 * CALM_S / 0.05), age=0.01)
    falls = [k for a, k in zip([top] + keeps, keeps) if k != a]
    assert all(k == a - max(1, a // 4) for a, k in zip([top] + falls, falls))
    assert keeps[-1] == 1 and not adm.busy


def test_a_shed_frame_makes_the_gateway_busy():
    adm = Admission(target_s=0.25, now=0.0)
    adm.shed(3)
    assert adm.update(0.05) == 2 and adm.busy


def test_a_few_slow_frames_are_not_a_backlog():
    adm = Admission(target_s=0.25, now=0.0)
    now = 0.0
    for _ in range(40):
        for n in range(100):
            adm.lag("cam0", 1.0 if n % 3 == 0 else 0.01, now)     # a third of them: not most
        now += 0.05
        assert adm.update(now) == 1 and not adm.busy


def test_a_device_clock_offset_is_learned_and_one_odd_frame_does_not_move_it():
    adm = Admission(target_s=0.25, now=0.0)
    assert adm.lag("cam0", 1.5, 0.0) == 0.0               # 1.5 s of clock offset is not lag
    now = 0.0
    for _ in range(5):                                      # five seconds at the offset ...
        for n in range(10):
            adm.lag("cam0", -1.9 if n == 5 else 1.5, now)   # ... one frame from 1.9 s ahead (forged?)
            now += 0.1
    assert adm.lag("cam0", 1.6, now) == pytest.approx(0.1)  # the median of each second ignores it
    for _ in range(BASELINE_S + 2):                         # the clock was set: a new offset ...
        for _ in range(10):
            adm.lag("cam0", 0.2, now)
            now += 0.1
    assert adm.lag("cam0", 0.3, now) == pytest.approx(0.1)  # ... replaces the old one within BASELINE_S
    assert adm.update(now) == 1 and adm.snapshot()["base_ms"] == {"cam0": 200.0}


def test_a_few_stale_frames_among_fresh_ones_do_not_thin_the_stream():
    adm = Admission(target_s=0.25, now=0.0)
    now = 0.0
    for _ in range(100):                                    # 5 s; one frame in 10 far too old (forged?)
        for n in range(10):
            adm.lag("cam0", 30.0 if n == 0 else 0.01, now)
        now += 0.05
        assert adm.update(now) == 1 and not adm.busy


def test_a_bad_target_is_refused():
    with pytest.raises(ValueError, match="lag target"):
        Admission(target_s=0, now=0.0)


def test_a_gateway_with_no_frames_coming_is_not_behind():
    adm = Admission(target_s=0.25, now=0.0)
    _, now = periods(adm, 0.0, 40, age=0.01)
    keeps, now = periods(adm, now, 12, age=1.0)           # a backlog: keep went up ...
    assert keeps[-1] > 1
    keeps, _ = periods(adm, now, 200, age=0.0, frames=0)    # ... then nothing comes: it falls back
    assert max(keeps[:30]) <= keeps[0] and keeps[-1] == 1 and not adm.busy
