"""Load generation for the scoring service.

`loadtest.openloop` is an open-loop generator: requests are sent at their scheduled times whatever
the server's response times, and latency is measured from the scheduled send time, so a slow
server cannot slow down the offered load and hide its own queueing (no coordinated omission).
"""

from loadtest.openloop import (
    SCORE_METHOD,
    LoadConfig,
    LoadResult,
    arrival_offsets,
    latency_summary,
    run_open_loop,
    serialize_requests,
)

__all__ = [
    "SCORE_METHOD",
    "LoadConfig",
    "LoadResult",
    "arrival_offsets",
    "latency_summary",
    "run_open_loop",
    "serialize_requests",
]
