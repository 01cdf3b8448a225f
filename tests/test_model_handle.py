"""The loaded-version handle: load, start, submit, info, live readings and close, on a real tiny model."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from model_format.features import pad_batch
from model_format.golden import GoldenMismatch
from model_format.manifest import read_manifest, sha256_file
from server.batcher import BatcherClosed, BatcherConfig
from server.metrics import Metrics
from server.model import LoadedModel
from server.runtime import RuntimeOptions
from tests.helpers import SmallModelFactory, cpu_session, run_graph

QUERIES = ["北京天气", "上海到杭州的高铁", "感冒了吃什么药好得快"]


def test_the_handle_scores_like_the_graph_and_answers_everything_queued_before_close(
        small_model_factory: SmallModelFactory) -> None:
    version_dir = small_model_factory(num_heads=3, seed=5)
    manifest = read_manifest(version_dir)
    metrics = Metrics()
    handle = LoadedModel.load(version_dir, manifest, RuntimeOptions(device="cpu", intra_op_threads=1),
                              BatcherConfig(max_queue_delay_ms=1), metrics)
    items = [handle.features.encode(q, "标题") for q in QUERIES]

    async def scenario() -> tuple[list[np.ndarray], str]:
        handle.start()
        assert handle.queue_depth == 0 and not handle.overloaded and handle.offered_load() == 0.0
        first = await asyncio.gather(*handle.submit(items[:1]))
        queued = handle.submit(items[1:])  # queued before close: still answered
        closing = asyncio.ensure_future(handle.close())
        await asyncio.sleep(0)
        try:
            handle.submit(items[:1])
            refused = "admitted"
        except BatcherClosed as exc:
            refused = str(exc)
        rest = await asyncio.gather(*queued)
        await closing
        return [*first, *rest], refused

    rows, refused = asyncio.run(scenario())
    assert "draining" in refused
    want = np.concatenate([run_graph(cpu_session(version_dir), pad_batch([it]))[0] for it in items])
    np.testing.assert_allclose(np.stack(rows), want, atol=1e-5)

    info = handle.info()
    assert (info.name, info.version) == (manifest.model, manifest.version)
    assert [h.srcid for h in info.heads] == list(handle.srcids) and len(info.heads) == 3
    assert (info.precision, info.provider) == ("fp32", "CPUExecutionProvider")
    # Not set: the fixed cost of a run was measured on this engine, and the widest batch follows it.
    assert 1 <= info.batch_overhead_tokens <= 8192
    assert info.max_batch_tokens == BatcherConfig(batch_overhead_tokens=info.batch_overhead_tokens).for_device(
        on_gpu=False).max_batch_tokens
    assert info.lanes >= 1 and info.max_seq_len == manifest.max_seq_len and info.loaded_at > 0
    assert handle.srcid_index == {s: i for i, s in enumerate(manifest.srcids)}
    batches = sum(s.value for m in metrics.batch_size.collect() for s in m.samples if s.name.endswith("_count"))
    assert batches >= 2, "the handle's batches are observed by its version's metrics"


def test_a_version_whose_golden_requests_disagree_never_becomes_a_handle(
        small_model_factory: SmallModelFactory, tmp_path: Path) -> None:
    source = small_model_factory(num_heads=3, seed=5)
    version_dir = tmp_path / "tiny" / "1"
    shutil.copytree(source, version_dir)
    golden = version_dir / "golden.jsonl"
    golden.write_text(golden.read_text(encoding="utf-8").replace('"scores": [0.', '"scores": [9.'), encoding="utf-8")
    manifest = json.loads((version_dir / "manifest.json").read_text(encoding="utf-8"))
    manifest["sha256"]["golden.jsonl"] = sha256_file(golden)
    (version_dir / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(GoldenMismatch, match="golden scores differ"):
        LoadedModel.load(version_dir, read_manifest(version_dir), RuntimeOptions(device="cpu"), BatcherConfig(),
                         Metrics())


def test_a_set_batch_overhead_is_used_as_set(small_model_factory: SmallModelFactory) -> None:
    version_dir = small_model_factory(num_heads=3, seed=5)
    handle = LoadedModel.load(version_dir, read_manifest(version_dir), RuntimeOptions(device="cpu"),
                              BatcherConfig(batch_overhead_tokens=40, max_batch_tokens=300), Metrics())
    assert (handle.info().batch_overhead_tokens, handle.info().max_batch_tokens) == (40, 300)
