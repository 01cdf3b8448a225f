"""Overload detection: the standing queue (CoDel's signal) that keeps growing, and the offered load.

A burst may queue up to `max_queue_wait_ms`; a growing standing queue may not. It is declared once
batches have left the queue after waiting over `standing_wait_ms` for `queue_interval_ms` on end,
while the queued work grew over that time by more than the target and a batch's run (more than a
fixed population of callers churns), and more engine work arrived over the last ENTRY_WINDOWS
intervals than the lanes run at full batches (the offered load is at least 1). A queue that stands
but does not grow is a fixed number of callers (a closed loop): refusing them would not lower the
load, the refused call comes straight back, so it is left to the hard bound.
It ends once the admission rule it switches on has refused nothing for an interval, or the last
interval's arrivals fit the engine at full batches. A refused call counts as offered load unless it
came within COMEBACK_S of the previous refusal (a caller coming straight back, not new work): else
refusals would keep the rule on by themselves.
While it stands, admission holds the queue at `queue_target_ms` (server.admission) and batches are
cut to run within the target (server.batch_plan). Why: see BENCHMARKS.md, 'Batch width under a
standing queue (CPU)' and 'Figures behind decisions in code' (closed loops).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from server.batch_config import BatcherConfig
from server.batch_plan import EngineSpeed

log = logging.getLogger("server.batcher")  # its events are the batcher's, under the same logger name

ENTRY_WINDOWS = 3  # whole intervals the offered load is averaged over before an overload is declared
# A refusal this soon after the previous one is taken for a caller coming straight back: a refusal's round
# trip on a LAN is well under it, while genuinely new work rarely lands in so short a gap.
COMEBACK_S = 0.002


@dataclass(slots=True)
class ArrivalWindow:
    """Cost units of arriving items in tumbling windows of one interval: the current window's and
    the last whole ones' (newest first)."""

    start: float | None = None
    units: float = 0.0
    done: list[tuple[float, float]] = field(default_factory=list)  # (units, seconds)

    def _closed(self, now: float, interval: float) -> list[tuple[float, float]]:
        """The whole windows as of `now`, without changing anything."""
        if interval <= 0:
            return []  # no window: the standing-queue rule is off
        if self.start is None or now - self.start < interval:
            return self.done
        if now - self.start >= 2 * interval:  # quiet windows passed with nothing in them
            quiet = min(ENTRY_WINDOWS, int((now - self.start) / interval) - 1)
            return [*[(0.0, interval)] * quiet, (self.units, interval), *self.done][:ENTRY_WINDOWS]
        return [(self.units, now - self.start), *self.done][:ENTRY_WINDOWS]

    def add(self, now: float, interval: float, units: float) -> None:
        if self.start is None or now - self.start >= interval:
            self.done = self._closed(now, interval)
            self.start, self.units = now, 0.0
        self.units += units

    def last(self, now: float, interval: float, windows: int = 1) -> tuple[float, float]:
        """Units and seconds of the last `windows` whole windows. Reads only: the metrics endpoint
        calls this from its own thread."""
        recent = self._closed(now, interval)[:windows]
        return sum(u for u, _ in recent), sum(t for _, t in recent)


class StandingQueue:
    """Tells a standing queue (overload) from a burst, from the waits of leaving batches and the work
    arriving. Times are event-loop clock seconds, passed in by the caller."""

    def __init__(self, config: BatcherConfig, speed: EngineSpeed, lanes: int = 1, name: str = "batcher") -> None:
        self.config = config
        self.speed = speed
        self.lanes = max(1, lanes)
        self.name = name
        self.arrivals = ArrivalWindow()
        self._overloaded = False
        self._long_since: float | None = None  # every batch since then left after waiting > standing_wait_ms
        self._queued_then = 0  # cost units queued at _long_since
        self._last_turned_away = -1.0  # when any rule last refused a call
        self._overload_since = 0.0
        self._last_refusal = 0.0  # when the rule last refused

    @property
    def overloaded(self) -> bool:
        """A standing queue: admission holds the queue at `queue_target_ms`."""
        return self._overloaded

    def arrive(self, now: float, units: float) -> None:
        """Work admitted now, in cost units."""
        self.arrivals.add(now, self.config.interval_s, units)

    def turned_away(self, now: float, units: float, by_hold: bool) -> None:
        """A call of `units` was refused; `by_hold` when by the rule this detector switches on (then the
        overload is not quiet yet). Offered load unless it looks like a caller coming straight back."""
        if now - self._last_turned_away >= COMEBACK_S:
            self.arrivals.add(now, self.config.interval_s, units)
        self._last_turned_away = now
        if by_hold:
            self._last_refusal = now

    def offered_load(self, now: float, windows: int = 1) -> float:
        """Work that arrived (admitted or refused) in the last `windows` whole `queue_interval_ms`, as
        a share of what the lanes run in that time at full batches; 0 until a batch has been timed.
        Under 1, long waits are eager small batches near capacity, which grow by themselves as the
        queue does: refusing then would turn away calls the engine has time for. An overload is
        declared on the average of ENTRY_WINDOWS intervals (one interval of Poisson arrivals near
        capacity often reads over 1) and lets go on the last one."""
        seconds_per_unit = self.speed.seconds_per_unit
        if seconds_per_unit is None:
            return 0.0
        units, seconds = self.arrivals.last(now, self.config.interval_s, windows)
        return units * seconds_per_unit / (seconds * self.lanes) if seconds > 0 else 0.0

    def batch_left(self, oldest_wait: float, now: float, caught_up: bool, queued: int = 0, batch: int = 0) -> None:
        """Called as a batch of `batch` cost units leaves the queue, with the wait of its oldest item and
        the `queued` cost units left behind; `caught_up` when that batch empties the queue while no
        other runs. An overload starts after every leaving batch waited over `standing_wait_ms` for
        `queue_interval_ms` while the queue grew (a caught-up engine voids that evidence). It ends when
        the rule has not had to refuse anything for as long (`end_if_quiet`): held at the target,
        waits stay short by construction, so they cannot be the signal, and an emptied queue under
        overload is only the dispatcher taking all of a short queue at once."""
        if self.config.max_queue_wait_ms <= 0:
            return  # time bounds off: no standing-queue rule either
        if self._overloaded:
            self.end_if_quiet(now)
        elif oldest_wait * 1000.0 <= self.config.standing_wait_ms or caught_up:
            self._long_since = None
        elif self._long_since is None:
            self._long_since, self._queued_then = now, queued
        elif (now - self._long_since >= self.config.interval_s and self._grew(queued, batch)
              and self.offered_load(now, ENTRY_WINDOWS) >= 1.0):
            self._set(True, now)

    def _grew(self, queued: int, batch: int) -> bool:
        """The queued work grew since the long waits began by more than the target and a batch per
        lane: more than the churn of a fixed population of callers (the batches running, and the
        answered callers on their way back)."""
        seconds_per_unit = self.speed.seconds_per_unit or 0.0
        grown = (queued - self._queued_then) * seconds_per_unit / self.lanes
        return grown > self.config.queue_target_ms / 1000.0 + batch * seconds_per_unit

    def end_if_quiet(self, now: float) -> None:
        """Overload ends once the rule has refused nothing for an interval, or the last interval's
        arrivals fit the engine at full batches (near capacity the hold refuses now and then
        without an overload: it would never go quiet)."""
        if not self._overloaded:
            return
        interval = self.config.interval_s
        if now - self._last_refusal >= interval or (
                now - self._overload_since >= interval and self.offered_load(now) < 1.0):
            self._set(False, now)

    def _set(self, overloaded: bool, now: float) -> None:
        self._long_since = None
        self._last_refusal = now  # a fresh overload lasts at least one interval
        self._overload_since = now
        if overloaded != self._overloaded:
            self._overloaded = overloaded
            log.info("standing queue" if overloaded else "standing queue gone",
                     extra={"event": "queue_overloaded" if overloaded else "queue_recovered", "batcher": self.name})
