"""An unloaded version's engine is released at once: nothing (metrics callbacks included) keeps it alive,
so a server that swaps versions every few minutes does not grow by one model per swap."""

from __future__ import annotations

import asyncio
import gc
import weakref
from pathlib import Path

from server.manager import ManagerConfig, ModelManager
from server.metrics import Metrics
from server.runtime import RuntimeOptions
from tests.helpers import build_small_model


def test_swapped_out_version_is_freed(tmp_path: Path) -> None:
    build_small_model(tmp_path, version=1, seed=1)

    async def scenario() -> tuple[weakref.ref[object], list[str]]:
        metrics = Metrics()
        manager = ModelManager(ManagerConfig(repo=tmp_path, poll_interval_s=0,
                                             runtime=RuntimeOptions(intra_op_threads=1)), metrics)
        manager.on_change(metrics.publish_versions)  # as the server wires it
        await manager.start()
        old = manager.resolve("tiny", 0)
        assert old.version == 1
        session = weakref.ref(old._runtime.session)  # the engine itself, not only its handle
        del old
        build_small_model(tmp_path, version=2, seed=2)
        await manager.reconcile()
        assert manager.resolve("tiny", 0).version == 2
        for _ in range(100):  # the drain of version 1 runs as its own task
            if manager.snapshot()["tiny"].versions[1].loaded is None:
                break
            await asyncio.sleep(0.05)
        series = [s.labels["version"] for m in metrics.queue_depth.collect() for s in m.samples]
        await manager.close()
        return session, series

    gc.disable()  # the manager must free the engine itself, not wait for a lucky automatic collection
    try:
        session, series = asyncio.run(scenario())
        assert session() is None, f"version 1's session is still referenced by {gc.get_referrers(session())}"
    finally:
        gc.enable()
    assert series == ["2"]
