"""The benchmarks' one rate search (`bench.kit.rates`): which fraction of the limit it tries next, where it
stops, and what it reports, driven with given step verdicts."""

from __future__ import annotations

from typing import Any

import pytest

from bench.kit.rates import SweepConfig, next_fraction, outcome, search


def step(fraction: float, sustainable: bool, achieved: float | None = None) -> dict[str, Any]:
    return {"fraction": fraction, "sustainable": sustainable, "achieved_rate": achieved or fraction * 100,
            "latency": {"p99_ms": 10.0 * fraction}}


def test_bisects_between_the_best_sustainable_and_the_lowest_failing_step_above() -> None:
    assert next_fraction([step(0.5, True), step(0.8, True), step(1.0, False)]) == pytest.approx(0.9)
    assert next_fraction([step(0.5, True), step(0.9, False), step(1.0, False)]) == pytest.approx(0.7)


def test_stops_once_the_gap_is_below_min_gap() -> None:
    assert next_fraction([step(0.80, True), step(0.83, False)], min_gap=0.04) is None
    assert next_fraction([step(0.80, True), step(0.85, False)], min_gap=0.04) == pytest.approx(0.825)


def test_halves_the_lowest_step_when_none_was_sustainable_down_to_a_floor() -> None:
    assert next_fraction([step(0.5, False), step(0.8, False)]) == pytest.approx(0.25)
    assert next_fraction([step(0.08, False)]) is None  # 0.04 is below the 0.05 floor


def test_grows_by_a_quarter_when_every_step_was_sustainable_up_to_max_fraction() -> None:
    assert next_fraction([step(0.5, True), step(1.0, True)]) == pytest.approx(1.25)
    assert next_fraction([step(2.8, True)], max_fraction=3.0) is None  # 3.5 would pass the cap


async def test_search_runs_the_grid_then_refines_against_a_capacity() -> None:
    capacity = 0.87  # fraction of the limit the "server" sustains
    tried: list[float] = []

    async def measure(fraction: float) -> dict[str, Any]:
        tried.append(fraction)
        return step(fraction, fraction <= capacity)

    steps = await search(measure, SweepConfig(limit=100.0, fractions=[0.9, 0.5], refine=3))
    assert tried[:2] == [0.5, 0.9], "the grid first, in order"
    assert [s["fraction"] for s in steps] == sorted(tried)
    assert tried[2:] == pytest.approx([0.7, 0.8, 0.85]), "each refinement halves the bracket around capacity"
    best = outcome(steps, limit=100.0)
    assert best["max_sustained_fraction_offered"] == pytest.approx(0.85)
    assert best["max_sustained_ratio"] == pytest.approx(0.85)
    assert best["saturation_step_fraction"] == pytest.approx(0.9)
