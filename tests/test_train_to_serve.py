"""From training code to serving, end to end (the worked example of model_repo/README.md, "Importing a trained
model"): a PyTorch model of the whole contract (`tools.torch_reference`: an ERNIE bottom, three look-up tables,
heads) is exported and built as version 1 and served; trained a few steps on the public pairs, exported and
built as version 2, which the running server picks up and swaps in; then every head's score over 200 real
pairs, with site, NER and industry present, absent and unknown, answered by the server over gRPC, equals the
PyTorch model's own forward within 1e-4.

The PyTorch side is fed the served model inputs (`FeatureEncoder` on the built version): the tokenizer's ids
are held equal to transformers' by tests/test_checkpoint_import.py.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from bench.kit.data import DEFAULT_DATA, load_pairs
from model_format.features import EncodedRequest, FeatureEncoder, pad_batch
from model_format.manifest import Head, read_manifest
from scoring.v1 import scoring_pb2, scoring_pb2_grpc
from tests.helpers import REPO_ROOT
from tests.server_harness import run_server
from tools.build_model.__main__ import main as build
from tools.build_model.writer import LookupVocabs

_REFERENCE = "the PyTorch reference needs torch + transformers: `pip install -r requirements-parity.txt`"
torch = pytest.importorskip("torch", reason=_REFERENCE)
transformers = pytest.importorskip("transformers", reason=_REFERENCE)
from tools import torch_reference  # noqa: E402  (imports torch)

VOCAB = REPO_ROOT / "vocab" / "ernie-3.0-zh-vocab.txt"
VOCABS = LookupVocabs(sites=["baidu.com", "zhihu.com", "mafengwo.cn", "haodf.com", "autohome.com.cn"],
                      ner_tags=["LOC", "PER", "ORG", "DISEASE"], industries=["旅游", "医疗健康", "汽车"])
HEADS = [Head(111, "travel", 0.5), Head(222, "medical", 0.4), Head(333, "auto", 0.6)]
SITES = [None, "zhihu.com", "MAFENGWO.cn ", "never-seen.example"]
NERS: list[list[str]] = [[], ["LOC"], ["PER", "ORG", "NOT_A_TAG"], ["NOT_A_TAG"]]
INDUSTRIES = [None, "旅游", "医疗健康", "不存在的行业"]
MAX_SEQ_LEN = 64


def _model() -> Any:
    torch.manual_seed(3)
    config = transformers.ErnieConfig(
        vocab_size=sum(1 for _ in VOCAB.open(encoding="utf-8")), hidden_size=64, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=128, max_position_embeddings=MAX_SEQ_LEN, type_vocab_size=4,
        use_task_id=True, task_type_vocab_size=3, layer_norm_eps=1e-5)
    encoder = transformers.ErnieModel(config)
    model = torch_reference.ScoringModel(encoder, VOCABS, (16, 8, 8), len(HEADS), 8)
    with torch.no_grad():  # the contract: row 0 (missing) embeds to exact zeros
        for table in (model.site, model.ner, model.industry):
            table.weight[0].zero_()
    return model.eval()


def _requests(n: int) -> list[scoring_pb2.ScoreRequest]:
    pairs = load_pairs(DEFAULT_DATA).pairs[:n]
    out = []
    for i, p in enumerate(pairs):
        req = scoring_pb2.ScoreRequest(query=p.query, ner=NERS[i % 4])
        if i % 3:
            req.title = p.title
        if SITES[i % 4]:
            req.site = SITES[i % 4] or ""
        if INDUSTRIES[(i // 4) % 4]:
            req.industry = INDUSTRIES[(i // 4) % 4] or ""
        out.append(req)
    return out


def _tensors(items: list[EncodedRequest]) -> dict[str, Any]:
    return {k: torch.from_numpy(v) for k, v in pad_batch(items).items()}


def _encode(features: FeatureEncoder, req: scoring_pb2.ScoreRequest) -> EncodedRequest:
    return features.encode(req.query, req.title or None, req.site or None, list(req.ner), req.industry or None)


def _build(model: Any, out: Path, repo: Path, version: int) -> Path:
    paths = torch_reference.export(model, HEADS, VOCAB, out)
    assert build(["--from-hf", str(paths["from_hf"]), "--lookups", str(paths["lookups"]),
                  "--heads-state-dict", str(paths["heads_state_dict"]), "--heads-meta", str(paths["heads_meta"]),
                  "--out", str(repo), "--model", "team", "--version", str(version),
                  "--max-seq-len", str(MAX_SEQ_LEN)]) == 0
    return repo / "team" / str(version)


def test_a_trained_pytorch_model_is_served_exactly_after_a_hot_swap(tmp_path: Path) -> None:
    model = _model()
    repo = tmp_path / "repo"
    _build(model, tmp_path / "v1", repo, 1)
    requests = _requests(200)
    with run_server(repo, "--poll-interval-s", "0.2", "--cache-bytes", "0") as server:
        # Train: a few Adam steps on the public pairs (head 0 learns the pair's label, the others noise).
        v1 = FeatureEncoder(repo / "team" / "1", read_manifest(repo / "team" / "1"))
        rng = np.random.default_rng(0)
        batches = []
        for start in range(0, 96, 16):
            chunk = requests[start:start + 16]
            labels = torch.from_numpy(rng.integers(0, 2, size=(len(chunk), len(HEADS))).astype(np.float32))
            batches.append((_tensors([_encode(v1, r) for r in chunk]), labels))
        with torch.no_grad():
            before = model(**batches[0][0]).numpy()
        losses = torch_reference.train_steps(model, batches)
        with torch.no_grad():
            moved = np.abs(model(**batches[0][0]).numpy() - before).max()
        assert moved > 1e-3, f"training moved the scores by {moved} only"
        assert len(losses) == 6 and all(np.isfinite(losses))
        v2_dir = _build(model, tmp_path / "v2", repo, 2)

        with grpc.insecure_channel(server.target) as channel:
            stub = scoring_pb2_grpc.ScorerStub(channel)  # type: ignore[no-untyped-call]
            deadline = time.monotonic() + 60
            while stub.GetModelInfo(scoring_pb2.ModelInfoRequest(model="team"), timeout=10).version != 2:
                assert time.monotonic() < deadline, "version 2 was never swapped in"
                time.sleep(0.2)
            answers = stub.ScoreBatch(scoring_pb2.ScoreBatchRequest(items=requests), timeout=120).results
    assert all(a.version == 2 for a in answers)
    served = np.array([[a.scores[h.srcid] for h in HEADS] for a in answers])
    v2 = FeatureEncoder(v2_dir, read_manifest(v2_dir))
    with torch.no_grad():
        want = np.concatenate([model(**_tensors([_encode(v2, r) for r in requests[s:s + 50]])).numpy()
                               for s in range(0, len(requests), 50)])
    print(f"served vs PyTorch, 200 pairs x {len(HEADS)} heads: max |diff| {np.abs(served - want).max():.2e}")
    assert np.abs(served - want).max() <= 1e-4, np.abs(served - want).max()
