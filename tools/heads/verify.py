"""The check inside every head edit: old heads bit-identical, new heads equal to their source model.

It runs the staged new version and its inputs with ONNX Runtime on the same probe batches, for every
precision variant that this machine can run (fp32 and int8 on the CPU; fp16 needs CUDA), and
refuses to publish on any difference.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from model_format.features import EncodedRequest, FeatureEncoder, FeatureError, pad_batch
from model_format.golden import read_golden
from model_format.manifest import Manifest, read_lookup_vocab

NEW_HEAD_TOLERANCE = 1e-6
PROBE_BATCH = 16
SINGLE_ROW_PROBES = 8  # the first probes also run one per batch: the server's batch-of-one case
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"

Probe = tuple[str, str | None, str | None, tuple[str, ...], str | None]  # query, title, site, ner, industry
Report = Callable[[str], None]

_QUERIES = [
    ("北京旅游攻略", "北京旅游攻略大全_自由行路线推荐"), ("三亚自由行", "三亚五天四晚自由行攻略"),
    ("感冒发烧吃什么药", None), ("高血压的症状", "高血压早期症状有哪些_健康频道"),
    ("阿里巴巴公司地址", "阿里巴巴(中国)有限公司_企业信息查询"), ("腾讯控股 股东", "腾讯控股有限公司股权结构"),
    ("抖音短视频怎么剪辑", "剪映教程"), ("搞笑视频", "爆笑短视频合集"), ("天气", ""),
    ("iPhone 15 Pro Max 价格", "苹果官网 Apple Store"), ("python list sort", "Python 列表排序方法详解"),
    ("红烧肉的做法", "家常红烧肉最正宗的做法_菜谱"), ("二手车估价", "二手车评估价格查询"),
    ("考研英语真题", "历年考研英语真题及答案解析pdf"), ("世界杯赛程", "2026世界杯赛程表"),
    ("租房合同范本", "房屋租赁合同范本免费下载"), ("手机充电慢怎么办", None),
    ("周杰伦 演唱会", "周杰伦2026巡回演唱会门票"),
    ("如何注册一家有限责任公司需要哪些材料和流程" * 3, "企业信息查询" * 40), ("a", "b"),
    ("离婚申请之日起任何一方不同意离婚可以向", "依据民法典规定自婚姻登记机关收到离婚登记申请之日起"),
    ("淘宝里面图片轮播怎么上图片啊", "淘宝店铺里的轮播图片宝贝怎么弄上去啊百度知道"),
    ("tpu和pc", "软硬大比拼硅胶tpu和pc材质对比-"), ("新冠疫苗第三针", "新冠疫苗加强针接种须知"),
]


class VerificationError(RuntimeError):
    """The edited version does not compute what its inputs computed; nothing was published."""


@dataclass
class VariantResult:
    precision: str
    ran: bool
    note: str = ""
    probes: int = 0
    kept: int = 0
    kept_mismatches: int = 0
    kept_max_abs: float = 0.0
    features_identical: bool = True
    new_max_abs: dict[int, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return (not self.ran) or (self.kept_mismatches == 0 and self.features_identical and all(
            d <= NEW_HEAD_TOLERANCE for d in self.new_max_abs.values()))

    def line(self) -> str:
        if not self.ran:
            return f"verify {self.precision}: not run: {self.note}"
        kept = (f"{self.kept} kept heads bit-identical on {self.probes} probes ({self.kept * self.probes} scores)"
                if self.kept_mismatches == 0 else
                f"FAILED: {self.kept_mismatches} of {self.kept * self.probes} kept-head scores changed "
                f"(max |Δ| {self.kept_max_abs:.3g})")
        feats = "features bit-identical" if self.features_identical else "FAILED: features changed"
        news = "; ".join(
            f"{'new' if d <= NEW_HEAD_TOLERANCE else 'FAILED: new'} head {s} vs its source: max |Δ| {d:.3g} "
            f"(limit {NEW_HEAD_TOLERANCE:g})" for s, d in self.new_max_abs.items())
        return f"verify {self.precision}: {kept}; {feats}" + (f"; {news}" if news else "") + (
            f" [{self.note}]" if self.note else "")


def cuda_usable() -> bool:
    """onnxruntime-gpu lists CUDA even without a GPU; the loaded driver is the real sign (as the server)."""
    return CUDA in ort.get_available_providers() and Path("/proc/driver/nvidia/version").exists()


def session(model: Path | bytes, provider: str = CPU) -> ort.InferenceSession:
    """A session configured as the server configures its own (all graph optimizations, sequential)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    providers = [provider, CPU] if provider != CPU else [CPU]
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), so, providers=providers)


def builtin_probes(version_dir: Path, manifest: Manifest) -> list[Probe]:
    """Mixed lengths, missing/unknown/known look-ups, a query long enough to cut the title."""
    sites = read_lookup_vocab(version_dir / manifest.site.vocab_file)[2:]
    tags = read_lookup_vocab(version_dir / manifest.ner.vocab_file)[2:]
    industries = read_lookup_vocab(version_dir / manifest.industry.vocab_file)[2:]
    out: list[Probe] = []
    for i, (q, t) in enumerate(_QUERIES):
        site = (sites[i % len(sites)] if sites else None) if i % 3 == 0 else ("unknown-site.example" if i % 3 == 1
                                                                                else None)
        ner = tuple(tags[j % len(tags)] for j in range(i % 3)) if tags else ()
        industry = industries[i % len(industries)] if industries and i % 2 == 0 else None
        out.append((q, t, site, ner, industry))
    return out


def golden_probes(version_dir: Path, manifest: Manifest) -> list[Probe]:
    if manifest.golden is None or not (version_dir / manifest.golden.file).is_file():
        return []
    return [(g.query, g.title, g.site, g.ner, g.industry) for g in read_golden(version_dir / manifest.golden.file)]


def probes_from_jsonl(path: Path, limit: int) -> list[Probe]:
    """The first `limit` rows of a JSONL file with query and optional title/site/ner/industry."""
    out: list[Probe] = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if len(out) >= limit:
                break
            if not line.strip():
                continue
            d = json.loads(line)
            ner = d.get("ner") or ()
            out.append((str(d["query"]), d.get("title"), d.get("site"),
                        (ner,) if isinstance(ner, str) else tuple(str(x) for x in ner), d.get("industry")))
    return out


def encode_probes(features: FeatureEncoder, probes: Sequence[Probe]) -> list[EncodedRequest]:
    encoded = []
    for q, t, s, n, i in probes:
        try:
            encoded.append(features.encode(q, t, s, n, i))
        except FeatureError:
            continue  # a probe the server would refuse says nothing about the heads
    return encoded


def probe_batches(encoded: Sequence[EncodedRequest]) -> list[dict[str, np.ndarray]]:
    """Fixed batches of PROBE_BATCH in order, then the first probes alone: the same batches for every model."""
    batches = [pad_batch(encoded[i:i + PROBE_BATCH]) for i in range(0, len(encoded), PROBE_BATCH)]
    batches += [pad_batch([e]) for e in encoded[:SINGLE_ROW_PROBES]]
    return batches


def run(sess: ort.InferenceSession, batches: Sequence[dict[str, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """(scores, features) of every batch, stacked in batch order."""
    scores, feats = [], []
    for b in batches:
        s, f = sess.run(["scores", "features"], b)
        scores.append(np.asarray(s, np.float32))
        feats.append(np.asarray(f, np.float32))
    return np.concatenate(scores), np.concatenate(feats)


def _bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, np.float32).view(np.uint32)


@dataclass(frozen=True)
class VariantInputs:
    """What to compare for one precision: old and new graphs, and the source of the new heads."""

    precision: str
    old: Path | bytes
    new: Path | bytes
    source: Path | bytes | None  # a model whose heads are the added heads; None when nothing is added


def verify_variant(
    inputs: VariantInputs,
    batches: Sequence[dict[str, np.ndarray]],
    kept: Sequence[tuple[int, int, int]],  # (srcid, column in old, column in new)
    added: Sequence[tuple[int, int, int]],  # (srcid, column in source, column in new)
) -> VariantResult:
    provider = CUDA if inputs.precision == "fp16" and cuda_usable() else CPU
    try:
        new_scores, new_feats = run(session(inputs.new, provider), batches)
    except Exception as exc:  # ORT raises several unrelated types; only fp16 may be unrunnable here
        if inputs.precision != "fp16":
            raise
        return VariantResult("fp16", ran=False, note=f"ONNX Runtime cannot run it here ({str(exc)[:120]}); the fp16 "
                             "graph got the same head tensors as fp32 and its non-head tensors and nodes were "
                             "checked byte-identical")
    old_scores, old_feats = run(session(inputs.old, provider), batches)
    result = VariantResult(inputs.precision, ran=True, probes=int(new_scores.shape[0]), kept=len(kept))
    result.features_identical = bool(np.array_equal(_bits(old_feats), _bits(new_feats)))
    if kept:
        old_cols = old_scores[:, [k[1] for k in kept]]
        new_cols = new_scores[:, [k[2] for k in kept]]
        result.kept_mismatches = int(np.count_nonzero(_bits(old_cols) != _bits(new_cols)))
        result.kept_max_abs = float(np.abs(old_cols.astype(np.float64) - new_cols).max())
    if added:
        if inputs.source is None:
            raise ValueError("added heads need a source model")
        src_scores, _ = run(session(inputs.source, provider), batches)
        for srcid, src_col, new_col in added:
            result.new_max_abs[srcid] = float(
                np.abs(src_scores[:, src_col].astype(np.float64) - new_scores[:, new_col]).max())
    if provider == CUDA:
        result.note = "CUDA"
    return result


def verify_all(
    variants: Sequence[VariantInputs],
    batches: Sequence[dict[str, np.ndarray]],
    kept: Sequence[tuple[int, int, int]],
    added: Sequence[tuple[int, int, int]],
    report: Report = print,
) -> list[VariantResult]:
    """Runs every variant's check, reports one line each, raises VerificationError if any failed."""
    results = []
    for v in variants:
        r = verify_variant(v, batches, kept, added)
        report(r.line())
        results.append(r)
    failed = [r for r in results if not r.ok]
    if failed:
        raise VerificationError("verification FAILED, nothing was published:\n  " +
                                "\n  ".join(r.line() for r in failed))
    if not any(r.ran for r in results):
        raise VerificationError("no precision variant could be run on this machine; nothing was verified")
    return results
