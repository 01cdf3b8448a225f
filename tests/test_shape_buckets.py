"""Shape buckets (the GPU path's fixed shapes, for CUDA graphs) change no score: checked on the CPU
with the real demo graph, since the padding logic is the same on every device."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from model_format.features import FeatureEncoder, pad_batch
from model_format.manifest import read_manifest
from server.runtime import LENGTH_STEP, ModelRuntime, RuntimeOptions, ShapeBuckets

PAIRS = [("北京旅游", "北京旅游攻略大全自由行三日游路线推荐"), ("感冒吃什么药", ""), ("企业信用查询", "天眼查"),
         ("短视频", "抖音热门短视频合集" * 3), ("上海", "上海天气预报15天查询"), ("医院挂号", None)]


def test_buckets_fit_the_smallest_shape_that_holds_a_batch() -> None:
    b = ShapeBuckets(max_batch_size=16, max_seq_len=128, max_ner=8)
    assert b.batch_sizes() == [1, 2, 4, 8, 16]
    assert b.lengths() == list(range(LENGTH_STEP, 129, LENGTH_STEP))
    assert b.fit(3, 17) == (4, 32)
    assert b.fit(16, 128) == (16, 128)
    assert b.fit(20, 128) == (20, 128)  # over the limit: its own shape (the batcher never builds one)
    assert len(b.shapes()) == 5 * 8


@pytest.fixture(scope="module")
def runtimes(demo_repo: Path) -> tuple[ModelRuntime, ModelRuntime, FeatureEncoder]:
    version = demo_repo / "demo" / "1"
    manifest = read_manifest(version)
    plain = ModelRuntime(version, manifest, RuntimeOptions(precision="fp32", intra_op_threads=2))
    bucketed = ModelRuntime(version, manifest, RuntimeOptions(precision="fp32", intra_op_threads=2,
                                                              shape_buckets="on"))
    plain.set_batch_limit(16)
    bucketed.set_batch_limit(16)
    assert plain.buckets is None and bucketed.buckets is not None
    return plain, bucketed, FeatureEncoder(version, manifest)


@pytest.mark.parametrize("size", [1, 3, 6])
def test_bucketed_scores_equal_unpadded_scores(runtimes: tuple[ModelRuntime, ModelRuntime, FeatureEncoder],
                                               size: int) -> None:
    plain, bucketed, encoder = runtimes
    items = [encoder.encode(q, t, ner=["地点"] if i % 2 else ()) for i, (q, t) in enumerate(PAIRS[:size])]
    inputs = pad_batch(items)
    assert bucketed.buckets is not None
    assert bucketed.buckets.fit(*inputs["input_ids"].shape) != inputs["input_ids"].shape  # padding happens
    want, got = plain.run(inputs), bucketed.run(inputs)
    assert got.shape == want.shape == (size, plain.num_heads)
    # Extra masked positions and filler rows change only the order of float sums, never a score's meaning.
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
