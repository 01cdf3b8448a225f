"""Shared by the model-format tests (test_graph, test_precision_variants, test_batch_independence,
test_manifest, test_repository, test_features): the tiny and demo versions as fixtures, and graph
inputs built from explicit look-up ids.

The fixtures are plain pytest fixtures; a test module makes them visible by naming them, e.g.
`tiny = mf.tiny` (pytest finds fixtures by module attribute). Everything runs on tiny models
(tests.helpers.build_small_model, well under a second each) except the demo fixtures, which use the
session's demo repository (tests/conftest.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from model_format.features import FeatureEncoder
from model_format.manifest import MODEL_FILES, Manifest, read_manifest
from tests.helpers import SmallModelFactory, cpu_session

BATCH_TOL = 1e-5  # fp32: one request alone vs inside a padded mixed batch

# Requests of mixed shapes for the batch-independence checks (used when QBQTC is absent, and mixed in).
SYNTHETIC = [
    ("北京旅游攻略", "北京旅游攻略大全自由行路线推荐", "baidu.com", ("LOC",), "旅游"),
    ("感冒发烧吃什么药", None, None, (), None),
    ("天气", "", "never-seen.example", ("NOT_A_TAG", "PER"), None),
    ("如何注册一家有限责任公司需要哪些材料和流程" * 2, "企业信息查询" * 20, "zhihu.com", (), "企业信息"),
    ("a", None, None, ("LOC", "ORG", "PER"), "未知行业"),
]


@pytest.fixture(scope="module")
def tiny(small_model_factory: SmallModelFactory) -> Path:
    """A tiny fp32 + int8 version with 4 heads (shared: do not modify)."""
    return small_model_factory(num_heads=4, precisions=("fp32", "int8"))


@pytest.fixture(scope="module")
def tiny_manifest(tiny: Path) -> Manifest:
    return read_manifest(tiny)


@pytest.fixture(scope="module")
def tiny_features(tiny: Path, tiny_manifest: Manifest) -> FeatureEncoder:
    return FeatureEncoder(tiny, tiny_manifest)


@pytest.fixture(scope="module")
def tiny_session(tiny: Path) -> ort.InferenceSession:
    return cpu_session(tiny)


@pytest.fixture(scope="module")
def tiny_graph(tiny: Path) -> onnx.ModelProto:
    return onnx.load(str(tiny / MODEL_FILES["fp32"]))


@pytest.fixture(scope="module")
def demo_version(demo_repo: Path) -> Path:
    return demo_repo / "demo" / "1"


@pytest.fixture(scope="module")
def demo_features(demo_version: Path) -> FeatureEncoder:
    return FeatureEncoder(demo_version, read_manifest(demo_version))


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    for init in model.graph.initializer:
        if init.name == name:
            return np.asarray(numpy_helper.to_array(init))
    raise KeyError(name)


def id_inputs(site: list[int], ner: list[list[int]], industry: list[int], seq: int = 3) -> dict[str, np.ndarray]:
    """Graph inputs with explicit look-up ids and a fixed `[CLS] x [SEP]`-like token row per request."""
    b = len(site)
    ids = np.tile(np.array([1, 5, 2] + [0] * (seq - 3), np.int64), (b, 1))
    return {
        "input_ids": ids,
        "attention_mask": (ids != 0).astype(np.int64),
        "token_type_ids": np.zeros_like(ids),
        "site_id": np.array(site, np.int64),
        "ner_ids": np.array(ner, np.int64).reshape(b, -1),
        "industry_id": np.array(industry, np.int64),
    }


def feature_slices(m: Manifest) -> dict[str, slice]:
    h, s, n, i = m.encoder.hidden_size, m.site.dim, m.ner.dim, m.industry.dim
    return {"pooled": slice(0, h), "site": slice(h, h + s), "ner": slice(h + s, h + s + n),
            "industry": slice(h + s + n, h + s + n + i)}
