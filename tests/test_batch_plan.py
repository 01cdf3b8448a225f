"""The batcher's split of a length-sorted queue is the cheapest one under its cost model."""

from __future__ import annotations

import itertools
import random

from server.batcher import BatchCost


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
