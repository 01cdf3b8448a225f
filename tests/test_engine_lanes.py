"""Engine lanes: on the CPU the batcher runs several single-threaded batches at once on one session.

The lanes must give the same scores as one run at a time, really overlap, and never hold more cores
than the process may use, whichever versions the runs belong to; a version loading on a background
thread must not take cores from the serving one.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import numpy as np

from model_format.features import EncodedRequest, FeatureEncoder, pad_batch
from model_format.manifest import read_manifest
from server.admission import QueueFull
from server.batcher import Batcher, BatcherConfig
from server.resources import cpu_limit, lower_thread_priority, thread_is_background
from server.runtime import _CPU_CORES, CoreBudget, ModelRuntime, RuntimeOptions
from tests.helpers import build_small_model

QUERIES = ["北京天气", "上海到杭州的高铁", "感冒了吃什么药好得快", "苹果", "如何办理护照", "酒店预订"]


def _runtime(version_dir: Path, threads: int = 0, lanes: int = 0) -> tuple[ModelRuntime, FeatureEncoder]:
    manifest = read_manifest(version_dir)
    options = RuntimeOptions(device="cpu", intra_op_threads=threads, engine_lanes=lanes)
    return ModelRuntime(version_dir, manifest, options), FeatureEncoder(version_dir, manifest)


def test_cpu_default_is_one_thread_per_lane_and_a_lane_per_core(tmp_path: Path) -> None:
    runtime, _ = _runtime(build_small_model(tmp_path))
    assert (runtime.threads, runtime.lanes) == (1, cpu_limit())
    explicit, _ = _runtime(tmp_path / "tiny" / "1", threads=2)
    assert (explicit.threads, explicit.lanes) == (2, max(1, cpu_limit() // 2))


def test_lanes_overlap_and_score_as_one_run_at_a_time(tmp_path: Path) -> None:
    runtime, features = _runtime(build_small_model(tmp_path), threads=1, lanes=2)
    items = [features.encode(q, "标题") for q in QUERIES]
    alone = np.concatenate([runtime.run(pad_batch([it])) for it in items])

    active = peak = 0
    lock = threading.Lock()

    def run_slowly(inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, float]:
        # The real run, held open long enough that two lanes must overlap if they can.
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        try:
            time.sleep(0.05)
            return runtime.run_timed(inputs)
        finally:
            with lock:
                active -= 1

    async def scenario(lanes: int) -> np.ndarray:
        batcher = Batcher(run_slowly, BatcherConfig(max_batch_size=1, max_queue_delay_ms=0), lanes=lanes)
        batcher.start()
        futures = [f for it in items for f in batcher.submit([it])]
        rows = await asyncio.gather(*futures)
        await batcher.close()
        return np.stack(rows)

    together = asyncio.run(scenario(lanes=2))
    assert peak == 2, f"two lanes ran at most {peak} batch(es) at once"
    np.testing.assert_array_equal(together, alone)  # one thread per run: bit-identical to sequential runs

    peak = 0
    asyncio.run(scenario(lanes=1))
    assert peak == 1


def test_core_budget_never_hands_out_more_cores_than_it_has() -> None:
    budget = CoreBudget(2)
    active = peak = 0
    lock = threading.Lock()

    def work(cores: int) -> None:
        nonlocal active, peak
        with budget.hold(cores):
            with lock:
                active += cores
                peak = max(peak, active)
            time.sleep(0.02)
            with lock:
                active -= cores

    # Two versions' lanes (1 core each) and a warm-up of a 2-thread version, all at once.
    threads = [threading.Thread(target=work, args=(c,)) for c in (1, 1, 1, 2, 1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in threads)
    assert peak == 2
    with budget.hold(5):  # more than the budget: the whole budget, not a deadlock
        pass


def test_admission_counts_the_batches_still_running() -> None:
    """The queue bound adds what is left of the running batches: with one lane busy for 0.3 s, two
    queued 0.3 s items make ~0.9 s of wait, over a 0.75 s bound (queued work alone would be 0.6 s)."""
    run_s = 0.3
    item = EncodedRequest(input_ids=(1, 5, 2), token_type_ids=(0, 0, 0), site_id=0, ner_ids=(), industry_id=0)

    def engine(inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, float]:
        time.sleep(run_s)  # a stand-in engine whose every batch takes exactly run_s
        return np.zeros((inputs["input_ids"].shape[0], 2), np.float32), run_s

    async def scenario() -> str:
        config = BatcherConfig(max_batch_size=1, max_queue_delay_ms=0, max_queue_wait_ms=750)
        batcher = Batcher(engine, config, lanes=1)
        batcher.start()
        await batcher.submit([item])[0]  # times one batch: the estimate now knows a run takes run_s
        running = batcher.submit([item])  # empty queue: admitted, and on the engine at once
        await asyncio.sleep(0.01)
        queued = batcher.submit([item])
        try:
            batcher.submit([item])
            outcome = "admitted"
        except QueueFull as exc:
            outcome = str(exc)
        await asyncio.gather(*running, *queued)
        await batcher.close()
        return outcome

    outcome = asyncio.run(scenario())
    assert "over max_queue_wait_ms 750" in outcome, outcome


def test_background_threads_yield_the_cpu_and_skip_the_core_budget(tmp_path: Path) -> None:
    runtime, features = _runtime(build_small_model(tmp_path), threads=1, lanes=1)
    inputs = pad_batch([features.encode("北京天气", "标题")])
    seen: dict[str, object] = {}

    def loader() -> None:
        seen["lowered"] = lower_thread_priority()
        seen["background"] = thread_is_background()
        seen["scores"] = runtime.run(inputs)  # every core is held: only a background run gets through

    assert not thread_is_background()
    with _CPU_CORES.hold(_CPU_CORES.cores):
        t = threading.Thread(target=loader)
        t.start()
        t.join(timeout=30)
        assert not t.is_alive(), "a background run waited for the core budget"
    assert seen["lowered"] and seen["background"]
    assert isinstance(seen["scores"], np.ndarray) and seen["scores"].shape == (1, runtime.num_heads)
