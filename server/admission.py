"""Admission: whether a call's items may join the queue, decided at once (no waiting for room).

Four rules, in this order; a call is refused (QueueFull, answered RESOURCE_EXHAUSTED) when
1. the queue would hold more than `max_queue_size` items;
2. the queue would hold more than `max_queue_wait_ms` of engine work (estimated from the batches just
   run, counting what is left of the running ones): the bound for a burst;
3. a standing queue stands (server.standing_queue) and the queue would hold more than
   `queue_target_ms` of work: under overload the excess is refused in microseconds instead of
   expiring in the queue, and what is admitted waits a bounded time;
4. the queued work exceeds what the call's deadline leaves: it would expire in the queue.
An empty queue always admits (no starvation); rules 2-4 need a timed batch and `max_queue_wait_ms` > 0.
Calls refused by rules 2-4 count as offered load for the standing-queue detector, except a caller
coming straight back (server.standing_queue.COMEBACK_S).
"""

from __future__ import annotations

from server.batch_config import BatcherConfig
from server.batch_plan import BatchPlanner, EngineSpeed
from server.standing_queue import StandingQueue


class QueueFull(Exception):
    """The queue cannot take these items now."""


class _Held(Exception):
    """Refused by the standing-queue rule (rule 3)."""


class Admission:
    """The admission rules over the queue's numbers, and the engine-work estimate they use."""

    def __init__(self, config: BatcherConfig, planner: BatchPlanner, standing: StandingQueue, lanes: int = 1) -> None:
        self.config = config
        self.planner = planner
        self.standing = standing
        self.lanes = max(1, lanes)
        self._running: dict[int, tuple[float, int]] = {}  # per running batch: start, cost units

    @property
    def speed(self) -> EngineSpeed:
        return self.planner.speed

    def started(self, batch: int, now: float, units: int) -> None:
        """A batch of `units` cost units went to the engine: what is left of it counts as queued work."""
        self._running[batch] = (now, units)

    def finished(self, batch: int) -> None:
        del self._running[batch]

    def work_seconds(self, items: int, tokens: int, now: float) -> float | None:
        """Estimated time for the engine's lanes to run `items` queued items of `tokens` tokens after
        what they run now; None until a batch has been timed."""
        seconds_per_unit = self.speed.seconds_per_unit
        if seconds_per_unit is None:
            return None
        # Under a standing queue batches are cut to the target's run time: more of them, more overhead.
        batches = self.planner.batches_for(items, tokens, self.standing.overloaded)
        queued = (tokens + batches * self.planner.cost.overhead) * seconds_per_unit
        # A full batch on one thread runs for hundreds of ms: what is left of the running ones counts.
        running = sum(max(0.0, units * seconds_per_unit - (now - started))
                      for started, units in self._running.values())
        return (queued + running) / self.lanes

    def admit(self, queued: int, queued_tokens: int, items: int, tokens: int, now: float,
              deadline: float | None) -> None:
        """Admits `items` items of `tokens` tokens in all onto a queue of `queued` items holding
        `queued_tokens`, or raises QueueFull saying which rule refused them. `deadline` and `now` are
        event-loop clock seconds."""
        cfg = self.config
        if queued + items > cfg.max_queue_size:
            raise QueueFull(f"queue holds {queued} of {cfg.max_queue_size} items; {items} more do not fit")
        units = tokens + items * self.planner.cost.overhead / cfg.max_batch_size
        try:
            self._time_bounds(queued, queued_tokens, items, tokens, now, deadline)
        except _Held as held:
            self.standing.turned_away(now, units, by_hold=True)
            raise QueueFull(str(held)) from None
        except QueueFull:
            self.standing.turned_away(now, units, by_hold=False)
            raise
        self.standing.arrive(now, units)

    def _time_bounds(self, queued: int, queued_tokens: int, items: int, tokens: int, now: float,
                     deadline: float | None) -> None:
        """Rules 2-4."""
        cfg = self.config
        if cfg.max_queue_wait_ms <= 0 or not queued:  # an empty queue always admits: no starvation
            return
        work = self.work_seconds(queued + items, queued_tokens + tokens, now)
        if work is not None and work * 1000.0 > cfg.max_queue_wait_ms:
            raise QueueFull(f"queue holds ~{work * 1000.0:.0f} ms of engine work with these items, over "
                            f"max_queue_wait_ms {cfg.max_queue_wait_ms:.0f}")
        self.standing.end_if_quiet(now)
        if work is None:
            return
        if work * 1000.0 > cfg.queue_target_ms and self.standing.overloaded:
            raise _Held(
                f"overloaded: batches have waited over {cfg.standing_wait_ms:.0f} ms for "
                f"{cfg.queue_interval_ms:.0f} ms on end, and the queue holds ~{work * 1000.0:.0f} ms "
                f"of engine work with these items, over the {cfg.queue_target_ms:.0f} ms target")
        if deadline is not None and now + work > deadline:
            # It would expire in the queue: say so now, while the client can still go elsewhere.
            raise QueueFull(f"queue holds ~{work * 1000.0:.0f} ms of engine work with these items; the call's "
                            f"deadline leaves {max(0.0, deadline - now) * 1000.0:.0f} ms")


def admission_for(config: BatcherConfig, lanes: int = 1, name: str = "batcher") -> Admission:
    """Admission with its own planner, engine speed and standing-queue detector, wired together."""
    speed = EngineSpeed()
    planner = BatchPlanner(config, speed)
    return Admission(config, planner, StandingQueue(config, speed, lanes, name), lanes)
