"""Load generation for the scoring service; `python -m loadtest --help` is the command line.

`loadtest.openloop` is an open-loop generator: requests are sent at their scheduled times whatever
the server's response times, and latency is measured from the scheduled send time, so a slow
server cannot slow down the offered load and hide its own queueing (no coordinated omission).
`loadtest.closedloop` runs C workers that each wait for their previous answer; both return a
`RunResult` with the same summary. `loadtest.sweep.find_max_rate` searches for the highest offered
rate that meets a p99 objective; `loadtest.workload` builds requests from JSONL or synthetically;
`loadtest.plots` draws the PNGs; `loadtest.cli` is the command line.
"""

from loadtest.closedloop import ClosedLoopConfig, ClosedLoopResult, run_closed_loop
from loadtest.openloop import (
    SCORE_METHOD,
    LoadConfig,
    LoadResult,
    RunResult,
    arrival_offsets,
    latency_summary,
    run_open_loop,
    serialize_requests,
)
from loadtest.sweep import find_max_rate, judge

__all__ = [
    "SCORE_METHOD",
    "ClosedLoopConfig",
    "ClosedLoopResult",
    "LoadConfig",
    "LoadResult",
    "RunResult",
    "arrival_offsets",
    "find_max_rate",
    "judge",
    "latency_summary",
    "run_closed_loop",
    "run_open_loop",
    "serialize_requests",
]
