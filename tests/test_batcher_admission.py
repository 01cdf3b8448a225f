"""The admission rules, driven directly with numbers: queue sizes, tokens, an engine speed and the
event-loop clock are given, no queue or engine runs.

Numbers used throughout: batches of at most 8 items, 24 units of fixed cost per run, an engine at
2 ms per unit on one lane, so 8 queued items of 3 tokens cost (24 + 24) x 2 ms = 96 ms.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from server.admission import Admission, QueueFull, admission_for
from server.batch_config import BatcherConfig

CONFIG = BatcherConfig(max_batch_size=8, batch_overhead_tokens=24, max_queue_size=16, max_queue_wait_ms=200,
                       queue_target_ms=60, standing_wait_ms=100, queue_interval_ms=1000)
PER_UNIT = 0.002


def _admission(config: BatcherConfig = CONFIG, lanes: int = 1, timed: bool = True) -> Admission:
    admission = admission_for(config, lanes)
    if timed:
        admission.speed.observe(PER_UNIT)
    return admission


def _refusal(admission: Admission, queued: int, items: int, now: float = 10.0, deadline: float | None = None,
             item_tokens: int = 3) -> str:
    """The refusal message, or "" when admitted."""
    try:
        admission.admit(queued, queued * item_tokens, items, items * item_tokens, now, deadline)
    except QueueFull as exc:
        return str(exc)
    return ""


def _overload(admission: Admission) -> None:
    """A standing queue, through the detector's own inputs: three intervals of arrivals over what the
    lane runs (1000 units x 2 ms = 2 s of work a second), and batches that waited 300 ms for an
    interval."""
    standing = admission.standing
    for second in (0.0, 1.0, 2.0):
        standing.arrive(second, 1000.0)
    standing.batch_left(0.3, 2.5, caught_up=False, queued=0)
    standing.batch_left(0.3, 3.5, caught_up=False, queued=100)  # the queue grew by 200 ms of work
    assert standing.overloaded


def test_the_item_bound_refuses_first_and_the_refused_items_are_not_counted_as_offered() -> None:
    admission = _admission()
    assert "queue holds 15 of 16 items; 2 more do not fit" in _refusal(admission, queued=15, items=2)
    assert admission.standing.arrivals.units == 0.0
    assert _refusal(admission, queued=14, items=2) == ""  # 16 items: two runs, 192 ms
    assert admission.standing.arrivals.units > 0.0


def test_an_empty_queue_always_admits_and_an_untimed_engine_meets_only_the_item_bound() -> None:
    admission = _admission(replace(CONFIG, max_queue_size=1024))
    assert _refusal(admission, queued=0, items=500) == ""  # far over max_queue_wait_ms, but nothing queued
    untimed = _admission(replace(CONFIG, max_queue_size=1024), timed=False)
    assert untimed.work_seconds(500, 1500, 0.0) is None
    assert _refusal(untimed, queued=400, items=100, deadline=10.0) == ""


def test_the_work_bound_counts_queued_batches_and_what_is_left_of_the_running_ones() -> None:
    admission = _admission()
    # 8 queued + 1: two runs, (27 + 2 x 24) units = 150 ms, under the 200 ms bound.
    assert admission.work_seconds(9, 27, 10.0) == pytest.approx(0.150)
    assert _refusal(admission, queued=8, items=1) == ""
    # A batch of 40 units started 40 ms ago has 40 ms left: 190 ms in all, still under the bound.
    admission.started(batch=1, now=9.96, units=40)
    assert admission.work_seconds(9, 27, 10.0) == pytest.approx(0.190)
    assert _refusal(admission, queued=8, items=1) == ""
    admission.started(batch=2, now=10.0, units=15)  # 30 ms more
    message = _refusal(admission, queued=8, items=1)
    assert "~220 ms of engine work with these items, over max_queue_wait_ms 200" in message, message
    admission.finished(1)
    admission.finished(2)
    assert _refusal(admission, queued=8, items=1) == ""


def test_lanes_share_the_queued_work() -> None:
    one, two = _admission(lanes=1), _admission(lanes=2)
    alone, shared = one.work_seconds(16, 96, 0.0), two.work_seconds(16, 96, 0.0)
    assert alone == pytest.approx(0.288) and shared == pytest.approx(0.144)  # (96 + 2 x 24) x 2 ms
    assert _refusal(one, queued=15, items=1, item_tokens=6) != ""
    assert _refusal(two, queued=15, items=1, item_tokens=6) == ""


def test_a_call_that_would_expire_in_the_queue_is_refused_at_once() -> None:
    admission = _admission()
    message = _refusal(admission, queued=8, items=1, now=10.0, deadline=10.1)  # 150 ms of work, 100 ms left
    assert "the call's deadline leaves 100 ms" in message, message
    assert _refusal(admission, queued=8, items=1, now=10.0, deadline=10.2) == ""
    # With time bounds off (max_queue_wait_ms 0) only the item bound refuses.
    assert _refusal(_admission(replace(CONFIG, max_queue_wait_ms=0)), queued=8, items=1, deadline=10.001) == ""


def test_under_a_standing_queue_the_target_refuses_and_the_hold_ends_once_quiet() -> None:
    admission = _admission()
    wide = admission.work_seconds(12, 36, 3.0)
    _overload(admission)
    # Narrowed batches: the 60 ms target leaves 30 - 24 = 6 tokens, 2 items a run, and the estimate
    # counts the fixed cost of each of those runs: 12 items of 3 tokens are 6 runs, not 2.
    assert admission.planner.token_budget(admission.standing.overloaded) == 6
    assert wide == pytest.approx((36 + 2 * 24) * PER_UNIT)
    assert admission.work_seconds(12, 36, 3.0) == pytest.approx((36 + 6 * 24) * PER_UNIT)
    assert _refusal(admission, queued=0, items=1, now=3.6) == ""  # an empty queue still admits
    assert _refusal(admission, queued=1, items=1, now=3.6) == ""  # 1 run: (6 + 24) x 2 ms = 60 ms
    message = _refusal(admission, queued=2, items=1, now=3.6)  # 2 runs: 114 ms
    assert message.startswith("overloaded: batches have waited over 100 ms for 1000 ms on end"), message
    assert "over the 60 ms target" in message
    # Refusing keeps the hold; an interval without a refusal ends it and the same call is admitted.
    assert _refusal(admission, queued=2, items=1, now=4.5).startswith("overloaded:")
    assert admission.standing.overloaded
    assert _refusal(admission, queued=2, items=1, now=5.6) == ""
    assert not admission.standing.overloaded


def test_refused_calls_count_as_offered_load_unless_they_come_straight_back() -> None:
    admission = _admission()
    for second in range(3):
        # Each call is refused by the work bound, yet its units arrive: 30 tokens and its share of a
        # run's fixed cost at full batches (24 / 8), 33 units a call.
        for k in range(100):
            assert _refusal(admission, queued=15, items=1, now=second + k * 0.005, item_tokens=30) != ""
    # 100 x (30 + 24 / 8) units x 2 ms over each 1 s window.
    assert admission.standing.offered_load(3.0) == pytest.approx(100 * 33 * PER_UNIT)
    for k in range(100):  # refused and straight back, every 0.5 ms: one call's worth
        assert _refusal(admission, queued=15, items=1, now=3.0 + k * 0.0005, item_tokens=30) != ""
    assert admission.standing.offered_load(4.0) == pytest.approx(33 * PER_UNIT)
