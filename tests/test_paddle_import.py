"""`python -m tools.build_model --from-paddle`: a PaddleNLP-style ERNIE checkpoint built without PaddlePaddle.

The checkpoint is written from a randomised `transformers.ErnieModel` in PaddleNLP's names and orientation
(Linear weights [in, out]): with `paddle.save` when PaddlePaddle is installed, else as the same pickle of
numpy arrays `paddle.save` writes. PaddleNLP's own ErnieModel class is not a dependency, so the independent
reference is `transformers.ErnieModel` holding the same weights; the ONNX pooled output must match it within
1e-4 on a padded batch of mixed lengths. The reader refuses a pickle that holds anything but arrays.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from model_format.features import FeatureEncoder, pad_batch
from model_format.manifest import MODEL_FILES, read_manifest
from tests.helpers import REPO_ROOT
from tools.build_model.__main__ import main as build
from tools.build_model.paddle_ckpt import NAME_MAP_KEY, read_pdparams

_REFERENCE = "the reference ERNIE needs torch + transformers: `pip install -r requirements-parity.txt`"
torch = pytest.importorskip("torch", reason=_REFERENCE)
transformers = pytest.importorskip("transformers", reason=_REFERENCE)

VOCAB = REPO_ROOT / "vocab" / "ernie-3.0-zh-vocab.txt"
HIDDEN, LAYERS, HEADS, INTER, POSITIONS = 64, 2, 4, 128, 64


def _paddle_names(hf: dict[str, Any]) -> dict[str, np.ndarray]:
    """transformers ErnieModel state dict -> PaddleNLP ErnieModel's, Linear weights as [in, out]."""
    out: dict[str, np.ndarray] = {}
    emb = {"word_embeddings", "position_embeddings", "token_type_embeddings", "task_type_embeddings"}
    for name in emb:
        out[f"ernie.embeddings.{name}.weight"] = hf[f"embeddings.{name}.weight"].numpy()
    out["ernie.embeddings.layer_norm.weight"] = hf["embeddings.LayerNorm.weight"].numpy()
    out["ernie.embeddings.layer_norm.bias"] = hf["embeddings.LayerNorm.bias"].numpy()
    for i in range(LAYERS):
        src, dst = f"encoder.layer.{i}", f"ernie.encoder.layers.{i}"
        pairs = {"self_attn.q_proj": "attention.self.query", "self_attn.k_proj": "attention.self.key",
                 "self_attn.v_proj": "attention.self.value", "self_attn.out_proj": "attention.output.dense",
                 "linear1": "intermediate.dense", "linear2": "output.dense"}
        for paddle_name, hf_name in pairs.items():
            out[f"{dst}.{paddle_name}.weight"] = hf[f"{src}.{hf_name}.weight"].numpy().T.copy()
            out[f"{dst}.{paddle_name}.bias"] = hf[f"{src}.{hf_name}.bias"].numpy()
        for paddle_name, hf_name in (("norm1", "attention.output.LayerNorm"), ("norm2", "output.LayerNorm")):
            out[f"{dst}.{paddle_name}.weight"] = hf[f"{src}.{hf_name}.weight"].numpy()
            out[f"{dst}.{paddle_name}.bias"] = hf[f"{src}.{hf_name}.bias"].numpy()
    out["ernie.pooler.dense.weight"] = hf["pooler.dense.weight"].numpy().T.copy()
    out["ernie.pooler.dense.bias"] = hf["pooler.dense.bias"].numpy()
    return out


def _save(state: dict[str, np.ndarray], path: Path) -> str:
    try:
        import paddle
    except ImportError:
        with path.open("wb") as fh:  # what paddle.save writes for a state dict: a pickle of arrays and its name map
            pickle.dump({**state, NAME_MAP_KEY: {k: k for k in state}}, fh, protocol=4)
        return "a pickle of numpy arrays in paddle.save's layout (PaddlePaddle is not installed)"
    paddle.save({k: paddle.to_tensor(v) for k, v in state.items()}, str(path))
    return f"paddle.save (PaddlePaddle {getattr(paddle, '__version__', '?')})"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, str]:
    config = transformers.ErnieConfig(
        vocab_size=sum(1 for _ in VOCAB.open(encoding="utf-8")), hidden_size=HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, intermediate_size=INTER, max_position_embeddings=POSITIONS, type_vocab_size=4,
        use_task_id=True, task_type_vocab_size=3, layer_norm_eps=1e-5)
    torch.manual_seed(11)
    reference = transformers.ErnieModel(config)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # every parameter moved off its default, LayerNorm and biases included
        for name, p in reference.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.1 * noise if "LayerNorm.weight" in name else 0.1 * noise)
    reference.eval()
    ckpt = tmp_path_factory.mktemp("paddle") / "ernie-paddle"
    ckpt.mkdir()
    how = _save(_paddle_names(reference.state_dict()), ckpt / "model_state.pdparams")
    (ckpt / "model_config.json").write_text(json.dumps({"init_class": "ErnieModel", "init_args": [{
        "vocab_size": config.vocab_size, "hidden_size": HIDDEN, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "intermediate_size": INTER, "hidden_act": "gelu",
        "max_position_embeddings": POSITIONS, "type_vocab_size": 4, "task_type_vocab_size": 3, "use_task_id": True,
    }]}))
    shutil.copy(VOCAB, ckpt / "vocab.txt")
    (ckpt / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    return ckpt, reference, how


def test_a_paddle_checkpoint_builds_to_the_same_pooled_output(checkpoint: tuple[Path, Any, str],
                                                              tmp_path: Path) -> None:
    ckpt, reference, how = checkpoint
    repo = tmp_path / "repo"
    assert build(["--from-paddle", str(ckpt), "--out", str(repo), "--heads", "2", "--max-seq-len", "64"]) == 0
    version = repo / "ernie-paddle" / "1"
    manifest = read_manifest(version)
    assert manifest.extra["source"] == "paddle:ernie-paddle" and manifest.encoder.layer_norm_eps == 1e-5
    features = FeatureEncoder(version, manifest)
    texts = [("北京旅游攻略", "北京三日游最全攻略"), ("天气", ""), ("感冒发烧吃什么药好得快", "医生说"), ("a", ""),
             ("iPhone 15 Pro 价格", "苹果官网报价与参数配置大全" * 3)]
    batch = pad_batch([features.encode(q, t or None) for q, t in texts])
    so = ort.SessionOptions()
    so.log_severity_level = 3
    session = ort.InferenceSession(str(version / MODEL_FILES["fp32"]), so, providers=["CPUExecutionProvider"])
    ours = session.run(["features"], batch)[0][:, :HIDDEN]
    with torch.inference_mode():
        ref = reference(input_ids=torch.from_numpy(batch["input_ids"]),
                        attention_mask=torch.from_numpy(batch["attention_mask"]),
                        token_type_ids=torch.from_numpy(batch["token_type_ids"])).pooler_output.numpy()
    diff = float(np.abs(ours - ref).max())
    print(f"\n--from-paddle ({how}) vs transformers.ErnieModel with the same weights (PaddleNLP's ErnieModel "
          f"is not installed), padded batch {batch['input_ids'].shape}: max abs diff {diff:.2e}")
    assert float(np.std(ref, axis=0).mean()) > 1e-2  # the output moves with the input: not a vacuous match
    assert diff <= 1e-4


def test_a_pdparams_holding_anything_but_arrays_is_refused(tmp_path: Path) -> None:
    class Exploit:
        def __reduce__(self) -> tuple[Any, tuple[str]]:
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    path = tmp_path / "model_state.pdparams"
    path.write_bytes(pickle.dumps({"ernie.pooler.dense.bias": np.zeros(3, np.float32), "x": Exploit()}))
    with pytest.raises(SystemExit) as err:
        read_pdparams(path)
    assert "refusing" in str(err.value.code) and "system" in str(err.value.code)
    assert not (tmp_path / "pwned").exists()
    path.write_bytes(pickle.dumps({"ernie.a": np.zeros(2), "ernie.b": [1, 2]}))
    with pytest.raises(SystemExit, match=r"'ernie\.b' is a list, not an array"):
        read_pdparams(path)


def test_a_missing_or_misshapen_tensor_is_named(checkpoint: tuple[Path, Any, str], tmp_path: Path) -> None:
    ckpt, _, _ = checkpoint
    state = read_pdparams(ckpt / "model_state.pdparams")
    missing = {k: v for k, v in state.items() if k != "encoder.layers.1.linear2.bias"}
    misshapen = {**state, "pooler.dense.weight": state["pooler.dense.weight"][:, :10]}
    extra = {**state, "classifier.weight": np.zeros((64, 2), np.float32)}
    for broken, message in ((missing, "lacks tensor encoder.layers.1.linear2.bias"),
                            (misshapen, "pooler.dense.weight is (64, 10), expected (64, 64)"),
                            (extra, "not part of the bottom: ['classifier.weight']")):
        bad = tmp_path / f"bad{len(message)}"
        shutil.copytree(ckpt, bad)
        with (bad / "model_state.pdparams").open("wb") as fh:
            pickle.dump(broken, fh)
        with pytest.raises(SystemExit) as err:
            build(["--from-paddle", str(bad), "--out", str(tmp_path / "repo"), "--heads", "1", "--max-seq-len", "64"])
        assert message in str(err.value.code), err.value.code


def _paddle_ernie(paddle: Any, vocab_size: int) -> Any:
    """PaddleNLP's ErnieModel, built from paddle.nn alone (PaddleNLP itself is not a dependency): embeddings with a
    task type, LayerNorm, post-norm nn.TransformerEncoderLayer blocks (exact GELU), a tanh pooler on [CLS]; the
    parameter names are PaddleNLP's."""
    nn = paddle.nn

    class Embeddings(nn.Layer):  # type: ignore[name-defined, misc, unused-ignore]  # paddle is untyped here
        def __init__(self) -> None:
            super().__init__()
            self.word_embeddings = nn.Embedding(vocab_size, HIDDEN)
            self.position_embeddings = nn.Embedding(POSITIONS, HIDDEN)
            self.token_type_embeddings = nn.Embedding(4, HIDDEN)
            self.task_type_embeddings = nn.Embedding(3, HIDDEN)
            self.layer_norm = nn.LayerNorm(HIDDEN)

        def forward(self, ids: Any, types: Any) -> Any:
            positions = paddle.arange(ids.shape[1]).unsqueeze(0)
            task = paddle.zeros_like(ids)
            x = (self.word_embeddings(ids) + self.position_embeddings(positions) + self.token_type_embeddings(types)
                 + self.task_type_embeddings(task))
            return self.layer_norm(x)

    class Ernie(nn.Layer):  # type: ignore[name-defined, misc, unused-ignore]
        def __init__(self) -> None:
            super().__init__()
            self.embeddings = Embeddings()
            layer = nn.TransformerEncoderLayer(HIDDEN, HEADS, INTER, dropout=0.0, activation="gelu",
                                               attn_dropout=0.0, act_dropout=0.0)
            self.encoder = nn.TransformerEncoder(layer, LAYERS)
            self.pooler = nn.Layer()
            self.pooler.dense = nn.Linear(HIDDEN, HIDDEN)

        def forward(self, ids: Any, types: Any, mask: Any) -> Any:
            keep = mask.unsqueeze([1, 2]).astype("float32")
            hidden = self.encoder(self.embeddings(ids, types), src_mask=(keep - 1.0) * 1e4)
            return paddle.tanh(self.pooler.dense(hidden[:, 0]))

    return Ernie()


def test_paddles_own_ernie_saved_by_paddle_save_matches_its_own_forward(tmp_path: Path) -> None:
    paddle = pytest.importorskip("paddle", reason="PaddlePaddle is not installed (`make test` installs "
                                 "requirements-paddle.txt unless PADDLE=0; the transformers-reference test above "
                                 "still covers the conversion)")
    paddle.seed(7)
    vocab_size = sum(1 for _ in VOCAB.open(encoding="utf-8"))
    model = _paddle_ernie(paddle, vocab_size)
    rng = np.random.default_rng(3)
    for name, p in model.named_parameters():  # every parameter off its default, LayerNorm and biases included
        noise = rng.normal(size=p.shape).astype(np.float32)
        p.set_value(1.0 + 0.1 * noise if "norm" in name and name.endswith("weight") else 0.1 * noise)
    model.eval()
    ckpt = tmp_path / "paddle-own"
    ckpt.mkdir()
    paddle.save({f"ernie.{k}": v for k, v in model.state_dict().items()}, str(ckpt / "model_state.pdparams"))
    (ckpt / "model_config.json").write_text(json.dumps({
        "vocab_size": vocab_size, "hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "intermediate_size": INTER, "hidden_act": "gelu", "max_position_embeddings": POSITIONS,
        "type_vocab_size": 4, "task_type_vocab_size": 3, "use_task_id": True}))
    shutil.copy(VOCAB, ckpt / "vocab.txt")
    assert build(["--from-paddle", str(ckpt), "--out", str(tmp_path / "repo"), "--heads", "1",
                  "--max-seq-len", "64"]) == 0
    version = tmp_path / "repo" / "paddle-own" / "1"
    features = FeatureEncoder(version, read_manifest(version))
    batch = pad_batch([features.encode(q, t or None) for q, t in
                       [("北京旅游攻略", "北京三日游最全攻略"), ("天气", ""), ("感冒发烧吃什么药", "医生说" * 5)]])
    so = ort.SessionOptions()
    so.log_severity_level = 3
    session = ort.InferenceSession(str(version / MODEL_FILES["fp32"]), so, providers=["CPUExecutionProvider"])
    ours = session.run(["features"], batch)[0][:, :HIDDEN]
    with paddle.no_grad():
        ref = model(paddle.to_tensor(batch["input_ids"]), paddle.to_tensor(batch["token_type_ids"]),
                    paddle.to_tensor(batch["attention_mask"])).numpy()
    diff = float(np.abs(ours - ref).max())
    print(f"\n--from-paddle vs PaddlePaddle {paddle.__version__}'s own forward (paddle.nn ERNIE, paddle.save), "
          f"padded batch {batch['input_ids'].shape}: max abs diff {diff:.2e}")
    assert float(np.std(ref, axis=0).mean()) > 1e-2
    assert diff <= 1e-4
