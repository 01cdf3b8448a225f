"""Numerics parity: the ONNX bottom that `python -m tools.build_model --from-hf` writes computes the same
pooled output as the reference Hugging Face model (`transformers.ErnieModel` / `BertModel`) in fp32.

A small random checkpoint (hidden 64, 3 layers, 4 attention heads) is saved with `save_pretrained`, built
into a model version through the builder's CLI entry point, and both are run on one padded batch of mixed
lengths (query/title pairs, token types 0/1). Every parameter is randomised, LayerNorm and biases
included: transformers' default init leaves biases at 0 and LayerNorm at identity, which would hide a
transposed bias, a swapped LayerNorm or a missing task-type embedding.

Only this module needs PyTorch and transformers; building and serving never import them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from model_format.features import EncodedRequest, pad_batch
from model_format.manifest import MODEL_FILES, read_manifest

_REFERENCE = (
    "the HF parity test needs PyTorch + transformers as the reference implementation: "
    "`pip install -r requirements-parity.txt` (torch==2.13.0 transformers); building and serving never need them"
)
torch = pytest.importorskip("torch", reason=_REFERENCE)
transformers = pytest.importorskip("transformers", reason=_REFERENCE)

REPO_ROOT = Path(__file__).resolve().parents[1]
ERNIE_VOCAB = REPO_ROOT / "vocab" / "ernie-3.0-zh-vocab.txt"
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
VOCAB_LINES = 1000  # the head of the real vocabulary ([PAD] [CLS] [SEP] [MASK], common characters) + [UNK]

HIDDEN, LAYERS, ATTENTION_HEADS, INTERMEDIATE, MAX_POSITIONS = 64, 3, 4, 128, 64
MAX_SEQ_LEN = 48
LENGTHS = (3, 40, 17, 4, 29, 11, 40, 6, 23, 5)  # the padded batch: mixed lengths, two at the maximum
WEIGHT_STD = 0.1  # every weight and bias; LayerNorm weights are 1 + normal(0, LN_STD)
LN_STD = 0.1

PARITY_TOL = 1e-4  # ONNX bottom vs transformers, fp32, padded batch
BATCH_TOL = 1e-5  # one request alone (batch of 1, unpadded) vs its row in the padded batch


@dataclass(frozen=True)
class Case:
    name: str
    model_cls: str
    config_cls: str
    config: dict[str, Any]


CASES = [
    # ERNIE 3.0 layout: 4 token types, a task-type embedding (folded into token types by the builder),
    # LayerNorm eps 1e-5.
    Case("ernie", "ErnieModel", "ErnieConfig",
         {"type_vocab_size": 4, "use_task_id": True, "task_type_vocab_size": 3, "layer_norm_eps": 1e-5}),
    # Plain BERT: no task type; an eps far from BERT's 1e-12 so a graph that ignored it would fail.
    Case("bert", "BertModel", "BertConfig", {"type_vocab_size": 2, "layer_norm_eps": 1e-3}),
]


@dataclass
class Built:
    case: Case
    version_dir: Path
    reference: Any  # the transformers model, reloaded from the checkpoint with from_pretrained
    batch: dict[str, np.ndarray]
    items: list[EncodedRequest]


def _write_vocab(path: Path) -> list[str]:
    entries: list[str] = []
    for line in ERNIE_VOCAB.read_text(encoding="utf-8").split("\n")[:VOCAB_LINES]:
        token = line.rstrip("\r")
        if token and token not in entries:
            entries.append(token)
    entries += [t for t in SPECIAL_TOKENS if t not in entries]
    path.write_text("\n".join(entries) + "\n", encoding="utf-8")
    return entries


def _randomise(model: Any, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            if "LayerNorm.weight" in name:
                p.copy_(1.0 + LN_STD * noise)
            else:
                p.copy_(WEIGHT_STD * noise)


def _requests(vocab: list[str], seed: int) -> list[EncodedRequest]:
    """`[CLS] query [SEP] title [SEP]` of random ordinary tokens, token types 0 then 1; no look-ups."""
    rng = np.random.default_rng(seed)
    cls, sep = vocab.index("[CLS]"), vocab.index("[SEP]")
    ordinary = np.array([i for i, t in enumerate(vocab) if t not in SPECIAL_TOKENS])
    items = []
    for n in LENGTHS:
        if n <= 4:
            q_len, t_len = n - 2, 0
        else:
            q_len = int(rng.integers(1, n - 3))
            t_len = n - 3 - q_len
        q, t = rng.choice(ordinary, q_len).tolist(), rng.choice(ordinary, t_len).tolist()
        ids = [cls, *q, sep] + ([*t, sep] if t_len else [])
        types = [0] * (q_len + 2) + [1] * (t_len + 1 if t_len else 0)
        assert len(ids) == len(types) == n
        items.append(EncodedRequest(tuple(ids), tuple(types), site_id=0, ner_ids=(), industry_id=0))
    return items


@pytest.fixture(scope="module", params=CASES, ids=[c.name for c in CASES])
def built(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Built:
    case: Case = request.param
    from tools.build_model.__main__ import main

    ckpt = tmp_path_factory.mktemp(f"hf-{case.name}")
    vocab = _write_vocab(ckpt / "vocab.txt")
    config = getattr(transformers, case.config_cls)(
        vocab_size=len(vocab), hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=ATTENTION_HEADS,
        intermediate_size=INTERMEDIATE, max_position_embeddings=MAX_POSITIONS, hidden_act="gelu",
        pad_token_id=vocab.index("[PAD]"), **case.config,
    )
    torch.manual_seed(20261124)
    model = getattr(transformers, case.model_cls)(config)
    _randomise(model, seed=7)
    model.eval()
    model.save_pretrained(ckpt, safe_serialization=True)
    assert (ckpt / "model.safetensors").is_file()

    repo = tmp_path_factory.mktemp(f"repo-{case.name}")
    rc = main(["--from-hf", str(ckpt), "--out", str(repo), "--model", case.name, "--heads", "3",
               "--max-seq-len", str(MAX_SEQ_LEN), "--num-sites", "50"])
    assert rc == 0
    version_dir = repo / case.name / "1"
    manifest = read_manifest(version_dir)
    assert manifest.encoder.type == config.model_type
    assert manifest.encoder.hidden_size == HIDDEN
    assert manifest.encoder.layer_norm_eps == pytest.approx(config.layer_norm_eps)

    # The reference is what transformers itself reads back from the checkpoint folder, in plain
    # (eager) attention: the textbook computation, no fused kernel in the way.
    reference = getattr(transformers, case.model_cls).from_pretrained(ckpt, attn_implementation="eager").eval()
    items = _requests(vocab, seed=11)
    return Built(case, version_dir, reference, pad_batch(items), items)


def _session(version_dir: Path) -> Any:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(version_dir / MODEL_FILES["fp32"]), so, providers=["CPUExecutionProvider"])


def _pooled_onnx(session: Any, batch: dict[str, np.ndarray]) -> np.ndarray:
    features = session.run(["features"], batch)[0]
    return np.asarray(features[:, :HIDDEN], dtype=np.float32)


def _pooled_hf(model: Any, batch: dict[str, np.ndarray], **extra: Any) -> np.ndarray:
    with torch.inference_mode():
        out = model(
            input_ids=torch.from_numpy(batch["input_ids"]),
            attention_mask=torch.from_numpy(batch["attention_mask"]),
            token_type_ids=torch.from_numpy(batch["token_type_ids"]),
            **extra,
        )
    return np.asarray(out.pooler_output.float().numpy(), dtype=np.float32)


def test_pooled_output_matches_transformers(built: Built) -> None:
    batch = built.batch
    assert batch["input_ids"].shape == (len(LENGTHS), max(LENGTHS))
    assert int(batch["attention_mask"].sum()) == sum(LENGTHS)
    assert set(np.unique(batch["token_type_ids"]).tolist()) == {0, 1}
    session = _session(built.version_dir)
    ours = _pooled_onnx(session, batch)
    ref = _pooled_hf(built.reference, batch)
    assert ours.shape == ref.shape == (len(LENGTHS), HIDDEN)

    diff = float(np.max(np.abs(ours - ref)))
    spread = float(np.std(ref, axis=0).mean())
    print(f"\n[{built.case.name}] ONNX vs transformers.{built.case.model_cls} pooled output, "
          f"fp32, padded batch {batch['input_ids'].shape}: max abs diff {diff:.3e} "
          f"(tolerance {PARITY_TOL:g}; mean per-unit spread across rows {spread:.3f})")
    # Not a vacuous comparison: the pooled outputs move with the input well beyond the tolerance.
    assert spread > 100 * PARITY_TOL, f"pooled outputs barely depend on the input (spread {spread:.2e})"
    assert diff <= PARITY_TOL, f"max abs diff {diff:.3e} exceeds {PARITY_TOL:g}"
    # The look-up part of the features is exactly zero for missing site/NER/industry.
    assert not np.any(session.run(["features"], batch)[0][:, HIDDEN:])


@pytest.mark.parametrize("built", [c for c in CASES if c.config.get("use_task_id")], ids=lambda c: c.name,
                         indirect=True)
def test_task_type_embedding_is_folded_in(built: Built) -> None:
    """The graph has no task-type input; ERNIE's default task type 0 must be part of its token types."""
    batch = built.batch
    ref0 = _pooled_hf(built.reference, batch)
    ref1 = _pooled_hf(built.reference, batch, task_type_ids=torch.ones_like(torch.from_numpy(batch["input_ids"])))
    # Task type 1 gives a clearly different output, so matching task type 0 within PARITY_TOL means the
    # builder folded in the right row, not no row.
    assert float(np.max(np.abs(ref1 - ref0))) > 100 * PARITY_TOL
    assert float(np.max(np.abs(_pooled_onnx(_session(built.version_dir), batch) - ref0))) <= PARITY_TOL


def test_padding_does_not_leak(built: Built) -> None:
    session = _session(built.version_dir)
    padded = _pooled_onnx(session, built.batch)
    worst = 0.0
    for row, item in enumerate(built.items):
        alone = pad_batch([item])
        assert alone["input_ids"].shape == (1, item.length) and alone["attention_mask"].all()
        diff = float(np.max(np.abs(_pooled_onnx(session, alone)[0] - padded[row])))
        assert diff <= BATCH_TOL, f"row {row} (length {item.length}): alone vs padded differs by {diff:.3e}"
        worst = max(worst, diff)
    print(f"\n[{built.case.name}] one request alone vs its row in the padded batch: max abs diff {worst:.3e} "
          f"(tolerance {BATCH_TOL:g})")
