"""Training one head on frozen features, in numpy.

The head is the graph's: `sigmoid(w2 · relu(W1 · x + b1) + b2)` with W1 [D, h]. It is trained on
standardized features (mean/std of the training split), and the standardization is folded into
W1 and b1 on export, so the exported head reads raw features exactly as the graph gives them.

Loss: binary cross-entropy, class-weighted so both classes weigh the same in total (`balanced`),
plus L2 weight decay; Adam; early stopping on the held-out split's weighted loss (best epoch kept).
The held-out split is by query (every row of a query falls on the same side), so near-duplicates of
one query cannot leak between training and evaluation.
"""

from __future__ import annotations

import hashlib
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from tools.build_model.weights import HeadWeights
from tools.heads.verify import Report

F32 = np.float32


class TrainError(ValueError):
    """The data cannot train a head (one class only, too few rows, …)."""


@dataclass(frozen=True)
class TrainConfig:
    val_fraction: float = 0.2
    max_epochs: int = 200
    patience: int = 10
    learning_rate: float = 1e-3
    batch_size: int = 512
    weight_decay: float = 1e-2
    class_weight: str = "balanced"  # balanced | none
    threshold: float | str = "f1"  # a value, or a rule on the held-out split: f1 (best F1) | youden (best TPR - FPR)
    seed: int = 0


@dataclass
class Metrics:
    rows: int
    positives: int
    auc: float
    threshold: float
    precision: float
    recall: float
    f1: float

    def line(self, split: str) -> str:
        return (f"{split}: {self.rows} rows ({self.positives} positive), AUC {self.auc:.4f}; at threshold "
                f"{self.threshold:.4f}: precision {self.precision:.4f}, recall {self.recall:.4f}, F1 {self.f1:.4f}")


@dataclass
class TrainResult:
    heads: HeadWeights  # one head, standardization folded in
    threshold: float
    train: Metrics
    val: Metrics
    epochs: int
    best_epoch: int
    seconds: float
    history: list[tuple[float, float]] = field(default_factory=list)  # (train loss, val loss) per epoch


# --- metrics ---------------------------------------------------------------------------------------

def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with tied scores counted half)."""
    labels = labels.astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), np.float64)
    sorted_scores = scores[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def precision_recall(scores: np.ndarray, labels: np.ndarray, threshold: float) -> tuple[float, float, float]:
    """Precision, recall and F1 of `score >= threshold` (the server's trigger rule)."""
    pred = scores >= threshold
    tp = int(np.sum(pred & (labels == 1)))
    fp = int(np.sum(pred & (labels == 0)))
    fn = int(np.sum(~pred & (labels == 1)))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


THRESHOLD_RULES = ("f1", "youden")


def choose_threshold(scores: np.ndarray, labels: np.ndarray, rule: str) -> float:
    """The score cut that maximizes `rule` on these rows: `f1`, or `youden` (TPR - FPR, i.e. balanced
    accuracy). Ties go to the higher threshold. The value is a score, so `score >= threshold` reproduces it."""
    if rule not in THRESHOLD_RULES:
        raise TrainError(f"threshold rule must be one of {THRESHOLD_RULES} or a value, got {rule!r}")
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order].astype(np.float64), labels[order].astype(np.int64)
    tp = np.cumsum(y)
    fp = np.cumsum(1 - y)
    # Only cut between distinct scores: the last index of each run of equal scores.
    last = np.r_[s[1:] != s[:-1], True]
    tp, fp, cut = tp[last], fp[last], s[last]
    total_pos, total_neg = max(int(y.sum()), 1), max(int(len(y) - y.sum()), 1)
    recall = tp / total_pos
    if rule == "f1":
        precision = tp / np.maximum(tp + fp, 1)
        objective = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12),
                             0.0)
    else:
        objective = recall - fp / total_neg
    best = int(np.argmax(objective))
    return float(min(max(cut[best], 0.0), 1.0))


def metrics(scores: np.ndarray, labels: np.ndarray, threshold: float) -> Metrics:
    p, r, f = precision_recall(scores, labels, threshold)
    return Metrics(len(labels), int(labels.sum()), roc_auc(scores, labels), threshold, p, r, f)


# --- the split -------------------------------------------------------------------------------------

def split_by_query(queries: Sequence[str], val_fraction: float, seed: int) -> np.ndarray:
    """A boolean mask of held-out rows, chosen per normalized query by a seeded hash."""
    if not 0.0 < val_fraction < 1.0:
        raise TrainError(f"val_fraction must be in (0, 1), got {val_fraction}")
    out = np.empty(len(queries), bool)
    cache: dict[str, bool] = {}
    for i, q in enumerate(queries):
        key = " ".join(q.lower().split())
        if key not in cache:
            h = hashlib.blake2b(f"{seed}|{key}".encode(), digest_size=8).digest()
            cache[key] = int.from_bytes(h, "big") / 2.0**64 < val_fraction
        out[i] = cache[key]
    return out


# --- the model -------------------------------------------------------------------------------------

def _sigmoid(x: np.ndarray) -> np.ndarray:
    out: np.ndarray = 0.5 * (1.0 + np.tanh(0.5 * x))
    return out


def head_scores(heads: HeadWeights, x: np.ndarray, index: int = 0) -> np.ndarray:
    """Scores of head `index` of a stack on raw features, in float32 like the graph."""
    h = heads.hidden
    w1 = heads.w1[:, index * h:(index + 1) * h]
    b1 = heads.b1[index * h:(index + 1) * h]
    z = np.maximum(x.astype(F32) @ w1 + b1, 0)
    logit = z @ heads.w2[index, :, 0] + heads.b2[index]
    return _sigmoid(logit.astype(np.float64)).astype(F32)


@dataclass
class _Params:
    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: np.ndarray

    def arrays(self) -> list[np.ndarray]:
        return [self.w1, self.b1, self.w2, self.b2]

    def copy(self) -> _Params:
        return _Params(self.w1.copy(), self.b1.copy(), self.w2.copy(), self.b2.copy())


def _forward(p: _Params, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    a = x @ p.w1 + p.b1
    z = np.maximum(a, 0)
    logit = z @ p.w2 + p.b2
    return a, z, logit


def _weighted_bce(logit: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    # log(1 + e^x) - y x, computed stably
    loss = np.logaddexp(0.0, logit.astype(np.float64)) - y * logit
    return float(np.sum(w * loss) / np.sum(w))


def _standardize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mu = x.mean(axis=0, dtype=np.float64)
    sd = x.std(axis=0, dtype=np.float64)
    sd = np.where(sd < 1e-3, 1.0, sd)  # constant columns (an unused look-up) stay as they are
    return mu, sd


def fold(p: _Params, mu: np.ndarray, sd: np.ndarray) -> HeadWeights:
    """The head on raw features: relu(((x - mu) / sd) W1 + b1) = relu(x (W1 / sd) + (b1 - (mu / sd) W1))."""
    w1 = p.w1.astype(np.float64) / sd[:, None]
    b1 = p.b1.astype(np.float64) - (mu / sd) @ p.w1.astype(np.float64)
    h = p.w1.shape[1]
    return HeadWeights(np.ascontiguousarray(w1, F32), np.ascontiguousarray(b1, F32),
                       np.ascontiguousarray(p.w2.reshape(1, h, 1), F32), np.array([p.b2[0]], F32))


def train_head(
    features: np.ndarray,
    labels: np.ndarray,
    queries: Sequence[str],
    hidden: int,
    config: TrainConfig | None = None,
    *,
    report: Report = print,
    show_progress: bool = True,
) -> TrainResult:
    config = config or TrainConfig()
    t0 = time.perf_counter()
    y_all = labels.astype(F32)
    val_mask = split_by_query(queries, config.val_fraction, config.seed)
    xt, yt = features[~val_mask], y_all[~val_mask]
    xv, yv = features[val_mask], y_all[val_mask]
    for name, y in (("training", yt), ("held-out", yv)):
        if len(y) < 2 or y.min() == y.max():
            raise TrainError(f"the {name} split ({len(y)} rows) needs both labels; add rows or change "
                             "--val-fraction/--seed")
    n_pos, n_neg = float(yt.sum()), float(len(yt) - yt.sum())
    if config.class_weight == "balanced":
        w_pos, w_neg = len(yt) / (2 * n_pos), len(yt) / (2 * n_neg)
    elif config.class_weight == "none":
        w_pos = w_neg = 1.0
    else:
        raise TrainError(f"class_weight must be balanced or none, got {config.class_weight!r}")
    wt = np.where(yt == 1, w_pos, w_neg).astype(F32)
    wv = np.where(yv == 1, w_pos, w_neg).astype(F32)
    report(f"training: {len(yt)} rows ({int(n_pos)} positive), held out: {len(yv)} rows ({int(yv.sum())} positive) "
           f"split by query; class weights positive {w_pos:.3f}, negative {w_neg:.3f}")

    mu, sd = _standardize(xt)
    xs = ((xt - mu) / sd).astype(F32)
    xvs = ((xv - mu) / sd).astype(F32)
    d = xs.shape[1]
    rng = np.random.default_rng(config.seed)
    p = _Params(
        w1=(rng.standard_normal((d, hidden)) * math.sqrt(2.0 / d)).astype(F32),
        b1=np.zeros(hidden, F32),
        w2=(rng.standard_normal(hidden) * math.sqrt(1.0 / hidden)).astype(F32),
        b2=np.zeros(1, F32),
    )
    m = [np.zeros_like(a) for a in p.arrays()]
    v = [np.zeros_like(a) for a in p.arrays()]
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    step = 0
    best = p.copy()
    best_loss, best_epoch, since_best = math.inf, 0, 0
    history: list[tuple[float, float]] = []
    bar = tqdm(total=config.max_epochs, desc="training", unit="epoch", file=sys.stderr, disable=not show_progress)
    epoch = 0
    for epoch in range(1, config.max_epochs + 1):
        order = rng.permutation(len(yt))
        for start in range(0, len(order), config.batch_size):
            idx = order[start:start + config.batch_size]
            xb, yb, wb = xs[idx], yt[idx], wt[idx]
            a, z, logit = _forward(p, xb)
            g_logit = (wb * (_sigmoid(logit) - yb) / wb.sum()).astype(F32)
            g_w2 = z.T @ g_logit + config.weight_decay * p.w2
            g_b2 = np.array([g_logit.sum()], F32)
            g_a = np.outer(g_logit, p.w2) * (a > 0)
            g_w1 = xb.T @ g_a + config.weight_decay * p.w1
            g_b1 = g_a.sum(axis=0)
            step += 1
            lr_t = config.learning_rate * math.sqrt(1 - beta2**step) / (1 - beta1**step)
            for i, (param, grad) in enumerate(zip(p.arrays(), (g_w1, g_b1, g_w2, g_b2), strict=True)):
                m[i] = beta1 * m[i] + (1 - beta1) * grad
                v[i] = beta2 * v[i] + (1 - beta2) * grad * grad
                param -= (lr_t * m[i] / (np.sqrt(v[i]) + eps)).astype(F32)
        train_loss = _weighted_bce(_forward(p, xs)[2], yt, wt)
        val_loss = _weighted_bce(_forward(p, xvs)[2], yv, wv)
        history.append((train_loss, val_loss))
        bar.update(1)
        bar.set_postfix_str(f"loss {train_loss:.4f}, held-out {val_loss:.4f}")
        if val_loss < best_loss - 1e-5:
            best, best_loss, best_epoch, since_best = p.copy(), val_loss, epoch, 0
        else:
            since_best += 1
            if since_best >= config.patience:
                break
    bar.close()
    heads = fold(best, mu, sd)
    val_scores = head_scores(heads, xv)
    threshold = (float(config.threshold) if not isinstance(config.threshold, str)
                 else choose_threshold(val_scores, yv, config.threshold))
    result = TrainResult(
        heads=heads,
        threshold=threshold,
        train=metrics(head_scores(heads, xt), yt, threshold),
        val=metrics(val_scores, yv, threshold),
        epochs=epoch,
        best_epoch=best_epoch,
        seconds=time.perf_counter() - t0,
        history=history,
    )
    report(f"stopped after {epoch} epochs, best held-out loss {best_loss:.4f} at epoch {best_epoch} "
           f"({result.seconds:.1f} s)")
    report(result.train.line("training split"))
    report(result.val.line("held-out split"))
    return result
