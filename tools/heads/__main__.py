"""Head lifecycle on the frozen shared bottom: list, merge, replace, remove, train.

  python -m tools.heads list VERSION_DIR [--json]
  python -m tools.heads train VERSION_DIR --data LABELED.jsonl --srcid N --name NAME --out SINGLE_DIR
  python -m tools.heads merge ONLINE_DIR SINGLE_DIR [--out NEW_DIR] [--replace]
  python -m tools.heads remove ONLINE_DIR --srcid N [--srcid M …] [--out NEW_DIR]

VERSION_DIR, ONLINE_DIR and SINGLE_DIR are complete version folders (manifest and checksums).
`--out` is the new version folder `<repo>/<model>/<version>` and must not exist: the version is
written into `<repo>/<model>/.staging-*` and renamed into place when whole and verified. For merge
and remove it defaults to the next version of ONLINE_DIR's model in ONLINE_DIR's repository, which a
server watching that repository then hot-swaps. Keep SINGLE_DIR outside the served repository
(a server would serve it as a model of its own).

merge refuses two versions whose bottoms differ in any way (bottom tensors byte for byte, bottom
nodes and attributes, tokenizer, vocabularies, sequence limits), naming the first difference. Every
merge and remove then checks, on each precision variant this machine can run, that every kept head
scores bit-identically before and after and each added head within 1e-6 of the model it came from;
anything else fails (exit status 1) and publishes nothing. Other refusals exit with status 2.

train computes the fp32 `features` of every labeled row once (cached per bottom under --cache-dir),
trains the head in numpy (class-weighted cross-entropy, Adam, early stopping on a held-out split by
query), prints AUC and precision/recall at the chosen threshold on that split, and exports a
single-head version with the same bottom and VERSION_DIR's precision variants.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from model_format.manifest import ManifestError, read_manifest
from model_format.repository import check_version
from tools.heads.data import DataError
from tools.heads.edit import EditError, merge, remove
from tools.heads.features import default_cache_dir
from tools.heads.graph_edit import BottomMismatch, GraphEditError
from tools.heads.new_head import train_new_head
from tools.heads.train import THRESHOLD_RULES, TrainConfig, TrainError
from tools.heads.verify import VerificationError


def _report(msg: str) -> None:
    print(msg, flush=True)


def cmd_list(args: argparse.Namespace) -> int:
    path: Path = args.version_dir
    try:
        manifest = read_manifest(path)
    except ManifestError as exc:
        raise SystemExit(f"{path}: {exc}") from exc
    status = check_version(path, manifest.model, manifest.version)
    complete = "complete" if status.complete else f"INCOMPLETE: {status.error}"
    if args.json:
        doc = {"model": manifest.model, "version": manifest.version, "path": str(path), "complete": status.complete,
               "error": status.error, "bottom_fingerprint": manifest.bottom_fingerprint,
               "precisions": manifest.precisions, "feature_dim": manifest.feature_dim,
               "head_hidden": manifest.head_hidden,
               "heads": [{"srcid": h.srcid, "name": h.name, "threshold": h.threshold} for h in manifest.heads]}
        print(json.dumps(doc, ensure_ascii=False, indent=2))
        return 0 if status.complete else 1
    print(f"{manifest.model}/{manifest.version}  {path}  ({complete})")
    print(f"bottom_fingerprint  {manifest.bottom_fingerprint}")
    print(f"precisions          {', '.join(f'{p} ({f})' for p, f in manifest.precisions.items())}")
    e = manifest.encoder
    print(f"features            D={manifest.feature_dim} (hidden {e.hidden_size} + site {manifest.site.dim} + ner "
          f"{manifest.ner.dim} + industry {manifest.industry.dim}); {e.num_layers} layers; head_hidden "
          f"{manifest.head_hidden}; max_seq_len {manifest.max_seq_len}")
    print(f"heads               {len(manifest.heads)}")
    width = max(len("name"), *(len(h.name) for h in manifest.heads))
    print(f"  {'#':>4}  {'srcid':>12}  {'name':<{width}}  threshold")
    for i, h in enumerate(manifest.heads):
        print(f"  {i:>4}  {h.srcid:>12}  {h.name:<{width}}  {h.threshold:g}")
    return 0 if status.complete else 1


def cmd_merge(args: argparse.Namespace) -> int:
    result = merge(args.online_dir, args.single_dir, args.out, replace=args.replace, report=_report,
                   probe_data=args.probe_data, probe_rows=args.probe_rows)
    print(f"published {result.path} ({len(result.manifest.heads)} heads) in {result.seconds:.1f} s")
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    result = remove(args.online_dir, args.srcid, args.out, report=_report, probe_data=args.probe_data,
                    probe_rows=args.probe_rows)
    print(f"published {result.path} ({len(result.manifest.heads)} heads) in {result.seconds:.1f} s")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    threshold: float | str = args.threshold
    if args.threshold not in THRESHOLD_RULES:
        try:
            threshold = float(args.threshold)
        except ValueError:
            threshold = -1.0
        if not 0.0 <= threshold <= 1.0:
            raise SystemExit(f"--threshold must be f1, youden or a value in [0, 1], got {args.threshold}")
    config = TrainConfig(val_fraction=args.val_fraction, max_epochs=args.epochs, patience=args.patience,
                         learning_rate=args.lr, batch_size=args.batch_size, weight_decay=args.weight_decay,
                         class_weight=args.class_weight, threshold=threshold, seed=args.seed)
    result = train_new_head(args.version_dir, args.data, args.srcid, args.name, args.out, config=config,
                            cache_dir=None if args.no_cache else (args.cache_dir or default_cache_dir()),
                            precisions=["fp32"] if args.fp32_only else None, report=_report,
                            show_progress=not args.quiet)
    steps = ", ".join(f"{k} {v:.1f} s" for k, v in result.steps.items())
    print(f"done: {steps}")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m tools.heads", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="srcids, names, thresholds and the bottom's fingerprint of a version")
    p.add_argument("version_dir", type=Path, metavar="VERSION_DIR")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_list)

    def probe_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", type=Path, default=None, metavar="NEW_DIR",
                       help="new version folder <repo>/<model>/<version> (default: next version beside ONLINE_DIR)")
        p.add_argument("--probe-data", type=Path, default=None, metavar="JSONL",
                       help="also verify on the first --probe-rows rows of this file (query, title, …)")
        p.add_argument("--probe-rows", type=int, default=64)

    p = sub.add_parser("merge", help="append (or --replace) the heads of SINGLE_DIR to ONLINE_DIR")
    p.add_argument("online_dir", type=Path, metavar="ONLINE_DIR")
    p.add_argument("single_dir", type=Path, metavar="SINGLE_DIR")
    p.add_argument("--replace", action="store_true", help="a srcid ONLINE_DIR already has is replaced in place")
    probe_flags(p)
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("remove", help="a new version without the given heads")
    p.add_argument("online_dir", type=Path, metavar="ONLINE_DIR")
    p.add_argument("--srcid", type=int, action="append", required=True, help="repeatable")
    probe_flags(p)
    p.set_defaults(func=cmd_remove)

    p = sub.add_parser("train", help="train one head on the frozen bottom of VERSION_DIR, export a single-head version")
    p.add_argument("version_dir", type=Path, metavar="VERSION_DIR")
    p.add_argument("--data", type=Path, required=True, metavar="LABELED.jsonl",
                   help="JSON lines: query, optional title/site/ner/industry, label 0/1")
    p.add_argument("--srcid", type=int, required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--out", type=Path, required=True, metavar="SINGLE_DIR",
                   help="the single-head version folder <dir>/<model>/<version> (must not exist)")
    p.add_argument("--threshold", default="f1",
                   help="f1 (best F1 on the held-out split, default), youden (best TPR - FPR) or a value in [0, 1]")
    p.add_argument("--val-fraction", type=float, default=0.2, help="held-out share, split by query")
    p.add_argument("--epochs", type=int, default=200, help="at most this many epochs")
    p.add_argument("--patience", type=int, default=10, help="stop after this many epochs without improvement")
    p.add_argument("--lr", type=float, default=TrainConfig.learning_rate, help="Adam learning rate")
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--weight-decay", type=float, default=TrainConfig.weight_decay, help="L2 on the weights")
    p.add_argument("--class-weight", choices=["balanced", "none"], default="balanced")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="feature cache root (default $SCORING_HEADS_CACHE or ~/.cache/scoring-heads/features)")
    p.add_argument("--no-cache", action="store_true", help="compute features without reading or writing a cache")
    p.add_argument("--fp32-only", action="store_true", help="export only model.onnx (default: VERSION_DIR's variants)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        rc: int = args.func(args)
    except (EditError, BottomMismatch, GraphEditError, DataError, TrainError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except VerificationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
