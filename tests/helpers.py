"""Test helpers shared by the test modules: tiny model versions built in well under a second, ONNX
Runtime sessions on them, and real query/title pairs from QBQTC when the data set is present.

`build_small_model` goes through the production writer (`tools.build_model.writer.write_version`),
so a tiny version is a complete, checksummed, golden-carrying version like the demo one; only the
shapes are small (hidden 32, 2 layers, 2 attention heads, a 2,000-token vocabulary).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from model_format.manifest import MODEL_FILES, EncoderShape, Head
from tools.build_model import demo_vocab
from tools.build_model.tokenizer import SPECIAL_TOKENS, build_tokenizer
from tools.build_model.weights import ModelWeights, random_encoder, random_heads, random_lookups
from tools.build_model.writer import LookupVocabs, write_version

REPO_ROOT = Path(__file__).resolve().parents[1]
ERNIE_VOCAB = REPO_ROOT / "vocab" / "ernie-3.0-zh-vocab.txt"
QBQTC_FILE = REPO_ROOT.parent / "shared" / "data" / "qbqtc_test_public.jsonl"
QBQTC_MISSING = f"QBQTC data set not found at {QBQTC_FILE}"

# The `small_model_factory` fixture (tests/conftest.py): build_small_model's keyword arguments -> version dir.
SmallModelFactory = Callable[..., Path]

# Shapes of every small model. The vocabulary is the first SMALL_VOCAB_LINES lines of the ERNIE
# vocabulary (special tokens, the most common Chinese characters, ASCII letters and digits) plus
# [UNK], so Chinese text tokenizes one character per token as with the real vocabulary.
SMALL_VOCAB_LINES = 2000
SMALL_HIDDEN = 32
SMALL_ATTENTION_HEADS = 2
SMALL_INTERMEDIATE = 64
SMALL_MAX_POSITIONS = 64
SMALL_LOOKUP_DIMS = (8, 4, 4)  # site, NER, industry embedding widths
SMALL_HEAD_HIDDEN = 8
SMALL_NUM_SITES = 40  # demo_vocab.demo_sites(...): the first ones are real sites such as baidu.com
SMALL_MAX_NER_TAGS = 4


def small_vocab_entries() -> list[str]:
    """The tokens of the small models' WordPiece vocabulary, id = position."""
    lines = ERNIE_VOCAB.read_text(encoding="utf-8").split("\n")[:SMALL_VOCAB_LINES]
    entries: list[str] = []
    seen: set[str] = set()
    for line in lines:
        token = line.rstrip("\r")
        if token and token not in seen:
            seen.add(token)
            entries.append(token)
    entries += [t for t in SPECIAL_TOKENS if t not in seen]
    return entries


def build_small_model(
    root: Path,
    *,
    model: str = "tiny",
    version: int = 1,
    num_heads: int = 4,
    srcids: Sequence[int] | None = None,
    seed: int = 0,
    precisions: Sequence[str] = ("fp32",),
    head_seed: int | None = None,
    num_layers: int = 2,
    max_seq_len: int = 32,
) -> Path:
    """Builds and publishes a tiny complete version at `<root>/<model>/<version>/` and returns that path.

    - `num_heads` heads with srcids `srcids` (default 1..num_heads), named `head_<srcid>`, threshold 0.5.
    - `seed` seeds everything; with the same `seed` two builds are byte-identical apart from the
      manifest's model/version. `head_seed` (default: `seed`) seeds only the heads, so versions with
      the same `seed` and different `head_seed` share the bottom (equal `bottom_fingerprint`) and
      differ in their head weights: what a head-merging or hot-swap test needs.
    - `precisions`: "fp32" is always required; "int8" adds model.int8.onnx (about 1 s more).
    - Raises FileExistsError if the version already exists (versions are immutable).

    Building takes about 0.3 s for fp32. Published versions are shared read-only by convention:
    a test that damages a version must copy it first (`shutil.copytree`).
    """
    if srcids is None:
        srcids = list(range(1, num_heads + 1))
    srcids = [int(s) for s in srcids]
    if len(srcids) != num_heads:
        raise ValueError(f"{len(srcids)} srcids for {num_heads} heads")
    entries = small_vocab_entries()
    shape = EncoderShape(
        type="ernie", vocab_size=len(entries), hidden_size=SMALL_HIDDEN, num_layers=num_layers,
        num_attention_heads=SMALL_ATTENTION_HEADS, intermediate_size=SMALL_INTERMEDIATE,
        max_position_embeddings=SMALL_MAX_POSITIONS, type_vocab_size=4, layer_norm_eps=1e-5,
    )
    vocabs = LookupVocabs(
        sites=demo_vocab.demo_sites(SMALL_NUM_SITES, seed),
        ner_tags=demo_vocab.NER_TAGS,
        industries=demo_vocab.INDUSTRIES,
    )
    # Weight scale 0.2: a tiny random encoder with BERT's 0.02 would barely look at its input.
    encoder = random_encoder(shape, seed, std=0.2)
    lookups = random_lookups(vocabs.sizes, SMALL_LOOKUP_DIMS, seed + 1)
    feature_dim = SMALL_HIDDEN + sum(SMALL_LOOKUP_DIMS)
    heads = random_heads(num_heads, feature_dim, SMALL_HEAD_HIDDEN, (seed if head_seed is None else head_seed) + 2)
    with tempfile.TemporaryDirectory(prefix="small-vocab-") as tmp:
        vocab_path = Path(tmp) / "vocab.txt"
        vocab_path.write_text("\n".join(entries) + "\n", encoding="utf-8")
        tokenizer = build_tokenizer(vocab_path)
    return write_version(
        ModelWeights(encoder, lookups, heads),
        [Head(s, f"head_{s}", 0.5) for s in srcids],
        tokenizer,
        vocabs,
        root=root,
        model_name=model,
        version=version,
        max_seq_len=max_seq_len,
        max_ner_tags=SMALL_MAX_NER_TAGS,
        precisions=list(precisions),
        extra={"source": "tests.helpers.build_small_model", "seed": seed},
    )


def cpu_session(version_dir: Path, precision: str = "fp32") -> ort.InferenceSession:
    """A plain CPU ONNX Runtime session on one precision variant of a version (quiet, default threads)."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(version_dir / MODEL_FILES[precision]), so, providers=["CPUExecutionProvider"])


def run_graph(session: ort.InferenceSession, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(scores [B,N], features [B,D]) of one batch."""
    scores, features = session.run(["scores", "features"], inputs)
    return np.asarray(scores), np.asarray(features)


def qbqtc_pairs(n: int) -> list[tuple[str, str]] | None:
    """The first `n` (query, title) pairs of the QBQTC public test set, or None when it is absent.

    Callers skip with `pytest.skip(QBQTC_MISSING)` on None.
    """
    if not QBQTC_FILE.is_file():
        return None
    pairs: list[tuple[str, str]] = []
    with QBQTC_FILE.open(encoding="utf-8") as f:
        for line in f:
            if len(pairs) >= n:
                break
            if line.strip():
                doc = json.loads(line)
                pairs.append((str(doc["query"]), str(doc["title"])))
    return pairs
