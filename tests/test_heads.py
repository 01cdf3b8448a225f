"""Head lifecycle (`python -m tools.heads`): list, merge, replace, remove, train, and a hot swap.

Tiny models (tests.helpers) for the logic; one end-to-end run on the demo model with a real server.
Versions from the session factories are shared: every test copies the version it publishes next to.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from model_format.features import FeatureEncoder, pad_batch
from model_format.manifest import read_manifest, sha256_file
from model_format.repository import check_version
from scoring.v1 import scoring_pb2, scoring_pb2_grpc
from tests.helpers import SmallModelFactory, cpu_session, run_graph
from tests.server_harness import run_server
from tools.build_model.graph import _Graph, _heads
from tools.build_model.weights import HeadWeights, random_heads
from tools.heads.__main__ import main
from tools.heads.data import DataError, read_labeled
from tools.heads.graph_edit import (
    SPLIT_HEADS_OUT,
    non_head_digest,
    read_heads,
    select_heads,
    set_heads,
    stack_heads,
)
from tools.heads.train import choose_threshold, fold, head_scores, roc_auc
from tools.heads.verify import session as verify_session

QUERIES = ["北京旅游攻略", "感冒发烧吃什么药", "阿里巴巴公司地址", "抖音短视频怎么剪辑", "天气", "iPhone 价格",
           "上海 酒店 预订", "高血压 症状", "公司 注册 流程 材料", "电影 推荐"]
TRAVEL = ["旅游", "酒店", "机票", "景点", "攻略", "自由行", "门票", "度假"]
OTHER = ["医院", "感冒", "药", "公司", "法律", "手机", "电脑", "考试"]
PLACES = ["北京", "上海", "三亚", "杭州", "成都", "西安", "广州", "丽江", "厦门", "桂林"]


# --- helpers ---------------------------------------------------------------------------------------

def copy_version(src: Path, repo: Path) -> Path:
    """`src` copied as `<repo>/<model>/<version>` (shared fixture versions are never written to)."""
    dst = repo / src.parent.name / src.name
    shutil.copytree(src, dst)
    return dst


def link_version(src: Path, repo: Path) -> Path:
    """Like copy_version, with hard links where the file system allows (the demo is 400 MB)."""
    dst = repo / src.parent.name / src.name

    def link(a: str, b: str) -> object:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)
        return b

    shutil.copytree(src, dst, copy_function=link)
    return dst


def scores_of(version_dir: Path, queries: list[str], precision: str = "fp32") -> tuple[np.ndarray, np.ndarray]:
    manifest = read_manifest(version_dir)
    enc = FeatureEncoder(version_dir, manifest)
    batch = pad_batch([enc.encode(q, title=f"{q} 标题") for q in queries])
    return run_graph(cpu_session(version_dir, precision), batch)


def staging_leftovers(repo: Path) -> list[Path]:
    return list(repo.glob("*/.staging-*"))


def labeled_rows(n: int, seed: int = 0) -> list[dict[str, object]]:
    """`n` distinct queries (up to 1,280); label 1 when the query is about travel. Learnable from the text."""
    rng = random.Random(seed)
    combos = {label: [f"{p}{a}{b}" for p in PLACES for a in words for b in words]
              for label, words in ((1, TRAVEL), (0, OTHER))}
    for c in combos.values():
        rng.shuffle(c)
    rows: list[dict[str, object]] = []
    for i in range(n):
        label = int(i % 2 == 0)
        q = combos[label][i // 2]
        rows.append({"query": q, "title": f"{q} 相关 信息" if i % 3 else None, "label": label,
                     **({"site": "baidu.com"} if i % 4 == 0 else {})})
    return rows


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return tmp_path / "repo"


# --- graph surgery ---------------------------------------------------------------------------------

def test_set_heads_changes_only_the_heads(small_model_factory: SmallModelFactory) -> None:
    base = small_model_factory(num_heads=4, seed=0)
    model = onnx.load(str(base / "model.onnx"))
    nodes, digest = len(model.graph.node), non_head_digest(model)
    heads = read_heads(model)
    for n in (1, 3, 7):
        picked = select_heads(heads, [i % heads.count for i in range(n)])
        set_heads(model, picked)
        assert len(model.graph.node) == nodes, "the node count must not depend on N"
        assert non_head_digest(model) == digest
        split = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}[SPLIT_HEADS_OUT]
        assert split.tolist() == [0, n, heads.hidden]
        assert model.graph.output[0].type.tensor_type.shape.dim[1].dim_value == n
        onnx.checker.check_model(model)
        got = read_heads(model)
        assert np.array_equal(got.w1[:, : heads.hidden], heads.w1[:, : heads.hidden])


def _heads_only_session(heads: HeadWeights) -> ort.InferenceSession:
    """The graph builder's own head block, fed `features` directly, in a server-like session."""
    g = _Graph()
    g.const("const.axis_last", np.array([-1], np.int64))
    _heads(g, "features", heads)
    d = heads.w1.shape[0]
    graph = onnx.helper.make_graph(
        g.nodes, "heads", [onnx.helper.make_tensor_value_info("features", onnx.TensorProto.FLOAT, ["b", d])],
        [onnx.helper.make_tensor_value_info("scores", onnx.TensorProto.FLOAT, ["b", heads.count])], g.inits)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    return verify_session(model.SerializeToString())


def test_head_columns_do_not_depend_on_n() -> None:
    """The property merging relies on: with the stacked layout, ONNX Runtime's MatMul on [D, N*h] and
    the batched [N, h, 1] MatMul give each head bit-identical scores on the same batch whatever N is
    (demo shapes). Across batch sizes scores may differ in the last bit, with or without merging, so
    every comparison here (and in the tool) is on identical batches."""
    full = random_heads(128, 896, 64, seed=3)
    x = np.random.default_rng(0).standard_normal((33, 896)).astype(np.float32)
    whole = _heads_only_session(full)
    for rows in (33, 7, 1):
        ref = whole.run(["scores"], {"features": x[:rows]})[0]
        for n in (1, 2, 17, 92, 93):
            for first in (0, 128 - n):
                idx = list(range(first, first + n))
                got = _heads_only_session(select_heads(full, idx)).run(["scores"], {"features": x[:rows]})[0]
                assert np.array_equal(got.view(np.uint32), ref[:, idx].view(np.uint32)), (rows, n, first)


# --- list ------------------------------------------------------------------------------------------

def test_list_shows_heads_and_fingerprint(small_model_factory: SmallModelFactory,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    base = small_model_factory(num_heads=3, srcids=[11, 22, 33], seed=0)
    manifest = read_manifest(base)
    assert main(["list", str(base)]) == 0
    out = capsys.readouterr().out
    assert manifest.bottom_fingerprint in out and "complete" in out
    for h in manifest.heads:
        assert str(h.srcid) in out and h.name in out
    assert main(["list", str(base), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [h["srcid"] for h in doc["heads"]] == [11, 22, 33]
    assert doc["bottom_fingerprint"] == manifest.bottom_fingerprint and doc["complete"]


# --- merge -----------------------------------------------------------------------------------------

def test_merge_appends_heads_old_scores_bit_identical(small_model_factory: SmallModelFactory, repo: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    online = copy_version(small_model_factory(num_heads=4, seed=0, precisions=("fp32", "int8")), repo)
    # Same bottom (seed), other heads (head_seed); fp32 only, so the int8 check builds its own reference.
    single = small_model_factory(model="single", num_heads=1, srcids=[900], seed=0, head_seed=5)
    assert main(["merge", str(online), str(single)]) == 0
    out = capsys.readouterr().out
    assert "verify fp32: 4 kept heads bit-identical" in out and "verify int8: 4 kept heads bit-identical" in out
    assert "new head 900" in out

    new = repo / "tiny" / "2"
    assert check_version(new, "tiny", 2).complete
    old_m, new_m, single_m = read_manifest(online), read_manifest(new), read_manifest(single)
    assert new_m.srcids == (*old_m.srcids, 900)
    assert new_m.heads[-1] == single_m.heads[0]
    assert new_m.bottom_fingerprint == old_m.bottom_fingerprint
    assert set(new_m.precisions) == {"fp32", "int8"} and new_m.golden is not None
    assert not staging_leftovers(repo)
    for precision in ("fp32", "int8"):
        a = {t.name: t for t in onnx.load(str(online / old_m.precisions[precision])).graph.initializer}
        b = {t.name: t for t in onnx.load(str(new / new_m.precisions[precision])).graph.initializer}
        assert a.keys() == b.keys()
        for name in a:
            if not name.startswith("heads.") and name != SPLIT_HEADS_OUT:
                assert a[name].SerializeToString() == b[name].SerializeToString(), name
    # An independent check, outside the tool: same batches, other queries than its probes.
    for precision in ("fp32", "int8"):
        before, feats_before = scores_of(online, QUERIES, precision)
        after, feats_after = scores_of(new, QUERIES, precision)
        assert np.array_equal(before.view(np.uint32), after[:, :4].view(np.uint32)), precision
        assert np.array_equal(feats_before.view(np.uint32), feats_after.view(np.uint32))
    alone, _ = scores_of(single, QUERIES)
    after, _ = scores_of(new, QUERIES)
    assert np.abs(alone[:, 0] - after[:, 4]).max() <= 1e-6


def test_merge_into_explicit_out_and_the_out_rules(small_model_factory: SmallModelFactory, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    online = small_model_factory(num_heads=2, seed=0)
    single = small_model_factory(model="single", num_heads=1, srcids=[900], seed=0, head_seed=5)
    out = tmp_path / "elsewhere" / "merged" / "7"
    assert main(["merge", str(online), str(single), "--out", str(out)]) == 0
    assert check_version(out, "merged", 7).complete
    assert read_manifest(out).srcids == (1, 2, 900)
    capsys.readouterr()
    assert main(["merge", str(online), str(single), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["merge", str(online), str(single), "--out", str(tmp_path / "x" / "latest")]) == 2
    assert "<repo>/<model>/<version>" in capsys.readouterr().err


def test_merge_refuses_a_different_bottom_naming_it(small_model_factory: SmallModelFactory, repo: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    online = copy_version(small_model_factory(num_heads=2, seed=0), repo)
    other_bottom = small_model_factory(model="single", num_heads=1, srcids=[900], seed=1)
    assert main(["merge", str(online), str(other_bottom)]) == 2
    err = capsys.readouterr().err
    assert "do not share the bottom" in err and "tensor bottom." in err, err
    longer = small_model_factory(model="single", num_heads=1, srcids=[900], seed=0, max_seq_len=24)
    assert main(["merge", str(online), str(longer)]) == 2
    assert "max_seq_len: 32" in capsys.readouterr().err

    # Same tensors, one vocabulary line changed (checksums updated, so the version is complete).
    changed = copy_version(small_model_factory(model="single", num_heads=1, srcids=[900], seed=0, head_seed=5),
                           repo.parent / "changed")
    vocab = changed / "site_vocab.txt"
    lines = vocab.read_text(encoding="utf-8").split("\n")
    lines[5] = "not-the-same-site.example"
    vocab.write_text("\n".join(lines), encoding="utf-8")
    doc = json.loads((changed / "manifest.json").read_text(encoding="utf-8"))
    doc["sha256"]["site_vocab.txt"] = sha256_file(vocab)
    (changed / "manifest.json").write_text(json.dumps(doc), encoding="utf-8")
    assert main(["merge", str(online), str(changed)]) == 2
    err = capsys.readouterr().err
    assert "site_vocab.txt differs (line 6" in err, err
    assert sorted(p.name for p in (repo / "tiny").iterdir()) == ["1"], "nothing published, nothing left over"


def test_existing_srcid_needs_replace_which_keeps_the_column(small_model_factory: SmallModelFactory, repo: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    online = copy_version(small_model_factory(num_heads=4, seed=0), repo)
    single = small_model_factory(model="single", num_heads=1, srcids=[2], seed=0, head_seed=9)
    assert main(["merge", str(online), str(single)]) == 2
    assert "srcid 2 (head_2) already exists" in capsys.readouterr().err
    assert main(["merge", str(online), str(single), "--replace"]) == 0
    assert "1 replaced [2]" in capsys.readouterr().out
    new = repo / "tiny" / "2"
    assert read_manifest(new).srcids == (1, 2, 3, 4)
    before, _ = scores_of(online, QUERIES)
    after, _ = scores_of(new, QUERIES)
    alone, _ = scores_of(single, QUERIES)
    keep = [0, 2, 3]
    assert np.array_equal(before[:, keep].view(np.uint32), after[:, keep].view(np.uint32))
    assert np.abs(after[:, 1] - alone[:, 0]).max() <= 1e-6
    assert np.abs(after[:, 1] - before[:, 1]).max() > 1e-4, "the head was really replaced"


def test_remove_heads(small_model_factory: SmallModelFactory, repo: Path,
                      capsys: pytest.CaptureFixture[str]) -> None:
    online = copy_version(small_model_factory(num_heads=4, seed=0, precisions=("fp32", "int8")), repo)
    assert main(["remove", str(online), "--srcid", "2", "--srcid", "3"]) == 0
    assert "verify int8: 2 kept heads bit-identical" in capsys.readouterr().out
    new = repo / "tiny" / "2"
    assert read_manifest(new).srcids == (1, 4)
    assert read_manifest(new).bottom_fingerprint == read_manifest(online).bottom_fingerprint
    before, _ = scores_of(online, QUERIES)
    after, _ = scores_of(new, QUERIES)
    assert np.array_equal(before[:, [0, 3]].view(np.uint32), after.view(np.uint32))
    assert main(["remove", str(online), "--srcid", "99"]) == 2
    assert "no head with srcid 99" in capsys.readouterr().err
    assert main(["remove", str(online), *[f"--srcid={s}" for s in (1, 2, 3, 4)]]) == 2
    assert "at least one head" in capsys.readouterr().err


def test_a_failed_verification_publishes_nothing(small_model_factory: SmallModelFactory, repo: Path,
                                                 capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug that moves an old head by a hair (one bias, 1e-6) must fail the merge loudly."""
    online = copy_version(small_model_factory(num_heads=3, seed=0), repo)
    single = small_model_factory(model="single", num_heads=1, srcids=[900], seed=0, head_seed=5)
    real_stack = stack_heads

    def off_by_a_hair(parts: list[tuple[HeadWeights, int]]) -> HeadWeights:
        stacked = real_stack(parts)
        stacked.b2[1] += np.float32(1e-6)
        return stacked

    monkeypatch.setattr("tools.heads.edit.stack_heads", off_by_a_hair)
    assert main(["merge", str(online), str(single)]) == 1
    captured = capsys.readouterr()
    assert "verify fp32: FAILED" in captured.out
    assert "verification FAILED, nothing was published" in captured.err
    assert sorted(p.name for p in (repo / "tiny").iterdir()) == ["1"]


# --- train -----------------------------------------------------------------------------------------

def test_metrics_and_folding() -> None:
    scores = np.array([0.9, 0.8, 0.8, 0.3, 0.2], np.float32)
    labels = np.array([1, 1, 0, 0, 1])
    # pairs (pos, neg): (0.9,0.8)=1 (0.9,0.3)=1 (0.8,0.8)=.5 (0.8,0.3)=1 (0.2,0.8)=0 (0.2,0.3)=0 -> 3.5/6
    assert roc_auc(scores, labels) == pytest.approx(3.5 / 6)
    assert choose_threshold(scores, labels, "f1") == pytest.approx(0.2)  # everything positive: F1 0.75
    assert choose_threshold(scores, labels, "youden") == pytest.approx(0.9)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 6)).astype(np.float32) * 3 + 1
    mu, sd = x.mean(0).astype(np.float64), x.std(0).astype(np.float64)
    from tools.heads.train import _forward, _Params, _sigmoid

    p = _Params(rng.standard_normal((6, 4)).astype(np.float32), rng.standard_normal(4).astype(np.float32),
                rng.standard_normal(4).astype(np.float32), np.array([0.3], np.float32))
    want = _sigmoid(_forward(p, ((x - mu) / sd).astype(np.float32))[2])
    assert np.abs(head_scores(fold(p, mu, sd), x) - want).max() < 1e-5


def test_labeled_data_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"query": "a", "label": 1}\n{"query": "b", "label": 2}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl:2: label must be 0 or 1"):
        read_labeled(path)
    path.write_text('{"query": "a", "label": "1", "ner": "PER"}\n{"query": " ", "label": 0}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r":2: query must be a non-empty string"):
        read_labeled(path)


def test_train_then_merge(small_model_factory: SmallModelFactory, repo: Path, tmp_path: Path,
                          capsys: pytest.CaptureFixture[str]) -> None:
    online = copy_version(small_model_factory(num_heads=3, seed=0, precisions=("fp32", "int8")), repo)
    data = write_jsonl(tmp_path / "labeled.jsonl", labeled_rows(400))
    single = tmp_path / "heads" / "travel" / "1"
    cache = tmp_path / "cache"
    args = ["train", str(online), "--data", str(data), "--srcid", "5001", "--name", "travel", "--cache-dir",
            str(cache), "--quiet"]
    assert main([*args, "--out", str(single)]) == 0
    out = capsys.readouterr().out
    assert "400 distinct requests, 0 from cache, 400 computed" in out
    manifest = read_manifest(single)
    assert check_version(single, "travel", 1).complete
    assert [(h.srcid, h.name) for h in manifest.heads] == [(5001, "travel")]
    assert set(manifest.precisions) == {"fp32", "int8"}
    assert manifest.bottom_fingerprint == read_manifest(online).bottom_fingerprint
    held_out = manifest.extra["held_out"]
    assert held_out["auc"] > 0.9, out
    assert f"AUC {held_out['auc']:.4f}" in out and "precision" in out and "recall" in out
    assert 0.0 <= manifest.heads[0].threshold <= 1.0

    # A second run reads every feature from the cache.
    assert main([*args, "--out", str(tmp_path / "heads" / "travel" / "2"), "--fp32-only"]) == 0
    assert "400 from cache, 0 computed" in capsys.readouterr().out
    assert read_manifest(tmp_path / "heads" / "travel" / "2").precisions == {"fp32": "model.onnx"}

    assert main(["merge", str(online), str(single)]) == 0
    assert "new head 5001 vs its source: max |Δ| 0" in capsys.readouterr().out
    merged = repo / "tiny" / "2"
    assert read_manifest(merged).srcids == (1, 2, 3, 5001)
    scores, _ = scores_of(merged, ["三亚旅游攻略 门票", "医院 感冒 药"])
    assert scores[0, 3] > scores[1, 3]


def test_train_rejects_a_bad_out_before_computing(small_model_factory: SmallModelFactory, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    online = small_model_factory(num_heads=2, seed=0)
    data = write_jsonl(tmp_path / "labeled.jsonl", labeled_rows(20))
    rc = main(["train", str(online), "--data", str(data), "--srcid", "1", "--name", "x", "--out",
               str(tmp_path / "not-a-version"), "--no-cache", "--quiet"])
    assert rc == 2 and "<repo>/<model>/<version>" in capsys.readouterr().err


# --- end to end: demo model, real server, hot swap -----------------------------------------------------

@pytest.mark.slow
def test_new_head_hot_swaps_into_the_demo_model(demo_repo: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    repo = tmp_path / "repo"
    online = link_version(demo_repo / "demo" / "1", repo)
    data = write_jsonl(tmp_path / "labeled.jsonl", labeled_rows(160))
    srcid = 424242
    single = tmp_path / "heads" / "travel" / "1"
    with run_server(repo, "--poll-interval-s", "0.2", "--max-queue-delay-ms", "1") as server:
        with grpc.insecure_channel(server.target) as ch:
            stub = scoring_pb2_grpc.ScorerStub(ch)  # type: ignore[no-untyped-call]
            before = {q: stub.Score(scoring_pb2.ScoreRequest(query=q), timeout=30) for q in QUERIES}
            assert {r.version for r in before.values()} == {1}
            assert main(["train", str(online), "--data", str(data), "--srcid", str(srcid), "--name", "travel",
                         "--out", str(single), "--fp32-only", "--no-cache", "--quiet"]) == 0
            assert main(["merge", str(online), str(single)]) == 0
            out = capsys.readouterr().out
            assert "verify fp32: 92 kept heads bit-identical" in out and "verify int8: 92 kept heads" in out
            deadline = time.monotonic() + 120
            while True:
                resp = stub.Score(scoring_pb2.ScoreRequest(query=QUERIES[0]), timeout=30)
                if resp.version == 2:
                    break
                assert time.monotonic() < deadline, "\n".join(server.log_lines[-20:])
                time.sleep(0.1)
            for q, old in before.items():
                new = stub.Score(scoring_pb2.ScoreRequest(query=q), timeout=30)
                assert new.version == 2 and srcid in new.scores
                assert set(new.scores) == {*old.scores, srcid}
                changed = {s: (old.scores[s], new.scores[s]) for s in old.scores if old.scores[s] != new.scores[s]}
                assert not changed, f"{q}: old srcids changed: {list(changed.items())[:3]}"
        assert server.proc.poll() is None, "no restart"
