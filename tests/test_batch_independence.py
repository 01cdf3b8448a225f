"""Batch independence: a request's fp32 scores do not depend on its batch companions (padding,
order, mixed lengths), on the tiny model and on the demo model; int8's do, within the golden int8
tolerance the server checks versions with.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from model_format.features import EncodedRequest, FeatureEncoder, pad_batch
from tests.helpers import cpu_session, qbqtc_pairs, run_graph
from tests.model_format_helpers import BATCH_TOL, SYNTHETIC
from tools.build_model.golden import TOLERANCE

# --- batch independence -------------------------------------------------------------------------

def mixed_requests(features: FeatureEncoder, n_real: int) -> list[EncodedRequest]:
    out = [features.encode(q, t, s, n, i) for q, t, s, n, i in SYNTHETIC]
    pairs = qbqtc_pairs(n_real) or []
    for k, (q, t) in enumerate(pairs):
        out.append(features.encode(q, t if k % 3 else None, "baidu.com" if k % 2 else None,
                                   ("LOC", "PER")[: k % 3], "旅游" if k % 4 == 0 else None))
    return out


def alone_vs_batched(session: ort.InferenceSession, encoded: list[EncodedRequest]) -> tuple[float, float]:
    """Largest |alone - batched| of scores and of features, over two batch orders."""
    alone = [run_graph(session, pad_batch([e])) for e in encoded]
    s_alone = np.concatenate([a[0] for a in alone])
    f_alone = np.concatenate([a[1] for a in alone])
    s_diff = f_diff = 0.0
    for order in (list(range(len(encoded))), sorted(range(len(encoded)), key=lambda i: -encoded[i].length)):
        s_b, f_b = run_graph(session, pad_batch([encoded[i] for i in order]))
        s_diff = max(s_diff, float(np.abs(s_b - s_alone[order]).max()))
        f_diff = max(f_diff, float(np.abs(f_b - f_alone[order]).max()))
    return s_diff, f_diff


def test_scores_do_not_depend_on_batch_companions(tiny_session: ort.InferenceSession,
                                                  tiny_features: FeatureEncoder) -> None:
    encoded = mixed_requests(tiny_features, 27)
    assert len({e.length for e in encoded}) > 3, "the batch must mix lengths"
    s_diff, f_diff = alone_vs_batched(tiny_session, encoded)
    print(f"tiny fp32 alone vs batched: scores {s_diff:.2e}, features {f_diff:.2e}")
    assert s_diff <= BATCH_TOL and f_diff <= BATCH_TOL


# --- the demo model: fp32 batch independence, int8 batch dependence --------------------------------

def test_demo_fp32_does_not_depend_on_batch_companions(demo_version: Path, demo_features: FeatureEncoder) -> None:
    s_diff, f_diff = alone_vs_batched(cpu_session(demo_version), mixed_requests(demo_features, 11))
    print(f"demo fp32 alone vs batched: scores {s_diff:.2e}, features {f_diff:.2e}")
    assert s_diff <= BATCH_TOL and f_diff <= BATCH_TOL


def test_int8_batch_dependence_stays_within_golden_tolerance(demo_version: Path,
                                                              demo_features: FeatureEncoder) -> None:
    """Dynamic int8 quantization takes one activation scale per tensor, so a request's int8 scores move
    with its batch companions (fp32 does not). Bound it by the golden int8 tolerance the server uses."""
    if "int8" not in demo_features.manifest.precisions:
        pytest.skip(f"{demo_version} has no int8 variant (build it with --precision int8)")
    s_diff, f_diff = alone_vs_batched(cpu_session(demo_version, "int8"), mixed_requests(demo_features, 11))
    print(f"demo int8 alone vs batched: scores {s_diff:.2e}, features {f_diff:.2e}")
    assert s_diff <= TOLERANCE["int8"]
