"""Heads from a PyTorch state dict, with their srcids, names and thresholds from a small JSON or CSV file.

    --heads-state-dict heads.safetensors (or .bin)  --heads-meta heads.json (or .csv)

Tensor names: head i (its position in the metadata file) is `nn.Sequential(nn.Linear(D, h), nn.ReLU(),
nn.Linear(h, 1))` at `heads.i` of the trained module (a `nn.ModuleList` named `heads`), so its tensors are
`heads.i.0.weight` [h, D], `heads.i.0.bias` [h], `heads.i.2.weight` [1, h] and `heads.i.2.bias` [1]; a
leading `model.` is dropped. The score is sigmoid of the last Linear, as the graph computes it.
Metadata: JSON `[{"srcid": 111111, "name": "travel", "threshold": 0.5}, ...]` or CSV with the header
`srcid,name,threshold` (threshold optional, 0.5). A missing or extra tensor, or a shape that does not fit,
is refused naming the tensor.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from model_format.manifest import Head
from tools.build_model.weights import HeadWeights

F32 = np.float32


def read_head_meta(path: Path) -> list[Head]:
    if path.suffix == ".json":
        rows = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(rows, list):
            raise SystemExit(f"{path}: expected a JSON list of {{srcid, name, threshold}}")
    else:
        with path.open(encoding="utf-8", newline="") as fh:
            rows = list(csv.DictReader(fh))
    heads = []
    for i, row in enumerate(rows):
        try:
            heads.append(Head(int(row["srcid"]), str(row["name"]), float(row.get("threshold") or 0.5)))
        except (KeyError, TypeError, ValueError) as exc:
            raise SystemExit(f"{path}: row {i} needs srcid, name and an optional threshold ({exc})") from exc
    srcids = [h.srcid for h in heads]
    if not heads or len(set(srcids)) != len(srcids):
        raise SystemExit(f"{path}: needs at least one head and unique srcids")
    return heads


def load_tensors(path: Path) -> dict[str, np.ndarray]:
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        return dict(load_file(str(path)))
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise SystemExit(f"{path} is a pickled PyTorch file and needs torch to read; save it as .safetensors "
                         "or install torch") from exc
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    return {k: v.float().numpy() for k, v in state.items()}


def heads_from_state_dict(path: Path, meta: Path, feature_dim: int) -> tuple[HeadWeights, list[Head]]:
    """Stacks the heads as the graph runs them: w1 [D, N*h], b1 [N*h], w2 [N, h, 1], b2 [N]."""
    heads = read_head_meta(meta)
    tensors = {k.removeprefix("model."): v for k, v in load_tensors(path).items()}
    wanted = [f"heads.{i}.{layer}.{kind}" for i in range(len(heads)) for layer in (0, 2) for kind in ("weight", "bias")]
    missing = [k for k in wanted if k not in tensors]
    extra = sorted(set(tensors) - set(wanted))
    if missing or extra:
        raise SystemExit(f"{path}: {len(heads)} heads in {meta.name} need {len(wanted)} tensors; "
                         f"missing {missing[:6]}{' ...' if len(missing) > 6 else ''}, "
                         f"extra {extra[:6]}{' ...' if len(extra) > 6 else ''}")
    hidden = int(tensors["heads.0.0.weight"].shape[0])
    expect = {"0.weight": (hidden, feature_dim), "0.bias": (hidden,), "2.weight": (1, hidden), "2.bias": (1,)}
    for i in range(len(heads)):
        for suffix, shape in expect.items():
            t = tensors[f"heads.{i}.{suffix}"]
            if tuple(t.shape) != shape or t.dtype.kind != "f":
                raise SystemExit(f"{path}: heads.{i}.{suffix} is {t.dtype} {tuple(t.shape)}, expected float {shape} "
                                 f"(features D = {feature_dim}, head width h = {hidden})")
    n = len(heads)
    w1 = np.concatenate([tensors[f"heads.{i}.0.weight"].T for i in range(n)], axis=1)
    b1 = np.concatenate([tensors[f"heads.{i}.0.bias"] for i in range(n)])
    w2 = np.stack([tensors[f"heads.{i}.2.weight"].T for i in range(n)])
    b2 = np.concatenate([tensors[f"heads.{i}.2.bias"] for i in range(n)])
    weights = HeadWeights(np.ascontiguousarray(w1, F32), b1.astype(F32), np.ascontiguousarray(w2, F32), b2.astype(F32))
    return weights, heads
