"""Importing a team's own model parts with `python -m tools.build_model`: the checkpoint's tokenizer (ids equal
to `transformers`' tokenizer for it), trained look-up tables from files, heads from a PyTorch state dict, and
a clear error naming the file or tensor for every part that does not fit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from bench.kit.data import DEFAULT_DATA, load_pairs
from model_format.features import FeatureEncoder, pad_batch
from model_format.manifest import read_manifest
from tests.helpers import REPO_ROOT, cpu_session, run_graph
from tools.build_model.__main__ import main as build
from tools.build_model.lookups import LookupTableError, lookups_from_dir, write_lookups
from tools.build_model.tokenizer import checkpoint_tokenizer
from tools.build_model.weights import LookupTables
from tools.build_model.writer import LookupVocabs

ERNIE_VOCAB = REPO_ROOT / "vocab" / "ernie-3.0-zh-vocab.txt"
MIXED = ["Hello World", "iPhone15 Pro Max 价格", "ÜBER café naïve", "2026年12月3日", "ｆｕｌｌ　ｗｉｄｔｈ ＡＢＣ",
         "COVID-19 疫苗", "C++ 和 Python3.11", "北京 Beijing 100084", "e.g. U.S.A.", "ABC123def456"]


def texts(n: int) -> list[str]:
    pairs = load_pairs(DEFAULT_DATA).pairs[:n]
    return [*MIXED, *(p.query for p in pairs), *(p.title for p in pairs if p.title)]


@pytest.mark.parametrize("lower", [True, False])
def test_served_token_ids_equal_transformers_tokenizer_for_the_checkpoint(tmp_path: Path, lower: bool) -> None:
    transformers = pytest.importorskip("transformers", reason="the reference tokenizer: requirements-parity.txt")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shutil.copy(ERNIE_VOCAB, ckpt / "vocab.txt")
    (ckpt / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": lower,
                                                            "tokenizer_class": "BertTokenizer"}))
    reference = transformers.AutoTokenizer.from_pretrained(str(ckpt))
    ours, source = checkpoint_tokenizer(ckpt)
    assert f"do_lower_case={lower}" in source
    sample = texts(1000)
    assert len(sample) >= 1000 or not DEFAULT_DATA.is_file()
    want = reference(sample, add_special_tokens=False)["input_ids"]
    got = [e.ids for e in ours.encode_batch(sample, add_special_tokens=False)]
    diffs = [(t, g, w) for t, g, w in zip(sample, got, want, strict=True) if g != w]
    assert not diffs, diffs[:3]
    # A checkpoint's own tokenizer.json is taken as it is.
    ours.save(str(ckpt / "tokenizer.json"))
    again, source = checkpoint_tokenizer(ckpt)
    assert source == "tokenizer.json" and again.encode(MIXED[2]).ids == ours.encode(MIXED[2]).ids


def _tables(rng: np.random.Generator) -> tuple[LookupVocabs, LookupTables]:
    vocabs = LookupVocabs(sites=["baidu.com", "zhihu.com", "mafengwo.cn"], ner_tags=["LOC", "PER"],
                          industries=["旅游", "医疗"])
    tables = [rng.normal(size=(n, d)).astype(np.float32) for n, d in zip(vocabs.sizes, (16, 8, 4), strict=True)]
    for t in tables:
        t[0] = 0.0
    return vocabs, LookupTables(*tables)


def _heads_state_dict(rng: np.random.Generator, n: int, dim: int, hidden: int) -> dict[str, np.ndarray]:
    sd = {}
    for i in range(n):
        sd[f"heads.{i}.0.weight"] = rng.normal(scale=0.05, size=(hidden, dim)).astype(np.float32)
        sd[f"heads.{i}.0.bias"] = rng.normal(scale=0.1, size=(hidden,)).astype(np.float32)
        sd[f"heads.{i}.2.weight"] = rng.normal(scale=0.3, size=(1, hidden)).astype(np.float32)
        sd[f"heads.{i}.2.bias"] = rng.normal(scale=0.1, size=(1,)).astype(np.float32)
    return sd


def test_lookups_and_heads_from_files_are_served_exactly(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    vocabs, tables = _tables(rng)
    write_lookups(tmp_path / "lookups", vocabs, tables)
    dim = 768 + 16 + 8 + 4
    sd = _heads_state_dict(rng, 3, dim, 6)
    save_file(sd, str(tmp_path / "heads.safetensors"))
    meta = [{"srcid": 501, "name": "travel", "threshold": 0.4}, {"srcid": 502, "name": "medical"},
            {"srcid": 503, "name": "video", "threshold": 0.7}]
    (tmp_path / "heads.json").write_text(json.dumps(meta))
    assert build(["--demo", "--out", str(tmp_path / "repo"), "--model", "team", "--lookups", str(tmp_path / "lookups"),
                  "--heads-state-dict", str(tmp_path / "heads.safetensors"),
                  "--heads-meta", str(tmp_path / "heads.json")]) == 0
    version = tmp_path / "repo" / "team" / "1"
    manifest = read_manifest(version)
    assert [(h.srcid, h.name, h.threshold) for h in manifest.heads] == [(501, "travel", 0.4), (502, "medical", 0.5),
                                                                         (503, "video", 0.7)]
    assert (manifest.site.dim, manifest.ner.dim, manifest.industry.dim) == (16, 8, 4)
    features = FeatureEncoder(version, manifest)
    items = [features.encode("北京旅游", "攻略", "ZhiHu.com ", ["LOC", "PER", "NOPE"], "旅游"),
             features.encode("感冒", None, None, [], None),
             features.encode("天气", None, "never-seen.example", ["NOPE"], "不存在")]
    scores, feats = run_graph(cpu_session(version), pad_batch(items))
    hidden = 768
    site, ner, industry = (feats[:, hidden:hidden + 16], feats[:, hidden + 16:hidden + 24], feats[:, hidden + 24:])
    np.testing.assert_array_equal(site[0], tables.site[3])  # zhihu.com, matched case- and space-insensitively
    np.testing.assert_allclose(ner[0], (tables.ner[2] + tables.ner[3] + tables.ner[1]) / 3, atol=1e-6)
    np.testing.assert_array_equal(industry[0], tables.industry[2])
    assert not site[1].any() and not ner[1].any() and not industry[1].any()  # missing: exact zeros
    np.testing.assert_array_equal(site[2], tables.site[1])  # unknown: the [UNK] row
    np.testing.assert_array_equal(industry[2], tables.industry[1])
    for i in range(3):  # every head as the PyTorch module computes it, from the graph's own features
        h = np.maximum(feats @ sd[f"heads.{i}.0.weight"].T + sd[f"heads.{i}.0.bias"], 0.0)
        want = 1.0 / (1.0 + np.exp(-(h @ sd[f"heads.{i}.2.weight"].T + sd[f"heads.{i}.2.bias"])))
        np.testing.assert_allclose(scores[:, i], want[:, 0], atol=1e-6)
    assert json.loads((version / "manifest.json").read_text())["extra"]["lookups"] == "files: lookups"


def test_a_lookup_table_that_does_not_fit_is_refused_naming_the_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    vocabs, tables = _tables(rng)

    def refused(vocabs: LookupVocabs, tables: LookupTables) -> str:
        shutil.rmtree(tmp_path / "l", ignore_errors=True)
        write_lookups(tmp_path / "l", vocabs, tables)
        with pytest.raises(LookupTableError) as err:
            lookups_from_dir(tmp_path / "l")
        return str(err.value)

    dup = LookupVocabs(sites=["baidu.com", "Baidu.com ", "x.cn"], ner_tags=vocabs.ner_tags,
                       industries=vocabs.industries)
    assert "site_vocab.txt" in (m := refused(dup, tables)) and "unique" in m
    short = LookupTables(tables.site[:-1], tables.ner, tables.industry)
    assert "site.npy" in (m := refused(vocabs, short)) and "4 rows for the 5 lines" in m
    dirty = LookupTables(tables.site, tables.ner.copy(), tables.industry)
    dirty.ner[0, 0] = 0.5
    assert "ner.npy" in (m := refused(vocabs, dirty)) and "row 0" in m
    write_lookups(tmp_path / "l", vocabs, tables)
    assert lookups_from_dir(tmp_path / "l")[0] == vocabs
    (tmp_path / "l" / "industry.npy").unlink()
    with pytest.raises(LookupTableError, match=r"industry\.npy: missing"):
        lookups_from_dir(tmp_path / "l")


def test_heads_that_do_not_fit_are_refused_naming_the_tensor(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    dim = 768 + 64 + 32 + 32  # the demo's look-ups
    meta = tmp_path / "heads.csv"
    meta.write_text("srcid,name,threshold\n7,a,0.5\n8,b,\n")

    def refused(sd: dict[str, np.ndarray]) -> str:
        save_file(sd, str(tmp_path / "h.safetensors"))
        with pytest.raises(SystemExit) as err:
            build(["--demo", "--out", str(tmp_path / "repo"), "--heads-state-dict", str(tmp_path / "h.safetensors"),
                   "--heads-meta", str(meta)])
        return str(err.value.code)

    good = _heads_state_dict(rng, 2, dim, 4)
    missing = {k: v for k, v in good.items() if k != "heads.1.2.bias"}
    assert "missing ['heads.1.2.bias']" in refused(missing)
    assert "extra ['heads.2.0.weight']" in refused({**good, "heads.2.0.weight": good["heads.0.0.weight"]})
    bad = {**good, "heads.1.0.weight": good["heads.1.0.weight"][:, :10]}
    assert "heads.1.0.weight is float32 (4, 10), expected float (4, 896)" in refused(bad)
    assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").rglob("manifest.json"))


def test_a_hugging_face_checkpoint_with_extra_or_misshapen_tensors_is_refused_naming_them(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers", reason="builds the checkpoint: requirements-parity.txt")
    config = transformers.ErnieConfig(vocab_size=sum(1 for _ in ERNIE_VOCAB.open(encoding="utf-8")), hidden_size=32,
                                      num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                      max_position_embeddings=64, type_vocab_size=4)
    ckpt = tmp_path / "ckpt"
    transformers.ErnieModel(config).save_pretrained(str(ckpt))
    shutil.copy(ERNIE_VOCAB, ckpt / "vocab.txt")
    from safetensors.numpy import load_file

    tensors = load_file(str(ckpt / "model.safetensors"))

    def refused(state: dict[str, np.ndarray]) -> str:
        save_file(state, str(ckpt / "model.safetensors"))
        with pytest.raises(SystemExit) as err:
            build(["--from-hf", str(ckpt), "--out", str(tmp_path / "repo"), "--heads", "1", "--max-seq-len", "64"])
        return str(err.value.code)

    classifier = {"classifier.weight": np.zeros((2, 32), np.float32), "classifier.bias": np.zeros(2, np.float32)}
    assert "not part of the bottom: ['classifier.bias', 'classifier.weight']" in refused({**tensors, **classifier})
    narrow = {**tensors, "pooler.dense.weight": tensors["pooler.dense.weight"][:, :16].copy()}
    assert "pooler.dense.weight is (32, 16), expected (32, 32) from config.json" in refused(narrow)
    save_file(tensors, str(ckpt / "model.safetensors"))
    assert build(["--from-hf", str(ckpt), "--out", str(tmp_path / "repo"), "--heads", "1", "--max-seq-len", "64"]) == 0
