"""Golden requests written into every version: fixed probes and their fp32 scores at build time."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from model_format.features import FeatureEncoder, pad_batch
from model_format.golden import GoldenRequest
from model_format.manifest import MODEL_FILES, GoldenSpec, Manifest

GOLDEN_FILE = "golden.jsonl"
# fp32 on another machine or batch mix moves scores by ~1e-7; int8 and fp16 move the bottom itself.
TOLERANCE = {"fp32": 1e-4, "int8": 0.1, "fp16": 0.02}


def probes(site: str, tag: str, industry: str) -> list[tuple[str, str | None, str | None, tuple[str, ...], str | None]]:
    """Mixed lengths, missing and unknown look-ups, a query long enough to cut the title."""
    return [
        ("北京旅游攻略", "北京旅游攻略大全_自由行路线推荐", site, (tag,), industry),
        ("感冒发烧吃什么药", None, None, (), None),
        ("iPhone 15 Pro Max 价格", "苹果官网 Apple Store", "unknown-site.example", ("NOT_A_TAG",), None),
        ("天气", "", "", (tag, tag), "no-such-industry"),
        ("如何注册一家有限责任公司需要哪些材料和流程" * 3, "企业信息查询" * 40, site, (), industry),
        ("抖音短视频怎么剪辑", "剪映教程", None, (), None),
    ]


def write_golden(stage: Path, manifest: Manifest, site: str, tag: str, industry: str) -> GoldenSpec:
    features = FeatureEncoder(stage, manifest)
    rows = probes(site, tag, industry)
    encoded = [features.encode(q, t, s, n, i) for q, t, s, n, i in rows]
    session = ort.InferenceSession(str(stage / MODEL_FILES["fp32"]), providers=["CPUExecutionProvider"])
    scores = session.run(["scores"], pad_batch(encoded))[0]
    lines = [GoldenRequest(q, t, s, n, i, tuple(float(x) for x in row)).to_json()
             for (q, t, s, n, i), row in zip(rows, scores, strict=True)]
    (stage / GOLDEN_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return GoldenSpec(GOLDEN_FILE, dict(TOLERANCE))
