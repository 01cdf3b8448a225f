"""The batch plan: what a batch costs the engine, and which queued items run together next.

Cost model: a padded batch costs `overhead + size x padded_length` units, and the engine's time per unit
is learnt from the batches it runs (`EngineSpeed`). The planner sorts the queue by length, splits it
into the batches of least total cost and runs the one that holds the oldest item: a 10-token query is
not padded to 100 tokens, lengths that are alike share one run, and the oldest item always goes next.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from server.batch_config import MAX_BATCH_TOKENS, BatcherConfig

# The optimal split is computed over at most this many queued items nearest the oldest in length:
# O(window x max_batch_size) Python steps per batch. A queue bounded by `max_queue_wait_ms` rarely
# holds more.
PLAN_WINDOW = 256


@dataclass(frozen=True, slots=True)
class BatchCost:
    """Engine time of a padded batch, in token units: `overhead + size x padded_length`.

    On the CPU a padded token costs as much as a real one, and every run has a fixed cost.
    """

    overhead: int

    def total(self, size: int, padded_length: int) -> int:
        return self.overhead + size * padded_length

    def plan(self, lengths: Sequence[int], max_size: int, max_tokens: int) -> list[tuple[int, int]]:
        """Splits ascending `lengths` into contiguous [start, end) groups of least total cost."""
        n = len(lengths)
        best = [0.0] + [math.inf] * n
        cut = [0] * (n + 1)
        for end in range(1, n + 1):
            longest = lengths[end - 1]
            for start in range(end - 1, max(0, end - max_size) - 1, -1):
                size = end - start
                if size > 1 and size * longest > max_tokens:
                    break
                cost = best[start] + self.overhead + size * longest
                if cost < best[end]:
                    best[end], cut[end] = cost, start
        groups = []
        end = n
        while end > 0:
            groups.append((cut[end], end))
            end = cut[end]
        return groups[::-1]


class EngineSpeed:
    """Engine seconds per cost unit, smoothed over the batches run; None until one has been timed."""

    def __init__(self, seconds_per_unit: float | None = None) -> None:
        self.seconds_per_unit = seconds_per_unit

    def observe(self, seconds_per_unit: float) -> None:
        # Smoothed, so one slow batch (a GC pause, a noisy neighbour) does not start refusals.
        prev = self.seconds_per_unit
        self.seconds_per_unit = seconds_per_unit if prev is None else 0.8 * prev + 0.2 * seconds_per_unit


class BatchPlanner:
    """Chooses the next batch from the queued lengths, within the batch limits and, under a standing
    queue, within the run time of `queue_target_ms`."""

    def __init__(self, config: BatcherConfig, speed: EngineSpeed) -> None:
        self.config = config
        self.speed = speed
        self.cost = BatchCost(config.batch_overhead_tokens)
        self.max_tokens = config.max_batch_tokens or MAX_BATCH_TOKENS  # 0: not yet by cost (BatcherConfig.for_device)

    def token_budget(self, overloaded: bool) -> int:
        """The token budget of the next batch: `max_batch_tokens`, and, under a standing queue, no
        more than runs within `queue_target_ms`: one CPU thread runs a batch of 8 real pairs for longer
        than the target, so a call admitted at the target would otherwise run for longer than it waited.
        Outside overload batches stay as wide as throughput wants: a burst drains fastest that way."""
        cfg = self.config
        seconds_per_unit = self.speed.seconds_per_unit
        if not overloaded or cfg.queue_target_ms <= 0 or seconds_per_unit is None:
            return self.max_tokens
        units = cfg.queue_target_ms / 1000.0 / seconds_per_unit
        return max(1, min(self.max_tokens, int(units) - self.cost.overhead))

    def batches_for(self, items: int, tokens: int, overloaded: bool) -> int:
        """How many runs `items` queued items of `tokens` tokens in all take, as the planner cuts them."""
        return max(math.ceil(items / self.config.max_batch_size), math.ceil(tokens / self.token_budget(overloaded)))

    def next_batch(self, lengths: Sequence[int], overloaded: bool) -> list[int]:
        """Positions (ascending) of the queued items that run next; `lengths` is the queue in arrival
        order, so position 0 is the oldest item, which is always among them (no starvation)."""
        if not lengths:
            return []
        order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
        pos = order.index(0)
        lo = max(0, min(pos - PLAN_WINDOW // 2, len(order) - PLAN_WINDOW))
        window = order[lo : lo + PLAN_WINDOW]
        groups = self.cost.plan([lengths[i] for i in window], self.config.max_batch_size,
                                self.token_budget(overloaded))
        start, end = next((a, b) for a, b in groups if a <= pos - lo < b)
        return sorted(window[start:end])
