"""The batch plan on given lengths: the split of a length-sorted queue is the cheapest one under the
cost model, the oldest item always runs next, and under a standing queue no batch is planned to run
longer than the target."""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import replace
from typing import Any

from server.batch_config import OVERHEAD_SHARE, BatcherConfig
from server.batch_plan import PLAN_WINDOW, BatchCost, BatchPlanner, EngineSpeed


def _brute_force(cost: BatchCost, lengths: list[int], max_size: int, max_tokens: int) -> int:
    n = len(lengths)
    best = None
    for mask in range(1 << (n - 1)):  # every set of cut points between neighbours
        cuts = [0, *(i + 1 for i in range(n - 1) if mask >> i & 1), n]
        total = 0
        for a, b in itertools.pairwise(cuts):
            size = b - a
            if size > max_size or (size > 1 and size * lengths[b - 1] > max_tokens):
                break
            total += cost.total(size, lengths[b - 1])
        else:
            best = total if best is None else min(best, total)
    assert best is not None
    return best


def test_plan_is_optimal_and_covers_every_item() -> None:
    rng = random.Random(0)
    for _ in range(300):
        cost = BatchCost(rng.choice([0, 8, 24, 200]))
        lengths = sorted(rng.randint(3, 128) for _ in range(rng.randint(1, 11)))
        max_size, max_tokens = rng.choice([1, 2, 4, 16]), rng.choice([64, 256, 8192])
        groups = cost.plan(lengths, max_size, max_tokens)
        assert groups[0][0] == 0 and groups[-1][1] == len(lengths)
        assert all(a < b and (a2 == b) for (a, b), (a2, _) in itertools.pairwise(groups))
        got = sum(cost.total(b - a, lengths[b - 1]) for a, b in groups)
        assert got == _brute_force(cost, lengths, max_size, max_tokens)


def test_short_queries_are_not_padded_to_long_titles() -> None:
    groups = BatchCost(24).plan([8, 9, 10, 11, 96, 100, 110, 120], 16, 8192)
    assert groups[0] == (0, 4)  # the queries share one run; the long items are split as cost says
    assert BatchCost(10_000).plan([8, 9, 10, 11, 96, 100, 110, 120], 16, 8192) == [(0, 8)]  # GPU-like: fill


def _planner(seconds_per_unit: float | None = None, **config: Any) -> BatchPlanner:
    cfg = replace(BatcherConfig(max_batch_size=16, batch_overhead_tokens=24, max_batch_tokens=8192), **config)
    return BatchPlanner(cfg, EngineSpeed(seconds_per_unit))


def test_the_next_batch_holds_the_oldest_item_with_its_neighbours_in_length() -> None:
    planner = _planner()
    # Arrival order: the oldest is a 10-token query; the queries run together, the titles wait.
    assert planner.next_batch([10, 100, 11, 9, 110, 8], overloaded=False) == [0, 2, 3, 5]
    # The oldest is a long item: it runs with the other long one, not with the short ones.
    assert planner.next_batch([100, 8, 9, 110], overloaded=False) == [0, 3]
    assert planner.next_batch([], overloaded=False) == []


def test_the_oldest_item_runs_next_even_far_beyond_the_plan_window() -> None:
    planner = _planner()
    lengths = [64] + [8] * (PLAN_WINDOW * 2) + [128] * 10
    chosen = planner.next_batch(lengths, overloaded=False)
    assert chosen[0] == 0 and len(chosen) <= 16
    assert all(lengths[i] >= 64 for i in chosen)


def test_the_token_budget_narrows_only_under_a_standing_queue_once_the_engine_is_timed() -> None:
    # 70 ms at 2 ms per unit is 35 units: the 24-unit overhead leaves 11 tokens.
    planner = _planner(0.002, queue_target_ms=70, max_batch_tokens=8192)
    assert planner.token_budget(overloaded=False) == 8192
    assert planner.token_budget(overloaded=True) == 11
    assert _planner(None, queue_target_ms=70).token_budget(overloaded=True) == 8192  # not timed yet
    assert _planner(0.002, queue_target_ms=70, max_batch_tokens=8).token_budget(overloaded=True) == 8
    assert _planner(1.0, queue_target_ms=70).token_budget(overloaded=True) == 1  # never below one token
    # Items of 3 tokens: 3 fit the narrowed budget, all 8 (max_batch_size 8) fit the wide one.
    narrow = _planner(0.002, queue_target_ms=70, max_batch_size=8)
    assert narrow.next_batch([3] * 8, overloaded=True) == [0, 1, 2]
    assert narrow.next_batch([3] * 8, overloaded=False) == list(range(8))


def test_batches_for_counts_the_runs_the_planner_will_make() -> None:
    planner = _planner(0.002, queue_target_ms=70, max_batch_size=8)
    assert planner.batches_for(12, 36, overloaded=False) == 2  # by item count: 8 + 4
    assert planner.batches_for(12, 36, overloaded=True) == 4  # by the 11-token budget


def test_engine_speed_is_smoothed_over_batches() -> None:
    speed = EngineSpeed()
    assert speed.seconds_per_unit is None
    speed.observe(0.01)
    assert speed.seconds_per_unit == 0.01
    speed.observe(0.06)  # one slow batch moves the estimate a fifth of the way
    assert speed.seconds_per_unit is not None and abs(speed.seconds_per_unit - 0.02) < 1e-12


def test_batch_width_follows_cost_short_queries_go_wide() -> None:
    """By cost (`max_batch_tokens` 0): a batch is as wide as keeps the fixed cost under OVERHEAD_SHARE of
    the run: with 24 tokens of fixed cost, 276 padded tokens. 8-token queries run 34 at a time, 34-token
    pairs 8 (the old fixed cap), 128-token items 2; `max_batch_size` still caps."""
    config = BatcherConfig(batch_overhead_tokens=24).for_device(on_gpu=False)
    assert config.max_batch_tokens == math.ceil(24 * (1 - OVERHEAD_SHARE) / OVERHEAD_SHARE) == 276
    planner = BatchPlanner(config, EngineSpeed())
    assert [len(planner.next_batch([n] * 80, overloaded=False)) for n in (8, 34, 128)] == [34, 8, 2]
    capped = BatchPlanner(replace(config, max_batch_size=16), EngineSpeed())
    assert len(capped.next_batch([8] * 80, overloaded=False)) == 16
    # A measured fixed cost stands in for the device's when none is set; a set one wins.
    assert BatcherConfig().for_device(on_gpu=False, measured_overhead=40).batch_overhead_tokens == 40
    assert BatcherConfig(batch_overhead_tokens=12).for_device(False, measured_overhead=40).batch_overhead_tokens == 12
