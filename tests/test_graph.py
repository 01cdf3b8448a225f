"""The graph the builder writes (model_repo/README.md is the spec): its input/output contract, the
stacked heads (O(1) nodes in the number of heads), and the look-up features inside the graph
(missing is an exact zero vector, by mask; NER padding changes nothing). Tiny models only.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from model_format.features import UNKNOWN_ID, FeatureEncoder, pad_batch
from model_format.manifest import MODEL_FILES, Manifest
from tests.helpers import SMALL_HEAD_HIDDEN, SMALL_HIDDEN, SMALL_LOOKUP_DIMS, SmallModelFactory, run_graph
from tests.model_format_helpers import BATCH_TOL, SYNTHETIC, feature_slices, id_inputs, initializer
from tools.build_model.graph import INPUT_NAMES, OPSET, OUTPUT_NAMES

NER_TOL = 1e-6



# --- the graph is O(1) in the number of heads ---------------------------------------------------

def test_node_count_does_not_depend_on_head_count(small_model_factory: SmallModelFactory) -> None:
    counts: dict[int, Counter[str]] = {}
    d = SMALL_HIDDEN + sum(SMALL_LOOKUP_DIMS)
    h = SMALL_HEAD_HIDDEN
    for n in (1, 5, 50):
        model = onnx.load(str(small_model_factory(num_heads=n) / MODEL_FILES["fp32"]))
        counts[n] = Counter(node.op_type for node in model.graph.node)
        # Stacked heads: one [D, N*h] MatMul weight, one batched [N, h, 1] MatMul weight.
        assert initializer(model, "heads.w1").shape == (d, n * h)
        assert initializer(model, "heads.b1").shape == (n * h,)
        assert initializer(model, "heads.w2").shape == (n, h, 1)
        assert initializer(model, "heads.b2").shape == (n,)
        assert sorted(i.name for i in model.graph.initializer if i.name.startswith("heads.")) == [
            "heads.b1", "heads.b2", "heads.w1", "heads.w2"]
    assert sum(counts[1].values()) == sum(counts[5].values()) == sum(counts[50].values())
    assert counts[1] == counts[5] == counts[50]


def test_scores_are_the_stacked_heads_of_features(tiny_graph: onnx.ModelProto, tiny_session: ort.InferenceSession,
                                                  tiny_manifest: Manifest) -> None:
    """Column i of `scores` is head i: sigmoid(relu(f @ w1[:, i*h:(i+1)*h] + b1) @ w2[i] + b2[i])."""
    scores, features = run_graph(tiny_session, id_inputs([2, 0], [[3, 0], [0, 0]], [4, 0]))
    w1, b1 = initializer(tiny_graph, "heads.w1"), initializer(tiny_graph, "heads.b1")
    w2, b2 = initializer(tiny_graph, "heads.w2"), initializer(tiny_graph, "heads.b2")
    h = tiny_manifest.head_hidden
    f = features.astype(np.float64)
    for i in range(len(tiny_manifest.heads)):
        hidden = np.maximum(f @ w1[:, i * h:(i + 1) * h] + b1[i * h:(i + 1) * h], 0.0)
        want = 1.0 / (1.0 + np.exp(-(hidden @ w2[i, :, 0] + b2[i])))
        np.testing.assert_allclose(scores[:, i], want, atol=1e-6)


# --- the graph contract -------------------------------------------------------------------------

def test_graph_contract(tiny_graph: onnx.ModelProto, tiny_session: ort.InferenceSession,
                        tiny_manifest: Manifest, tiny_features: FeatureEncoder) -> None:
    assert tiny_graph.ir_version == 8
    assert [(o.domain, o.version) for o in tiny_graph.opset_import] == [("", OPSET)]
    assert [i.name for i in tiny_session.get_inputs()] == list(INPUT_NAMES)
    assert all(i.type == "tensor(int64)" for i in tiny_session.get_inputs())
    assert [o.name for o in tiny_session.get_outputs()] == list(OUTPUT_NAMES)
    assert all(o.type == "tensor(float)" for o in tiny_session.get_outputs())
    ranks = {i.name: len(i.shape) for i in tiny_session.get_inputs()}
    assert ranks == {"input_ids": 2, "attention_mask": 2, "token_type_ids": 2, "site_id": 1, "ner_ids": 2,
                     "industry_id": 1}
    # No initializer outside the documented prefixes.
    assert all(i.name.split(".")[0] in {"bottom", "heads", "const"} for i in tiny_graph.graph.initializer)

    n = len(tiny_manifest.heads)
    d = tiny_manifest.feature_dim
    assert d == tiny_manifest.encoder.hidden_size + tiny_manifest.site.dim + tiny_manifest.ner.dim + \
        tiny_manifest.industry.dim == SMALL_HIDDEN + sum(SMALL_LOOKUP_DIMS)
    encoded = [tiny_features.encode(q, t, s, n_, i) for q, t, s, n_, i in SYNTHETIC]
    scores, features = run_graph(tiny_session, pad_batch(encoded))
    assert scores.shape == (len(SYNTHETIC), n) and scores.dtype == np.float32
    assert features.shape == (len(SYNTHETIC), d) and features.dtype == np.float32
    assert np.all((scores >= 0.0) & (scores <= 1.0))
    assert np.isfinite(features).all()
    # The scores move with the input (a graph that ignores its input would pass the checks above).
    assert np.ptp(scores, axis=0).min() > 1e-3


# --- look-up features: missing is an exact zero vector ------------------------------------------

def test_missing_lookups_are_exact_zeros_and_present_ones_are_table_rows(
        tiny_graph: onnx.ModelProto, tiny_session: ort.InferenceSession, tiny_manifest: Manifest) -> None:
    sl = feature_slices(tiny_manifest)
    site_t = initializer(tiny_graph, "bottom.site.embedding")
    ner_t = initializer(tiny_graph, "bottom.ner.embedding")
    ind_t = initializer(tiny_graph, "bottom.industry.embedding")
    # row 0: everything missing; row 1: known ids; row 2: unknown ids (1).
    _, f = run_graph(tiny_session, id_inputs([0, 5, UNKNOWN_ID], [[0, 0, 0, 0], [5, 7, 0, 0], [1, 0, 0, 0]],
                                             [0, 3, UNKNOWN_ID]))
    for name in ("site", "ner", "industry"):
        assert np.all(f[0, sl[name]] == 0.0), f"{name} missing must give exact zeros"
        assert np.abs(f[1, sl[name]]).max() > 0.0, f"{name} present must not be zero"
        assert np.abs(f[2, sl[name]]).max() > 0.0, f"{name} unknown (id 1) is a learned row, not zero"
    np.testing.assert_allclose(f[1, sl["site"]], site_t[5], atol=1e-7)
    np.testing.assert_allclose(f[2, sl["site"]], site_t[1], atol=1e-7)
    np.testing.assert_allclose(f[1, sl["industry"]], ind_t[3], atol=1e-7)
    np.testing.assert_allclose(f[1, sl["ner"]], ner_t[[5, 7]].mean(axis=0), atol=NER_TOL)
    np.testing.assert_allclose(f[2, sl["ner"]], ner_t[1], atol=NER_TOL)
    # The look-ups do not leak into the pooled text part.
    np.testing.assert_allclose(f[1, sl["pooled"]], f[0, sl["pooled"]], atol=1e-6)


def test_missing_is_zero_by_mask_not_by_table_row(tiny_graph: onnx.ModelProto, tiny_manifest: Manifest) -> None:
    """README: zero because the graph multiplies by `id != 0`, not because row 0 happens to be zero."""
    model = onnx.ModelProto()
    model.CopyFrom(tiny_graph)
    for init in model.graph.initializer:
        if init.name in ("bottom.site.embedding", "bottom.ner.embedding", "bottom.industry.embedding"):
            table = numpy_helper.to_array(init).copy()
            table[0] = 3.0
            init.CopyFrom(numpy_helper.from_array(table, init.name))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    _, f = run_graph(session, id_inputs([0, 0], [[0, 0], [4, 0]], [0, 0]))
    sl = feature_slices(tiny_manifest)
    for name in ("site", "ner", "industry"):
        assert np.all(f[0, sl[name]] == 0.0), name
    ner_t = initializer(tiny_graph, "bottom.ner.embedding")
    np.testing.assert_allclose(f[1, sl["ner"]], ner_t[4], atol=NER_TOL)  # padding rows (=3.0) not averaged in


@pytest.mark.parametrize("padded", [[5, 7, 0, 0], [5, 7, 0], [0, 5, 0, 7], [7, 5]])
def test_ner_padding_does_not_change_the_result(tiny_session: ort.InferenceSession, tiny_manifest: Manifest,
                                                padded: list[int]) -> None:
    want_scores, want_f = run_graph(tiny_session, id_inputs([3], [[5, 7]], [2]))
    scores, f = run_graph(tiny_session, id_inputs([3], [padded], [2]))
    ner = feature_slices(tiny_manifest)["ner"]
    np.testing.assert_allclose(f[0, ner], want_f[0, ner], atol=NER_TOL)
    np.testing.assert_allclose(scores, want_scores, atol=BATCH_TOL)
