"""The batcher's settings and their by-device defaults, shared by the queue, admission and the plan."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

# How many items a batch takes follows its cost (server.batch_plan.BatchCost), within these caps: a batch
# may be as wide as keeps a run's fixed cost under OVERHEAD_SHARE of the run, so short queries batch wider
# than pairs (BENCHMARKS.md, 'Figures behind decisions in code'); a GPU needs wide batches to fill.
CPU_MAX_BATCH_SIZE = 64
GPU_MAX_BATCH_SIZE = 64
OVERHEAD_SHARE = 0.08
MAX_BATCH_TOKENS = 8192  # batch size x padded length, whatever the cost model says
# Fixed cost of one engine run, in padded-token equivalents, when it cannot be measured: each loaded
# version measures its own at warm-up (ModelRuntime.measure_overhead_tokens) unless one is set. On a
# GPU a run's fixed cost dominates, so batches are filled regardless.
CPU_BATCH_OVERHEAD_TOKENS = 24
GPU_BATCH_OVERHEAD_TOKENS = 4096


@dataclass(frozen=True)
class BatcherConfig:
    max_batch_size: int = 0  # 0 = by device: CPU_MAX_BATCH_SIZE or GPU_MAX_BATCH_SIZE
    max_batch_tokens: int = 0  # batch size x padded length; 0 = by cost (see OVERHEAD_SHARE)
    max_queue_delay_ms: float = 2.0
    max_queue_size: int = 1024  # items waiting, not counting the batch on the engine
    max_queue_wait_ms: float = 1000.0  # estimated engine time queued before refusing (0 = no time bounds)
    # CoDel's idea applied to admission: a burst may queue up to max_queue_wait_ms, but once batches
    # have left after waiting more than standing_wait_ms for queue_interval_ms on end, while more
    # work arrived over the last ENTRY_WINDOWS intervals than the lanes run at full batches (overload,
    # not a burst, nor the long waits of eager small batches near capacity), new items are admitted
    # only while the queue holds less than queue_target_ms of work (server.standing_queue,
    # server.admission). Admitted calls then wait about the target instead of the hard bound. Nor is
    # a batch then planned to run longer than the target (BatchPlanner.token_budget), so a call
    # admitted under overload takes about twice the target.
    queue_target_ms: float = 80.0
    standing_wait_ms: float = 200.0
    queue_interval_ms: float = 1000.0
    batch_overhead_tokens: int = 0  # 0 = by device; see server.batch_plan.BatchCost

    def __post_init__(self) -> None:
        if self.max_batch_size < 0 or self.max_queue_size < 1 or self.max_batch_tokens < 0:
            raise ValueError("batch size and token budget must not be negative; queue size must be positive")
        if min(self.max_queue_delay_ms, self.max_queue_wait_ms, self.batch_overhead_tokens, self.queue_target_ms,
               self.standing_wait_ms, self.queue_interval_ms) < 0:
            raise ValueError("max_queue_delay_ms, max_queue_wait_ms, queue_target_ms, standing_wait_ms, "
                             "queue_interval_ms and batch_overhead_tokens must not be negative")

    @property
    def interval_s(self) -> float:
        """`queue_interval_ms` in seconds: the window of the standing-queue rule and the offered load."""
        return self.queue_interval_ms / 1000.0

    def for_device(self, on_gpu: bool, measured_overhead: int | None = None) -> BatcherConfig:
        """Fills the defaults (0) for the engine this batcher will feed: the fixed cost of a run as set,
        else as measured on the engine, else the device's; the token budget from that cost."""
        overhead = (self.batch_overhead_tokens or measured_overhead
                    or (GPU_BATCH_OVERHEAD_TOKENS if on_gpu else CPU_BATCH_OVERHEAD_TOKENS))
        by_cost = math.ceil(overhead * (1.0 - OVERHEAD_SHARE) / OVERHEAD_SHARE)
        return replace(
            self,
            max_batch_size=self.max_batch_size or (GPU_MAX_BATCH_SIZE if on_gpu else CPU_MAX_BATCH_SIZE),
            batch_overhead_tokens=overhead,
            max_batch_tokens=self.max_batch_tokens or min(MAX_BATCH_TOKENS, by_cost),
        )
