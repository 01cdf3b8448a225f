"""Admission under a standing queue: a burst may queue up to the hard bound, sustained overload is held
at the target, and the service admits freely again once the overload is over.

The scenarios run the real batcher on a stand-in engine whose every batch takes exactly `RUN_S`, so
the schedule (and what a queue of n items costs) is known. The detector alone (`StandingQueue`) is
driven with numbers at the end.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import numpy as np
import pytest

from model_format.features import EncodedRequest
from server.admission import QueueFull
from server.batch_plan import EngineSpeed
from server.batcher import Batcher, BatcherConfig
from server.standing_queue import ENTRY_WINDOWS, ArrivalWindow, StandingQueue

RUN_S = 0.05  # one item per batch: 20 items/s
ITEM = EncodedRequest(input_ids=(1, 5, 2), token_type_ids=(0, 0, 0), site_id=0, ner_ids=(), industry_id=0)
CONFIG = BatcherConfig(max_batch_size=1, max_queue_delay_ms=0, max_queue_wait_ms=10_000,
                       queue_target_ms=100, standing_wait_ms=100, queue_interval_ms=300)


def engine(inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, float]:
    time.sleep(RUN_S)
    return np.zeros((inputs["input_ids"].shape[0], 2), np.float32), RUN_S


async def _one(batcher: Batcher, outcomes: list[tuple[float, float | None, str]]) -> None:
    sent = time.monotonic()
    try:
        await batcher.submit([ITEM])[0]
        outcomes.append((sent, time.monotonic() - sent, "ok"))
    except QueueFull as exc:
        outcomes.append((sent, None, str(exc)))


async def _flood(batcher: Batcher, rate: float, seconds: float) -> list[tuple[float, float | None, str]]:
    outcomes: list[tuple[float, float | None, str]] = []
    tasks = []
    for _ in range(int(rate * seconds)):
        tasks.append(asyncio.create_task(_one(batcher, outcomes)))
        await asyncio.sleep(1.0 / rate)
    await asyncio.gather(*tasks)
    return outcomes


def test_a_burst_queues_and_sustained_overload_is_held_at_the_target() -> None:
    async def scenario() -> None:
        batcher = Batcher(engine, CONFIG, lanes=1)
        batcher.start()
        await batcher.submit([ITEM])[0]  # one timed batch: the work estimate is known from here on

        # A burst of 8 (400 ms of work, 4x the target): all queued, none refused.
        burst: list[tuple[float, float | None, str]] = []
        await asyncio.gather(*(_one(batcher, burst) for _ in range(8)))
        assert [o[2] for o in burst] == ["ok"] * 8

        # 50/s against 20/s for 2.5 s: a standing queue. Once it is recognised, arrivals are refused
        # while the queue holds more than the target, so what is admitted late waits about the target.
        flood = await _flood(batcher, rate=50, seconds=2.5)
        refused = [o for o in flood if o[1] is None]
        assert refused, "a standing queue at 2.5x capacity refused nothing"
        assert all(o[2].startswith("overloaded:") for o in refused), refused[0][2]
        start = flood[0][0]
        late = [o[1] for o in flood if o[1] is not None and o[0] - start > 1.5]
        assert late and max(late) < 0.45, f"admitted late in the flood waited up to {max(late or [0]):.2f} s"
        # (without the target, those would have waited ~1.5 s and more: the queue grows 30 items/s)

        # Load gone: after the queue drains, a burst is admitted again in full.
        await asyncio.sleep(1.0)
        after: list[tuple[float, float | None, str]] = []
        await asyncio.gather(*(_one(batcher, after) for _ in range(6)))
        assert [o[2] for o in after] == ["ok"] * 6
        await batcher.close()

    asyncio.run(scenario())


def test_under_a_standing_queue_no_batch_is_planned_to_run_longer_than_the_target() -> None:
    """On one CPU thread a full batch runs for hundreds of ms: a call admitted at the target would
    then run for longer than it waited. Under a standing queue the batcher sizes batches to run
    within the target; a burst (no standing queue) still gets batches as wide as max_batch_size."""
    per_unit_s = 0.002  # engine time per cost unit: overhead 24 + 3 tokens per item
    runs: list[tuple[int, bool]] = []  # batch size, whether a standing queue was recognised
    batchers: list[Batcher] = []

    def timed_engine(inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, float]:
        b, seq = inputs["input_ids"].shape
        runs.append((b, batchers[0].overloaded))
        elapsed = (24 + b * seq) * per_unit_s
        time.sleep(elapsed)
        return np.zeros((b, 2), np.float32), elapsed

    # 70 ms at 2 ms per unit is 35 units: the 24-unit overhead leaves 11 tokens, 3 items of 3 tokens.
    config = BatcherConfig(max_batch_size=8, max_queue_delay_ms=0, max_queue_wait_ms=10_000,
                           queue_target_ms=70, queue_interval_ms=200, batch_overhead_tokens=24)

    async def scenario() -> None:
        batcher = Batcher(timed_engine, config, lanes=1)
        batchers.append(batcher)
        batcher.start()
        await batcher.submit([ITEM])[0]  # timed: 27 units in 54 ms
        await asyncio.gather(*batcher.submit([ITEM] * 12))
        assert [size for size, _ in runs[1:]] == [8, 4], "a burst is batched as wide as max_batch_size"
        runs.clear()
        # ~150/s against at most ~83/s (batches of 8, 96 ms each): waits pass the default 200 ms
        # standing_wait_ms within about 0.3 s, and the queue counts as standing 200 ms later.
        flood = await _flood(batcher, rate=150, seconds=1.5)
        assert any(o[1] is None for o in flood), "the flood was never held at the target"
        await batcher.close()

    asyncio.run(scenario())
    held = [size for size, overloaded in runs if overloaded]
    assert len(held) >= 5, runs
    # The first one may have been planned just before the queue counted as standing.
    assert max(held[1:]) <= 3, runs


def test_with_time_bounds_off_no_standing_queue_is_declared() -> None:
    """`--max-queue-wait-ms 0` leaves only the item bound: a flood queues, nothing is refused, and
    the standing-queue rule never switches on (so it never narrows batches either)."""
    config = replace(CONFIG, max_batch_size=4, max_queue_wait_ms=0)
    batchers: list[Batcher] = []
    runs: list[tuple[int, bool]] = []  # batch size, standing queue declared

    def watched_engine(inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, float]:
        runs.append((inputs["input_ids"].shape[0], batchers[0].overloaded))
        return engine(inputs)

    async def scenario() -> list[tuple[float, float | None, str]]:
        batcher = Batcher(watched_engine, config, lanes=1)
        batchers.append(batcher)
        batcher.start()
        flood = await _flood(batcher, rate=120, seconds=1.5)  # 1.5x what batches of 4 every 50 ms serve
        await batcher.close()
        return flood

    flood = asyncio.run(scenario())
    assert all(o[2] == "ok" for o in flood), [o[2] for o in flood if o[2] != "ok"][:1]
    assert not any(standing for _, standing in runs), runs
    assert max(size for size, _ in runs) == 4, runs


def test_after_a_slow_spell_the_rule_lets_go_once_full_batches_keep_up() -> None:
    """A noisy neighbour slows the engine 2.5x for 0.7 s under 80% load: a real, short overload, and
    refusals are right then. Once the engine is back, full batches serve the load again, but the
    hold's narrower batches (three items, 91/s on two lanes) do not, and the hold refuses now and
    then: quiet time alone never ended it. The offered load measured against full batches does."""
    per_unit_s = 0.002
    runs: list[tuple[float, bool]] = []  # start (s into the flood), standing queue declared
    batchers: list[Batcher] = []
    started = [0.0]
    spell = (0.3, 1.0)

    def noisy_engine(inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, float]:
        b, seq = inputs["input_ids"].shape
        t = time.monotonic() - started[0]
        runs.append((t, batchers[0].overloaded))
        elapsed = (24 + b * seq) * per_unit_s * (2.5 if spell[0] < t < spell[1] else 1.0)
        time.sleep(elapsed)
        return np.zeros((b, 2), np.float32), elapsed

    # Full batches: 8 items in (24 + 24) x 2 ms = 96 ms, 83/s per lane; 133/s offered is 80% of
    # two lanes' worth.
    config = BatcherConfig(max_batch_size=8, max_queue_delay_ms=0, max_queue_wait_ms=10_000,
                           queue_target_ms=70, standing_wait_ms=100, queue_interval_ms=300,
                           batch_overhead_tokens=24)

    async def scenario() -> list[tuple[float, float | None, str]]:
        batcher = Batcher(noisy_engine, config, lanes=2)
        batchers.append(batcher)
        batcher.start()
        await batcher.submit([ITEM])[0]
        started[0] = time.monotonic()
        flood = await _flood(batcher, rate=133, seconds=3.5)
        await batcher.close()
        return flood

    flood = asyncio.run(scenario())
    refused = [o[0] - started[0] for o in flood if o[1] is None]
    assert refused, "the slow spell never counted as an overload"
    # Within two intervals of the spell's end the offered load (against full batches) is under 1.
    assert max(refused) < spell[1] + 0.6, f"still refusing {max(refused):.2f} s into the flood"
    assert not any(overloaded for t, overloaded in runs if t > spell[1] + 0.9), runs


def test_a_zero_interval_switches_the_standing_queue_rule_off() -> None:
    """`--queue-interval-ms 0` leaves no window to measure the offered load over: the rule never
    switches on, and the hard bound (`max_queue_wait_ms`) is all that refuses."""
    config = replace(CONFIG, queue_interval_ms=0, max_queue_wait_ms=600)

    async def scenario() -> tuple[list[tuple[float, float | None, str]], bool]:
        batcher = Batcher(engine, config, lanes=1)
        batcher.start()
        await batcher.submit([ITEM])[0]
        flood = await _flood(batcher, rate=50, seconds=1.5)  # 2.5x capacity
        overloaded = batcher.overloaded
        await batcher.close()
        return flood, overloaded

    flood, overloaded = asyncio.run(scenario())
    refused = [o[2] for o in flood if o[1] is None]
    assert refused and not overloaded
    assert all("max_queue_wait_ms" in why for why in refused), refused[:1]


# --- the detector alone, driven with numbers -------------------------------------------------------

DETECTOR = BatcherConfig(max_batch_size=8, batch_overhead_tokens=24, queue_interval_ms=1000, standing_wait_ms=100)


def _detector(config: BatcherConfig = DETECTOR, seconds_per_unit: float | None = 0.01) -> StandingQueue:
    """100 units a second on one lane once timed."""
    return StandingQueue(config, EngineSpeed(seconds_per_unit), lanes=1)


def _grown(now: float) -> int:
    """Queued units of a queue growing by 100 units (1 s of work) a second."""
    return int(now * 100)


def _arrive(standing: StandingQueue, units_per_second: list[float], first: int = 0) -> None:
    for second, units in enumerate(units_per_second, start=first):
        standing.arrive(float(second), units)


def test_one_busy_interval_does_not_make_an_overload_but_three_do() -> None:
    """Near capacity one interval of Poisson arrivals often reads over 1: with long waits standing,
    entry still needs the average of the last ENTRY_WINDOWS whole intervals over 1, while the
    metric (and the exit) read the last one."""
    standing = _detector()
    _arrive(standing, [80.0, 80.0, 130.0])  # one busy interval after two calm ones
    standing.batch_left(0.3, 1.5, caught_up=False, queued=_grown(1.5))  # batches have waited 300 ms since 1.5 s
    # ... for an interval: standing, the busy interval just closed
    standing.batch_left(0.3, 3.0, caught_up=False, queued=_grown(3.0))
    assert standing.offered_load(3.0) == pytest.approx(1.3)
    assert standing.offered_load(3.0, ENTRY_WINDOWS) == pytest.approx(290 / 300)
    assert not standing.overloaded, "one busy interval declared an overload"
    _arrive(standing, [130.0, 130.0, 130.0], first=3)
    standing.batch_left(0.3, 6.0, caught_up=False, queued=_grown(6.0))  # three busy intervals
    assert standing.overloaded, "three busy intervals with a standing queue declared none"


def test_short_waits_or_a_caught_up_engine_void_the_evidence() -> None:
    for wait, caught_up in [(0.05, False), (0.3, True)]:
        standing = _detector()
        _arrive(standing, [200.0, 200.0, 200.0])
        standing.batch_left(0.3, 1.5, caught_up=False, queued=_grown(1.5))
        standing.batch_left(wait, 2.0, caught_up=caught_up, queued=_grown(2.0))  # resets: the interval starts again
        standing.batch_left(0.3, 2.6, caught_up=False, queued=_grown(2.6))
        standing.batch_left(0.3, 3.0, caught_up=False, queued=_grown(3.0))
        assert not standing.overloaded, (wait, caught_up)
        standing.batch_left(0.3, 3.6, caught_up=False, queued=_grown(3.6))  # an interval since 2.6
        assert standing.overloaded, (wait, caught_up)


def test_no_overload_without_a_timed_engine_time_bounds_or_an_interval() -> None:
    for config, timed in [(DETECTOR, False), (replace(DETECTOR, max_queue_wait_ms=0), True),
                          (replace(DETECTOR, queue_interval_ms=0), True)]:
        standing = _detector(config, 0.01 if timed else None)
        _arrive(standing, [500.0] * 4)
        for now in (1.0, 2.0, 3.0, 4.0):
            standing.batch_left(1.0, now, caught_up=False)
        assert not standing.overloaded, config
        assert standing.offered_load(4.0) == (5.0 if timed and config.queue_interval_ms else 0.0)


def test_the_overload_ends_after_a_quiet_interval_or_once_arrivals_fit() -> None:
    # Quiet: refusals stop. The offered load stays high, so only the quiet interval can end it.
    standing = _detector()
    _arrive(standing, [200.0] * 4)
    standing.batch_left(0.3, 2.0, caught_up=False, queued=_grown(2.0))
    standing.batch_left(0.3, 3.0, caught_up=False, queued=_grown(3.0))
    assert standing.overloaded
    standing.arrive(3.5, 200.0)
    standing.turned_away(3.5, 10.0, by_hold=True)
    standing.end_if_quiet(4.4)
    assert standing.overloaded
    standing.end_if_quiet(4.6)  # nothing refused since 3.5
    assert not standing.overloaded
    # Arrivals fit: refusals go on, but the last whole interval offered less than the lanes run.
    standing = _detector()
    _arrive(standing, [200.0] * 4)
    standing.batch_left(0.3, 2.0, caught_up=False, queued=_grown(2.0))
    standing.batch_left(0.3, 3.0, caught_up=False, queued=_grown(3.0))
    standing.arrive(4.0, 50.0)  # the interval from 3 s: 200 units, still over
    standing.turned_away(4.0, 0.0, by_hold=True)
    standing.end_if_quiet(4.05)
    assert standing.overloaded
    standing.arrive(5.0, 10.0)  # the interval from 4 s: 50 units, half of what the lane runs
    standing.turned_away(5.0, 0.0, by_hold=True)
    standing.end_if_quiet(5.05)
    assert not standing.overloaded


def test_the_arrival_window_counts_quiet_intervals_as_empty() -> None:
    window = ArrivalWindow()
    window.add(0.0, 1.0, 10.0)
    window.add(0.5, 1.0, 5.0)
    assert window.last(0.9, 1.0) == (0.0, 0.0)  # no whole window yet
    assert window.last(1.2, 1.0) == (15.0, 1.2)  # the open one, closed by time
    assert window.last(3.5, 1.0, ENTRY_WINDOWS) == (15.0, 3.0)  # two quiet intervals since
    window.add(3.5, 1.0, 7.0)
    assert window.last(3.6, 1.0, ENTRY_WINDOWS) == (15.0, 3.0)


async def _closed_loop(batcher: Batcher, clients: int, seconds: float) -> tuple[int, int]:
    """`clients` callers, each sending its next item as soon as the last one is answered or refused
    (as `python -m loadtest --concurrency` does): (answered, refused)."""
    counts = [0, 0]
    end = time.monotonic() + seconds

    async def client() -> None:
        while time.monotonic() < end:
            try:
                await batcher.submit([ITEM])[0]
                counts[0] += 1
            except QueueFull:
                counts[1] += 1
                await asyncio.sleep(0)  # straight back, as a real client's next call would be

    await asyncio.gather(*(client() for _ in range(clients)))
    return counts[0], counts[1]


@pytest.mark.parametrize("lanes", [1, 2])
def test_a_closed_loop_whose_queue_fits_the_bound_is_never_refused(lanes: int) -> None:
    """12 callers with one call each in flight hold a queue of up to 12 items (600 ms of work on one
    lane): it stands, batches wait far over `standing_wait_ms`, the engine runs flat out, yet the
    queue cannot grow past 12 items, well under `max_queue_wait_ms`. Refusing would not lower the
    load (the refused call comes straight back), only spend CPU on refusals: nothing is refused."""
    async def scenario() -> tuple[int, int]:
        batcher = Batcher(engine, CONFIG, lanes=lanes)
        batcher.start()
        await batcher.submit([ITEM])[0]
        counts = await _closed_loop(batcher, clients=12, seconds=3.0)
        await batcher.close()
        return counts

    answered, refused = asyncio.run(scenario())
    assert refused == 0, f"{refused} refusals against {answered} answers"
    assert answered >= 3.0 / RUN_S * lanes * 0.8  # and the engine ran flat out


def test_a_standing_queue_that_does_not_grow_is_not_an_overload() -> None:
    """A fixed population of callers (a closed loop) keeps the queue standing but no longer: waits
    stay long and the engine is saturated, yet refusing would not lower the load."""
    standing = _detector()
    _arrive(standing, [110.0] * 4)
    for now in (1.0, 1.5, 2.0, 2.5, 3.0, 3.5):
        standing.batch_left(0.5, now, caught_up=False, queued=300 + (10 if now % 1 else 0), batch=10)
    assert not standing.overloaded
    standing.batch_left(0.5, 4.0, caught_up=False, queued=300 + 8 + 10 + 1, batch=10)  # target + a batch
    assert standing.overloaded


def test_a_refusal_that_comes_straight_back_is_not_offered_load_again() -> None:
    standing = _detector()
    for k in range(100):  # a caller refused and back every millisecond: one call's worth of work
        standing.turned_away(0.5 + k * 0.001, 10.0, by_hold=False)
    for k in range(10):  # ten callers refused 50 ms apart: ten calls
        standing.turned_away(0.7 + k * 0.05, 10.0, by_hold=False)
    assert standing.offered_load(1.5) == pytest.approx(110 * 0.01)


def test_a_steady_open_loop_below_capacity_is_never_refused() -> None:
    """Poisson arrivals at 90% of what full batches run, for 6 s, with the production rule's windows:
    queues come and go (waits pass `standing_wait_ms` now and then), none of it is an overload."""
    per_unit_s = 0.00025  # a batch of 8 items of 3 tokens: (24 + 24) units, 12 ms: 667 items/s
    config = BatcherConfig(max_batch_size=8, max_queue_delay_ms=2, max_queue_wait_ms=1000, queue_target_ms=20,
                           standing_wait_ms=30, queue_interval_ms=500, batch_overhead_tokens=24)

    def timed_engine(inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, float]:
        b, seq = inputs["input_ids"].shape
        elapsed = (24 + b * seq) * per_unit_s
        time.sleep(elapsed)
        return np.zeros((b, 2), np.float32), elapsed

    async def scenario() -> list[tuple[float, float | None, str]]:
        batcher = Batcher(timed_engine, config, lanes=1)
        batcher.start()
        await asyncio.gather(*batcher.submit([ITEM] * 8))
        rng = np.random.default_rng(3)
        outcomes: list[tuple[float, float | None, str]] = []
        tasks = []
        end = time.monotonic() + 6.0
        while time.monotonic() < end:
            tasks.append(asyncio.create_task(_one(batcher, outcomes)))
            await asyncio.sleep(rng.exponential(1.0 / (0.9 * 667)))
        await asyncio.gather(*tasks)
        await batcher.close()
        return outcomes

    outcomes = asyncio.run(scenario())
    refused = [o[2] for o in outcomes if o[1] is None]
    assert not refused, f"{len(refused)} of {len(outcomes)} refused, e.g. {refused[0]}"
