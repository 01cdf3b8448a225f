"""Build a model version into a repository.

  python -m tools.build_model --demo --out model_repo
  python -m tools.build_model --from-hf CKPT_DIR --heads-npz heads.npz --out model_repo --model mymodel
  python -m tools.build_model --from-hf CKPT_DIR --heads 8 --out model_repo --precision int8
  python -m tools.build_model --from-paddle PADDLENLP_DIR --heads-npz heads.npz --out model_repo
  python -m tools.build_model --from-hf CKPT_DIR --lookups LOOKUPS_DIR \
      --heads-state-dict heads.safetensors --heads-meta heads.json --out model_repo --model mymodel

A checkpoint's own tokenizer is used (its tokenizer.json, else its vocab.txt with its tokenizer_config.json);
`--lookups` takes trained site/NER/industry tables (tools/build_model/lookups.py says the format), otherwise
the demo's vocabularies with random tables are written, which no trained model should be served with.

`--out` is the repository root; the version lands in `<out>/<model>/<version>/` by atomic rename.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tqdm import tqdm

from model_format.manifest import EncoderShape, Head
from model_format.repository import next_version
from tools.build_model import demo_vocab
from tools.build_model.heads_io import heads_from_state_dict
from tools.build_model.lookups import LookupTableError, lookups_from_dir
from tools.build_model.paddle_ckpt import encoder_from_paddle
from tools.build_model.tokenizer import build_tokenizer, checkpoint_tokenizer
from tools.build_model.weights import (
    ModelWeights,
    encoder_from_hf,
    heads_from_npz,
    random_encoder,
    random_heads,
    random_lookups,
)
from tools.build_model.writer import LookupVocabs, write_version

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_VOCAB = REPO_ROOT / "vocab" / "ernie-3.0-zh-vocab.txt"
DEMO_SHAPE = EncoderShape(
    type="ernie", vocab_size=39980, hidden_size=768, num_layers=3, num_attention_heads=12,
    intermediate_size=3072, max_position_embeddings=512, type_vocab_size=4, layer_norm_eps=1e-5,
)
LOOKUP_DIMS = (64, 32, 32)  # site, NER, industry embedding widths
HEAD_HIDDEN = 64
# Weight scale of the random demo encoder. BERT's usual 0.02 makes a random 3-layer encoder almost
# blind to its input (per-head score spread ~0.01 on real pairs); 0.04, near the scale of trained
# ERNIE weights, gives scores that move with the text, so precision checks on the demo mean something.
DEMO_INIT_STD = 0.04


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m tools.build_model", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--demo", action="store_true", help="seeded random-init demo model (92 heads)")
    src.add_argument("--from-hf", type=Path, metavar="CKPT_DIR",
                     help="Hugging Face ERNIE/BERT folder: config.json, model.safetensors, vocab.txt")
    src.add_argument("--from-paddle", type=Path, metavar="CKPT_DIR",
                     help="PaddleNLP ERNIE folder: model_state.pdparams, model_config.json, vocab.txt "
                          "(read without PaddlePaddle; tools/build_model/paddle_ckpt.py)")
    ap.add_argument("--out", type=Path, required=True, help="model repository root")
    ap.add_argument("--model", default=None, help="model name (default: demo, or the checkpoint folder name)")
    ap.add_argument("--version", type=int, default=None, help="version number (default: next free)")
    heads_src = ap.add_mutually_exclusive_group()
    heads_src.add_argument("--heads-npz", type=Path,
                           help="heads from an .npz (w1, b1, w2, b2, srcids[, names, thresholds])")
    heads_src.add_argument("--heads-state-dict", type=Path, metavar="FILE",
                           help="heads from a PyTorch state dict (.safetensors or .bin; tools/build_model/heads_io.py "
                                "names the tensors), with --heads-meta")
    ap.add_argument("--heads-meta", type=Path, metavar="FILE", help="srcid, name, threshold per head (.json or .csv)")
    ap.add_argument("--lookups", type=Path, metavar="DIR",
                    help="trained look-up tables: {site,ner,industry}_vocab.txt and {site,ner,industry}.npy")
    ap.add_argument("--heads", type=int, default=None, help="N random heads (srcids 1..N) when no --heads-npz")
    ap.add_argument("--precision", action="append", choices=["int8", "fp16"], default=[],
                    help="also write this variant (repeatable); fp32 is always written")
    ap.add_argument("--max-seq-len", type=int, default=128)
    ap.add_argument("--max-ner-tags", type=int, default=8)
    ap.add_argument("--num-sites", type=int, default=3000, help="demo site vocabulary size")
    ap.add_argument("--seed", type=int, default=20261124)
    ap.add_argument("--if-absent", action="store_true",
                    help="do nothing when the model already has a complete version (used by make serve)")
    args = ap.parse_args(argv)
    if args.heads_state_dict and not args.heads_meta:
        ap.error("--heads-state-dict needs --heads-meta (srcids, names and thresholds)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    checkpoint: Path | None = args.from_hf or args.from_paddle
    model = args.model or ("demo" if checkpoint is None else checkpoint.resolve().name)
    if args.if_absent:
        from model_format.repository import latest_complete, scan_model

        found = latest_complete(scan_model(args.out, model))
        if found is not None:
            print(f"{model}/{found.version} is already complete in {args.out}; nothing to build")
            return 0
    version = args.version or next_version(args.out, model)
    t0 = time.perf_counter()
    steps = tqdm(total=5 + len(args.precision), desc=f"{model}/{version}", unit="step", file=sys.stderr,
                 bar_format="{desc}: {n}/{total} [{elapsed}] {postfix}")

    def progress(msg: str) -> None:
        steps.set_postfix_str(msg)
        steps.update(1)

    progress("initialising weights" if checkpoint is None else f"reading {checkpoint}")
    if checkpoint is None:
        encoder = random_encoder(DEMO_SHAPE, args.seed, std=DEMO_INIT_STD)
        tokenizer, tokenizer_source = build_tokenizer(DEMO_VOCAB), "demo vocab.txt (lower-cased)"
    else:
        encoder = encoder_from_hf(checkpoint) if args.from_hf else encoder_from_paddle(checkpoint)
        tokenizer, tokenizer_source = checkpoint_tokenizer(checkpoint)
    if args.lookups:
        try:
            vocabs, lookups = lookups_from_dir(args.lookups)
        except LookupTableError as exc:
            raise SystemExit(str(exc)) from exc
    else:
        vocabs = LookupVocabs(sites=demo_vocab.demo_sites(args.num_sites, args.seed),
                              ner_tags=demo_vocab.NER_TAGS, industries=demo_vocab.INDUSTRIES)
        lookups = random_lookups(vocabs.sizes, LOOKUP_DIMS, args.seed + 1)
    feature_dim = encoder.shape.hidden_size + lookups.site.shape[1] + lookups.ner.shape[1] + lookups.industry.shape[1]
    if args.heads_npz:
        head_weights, heads = heads_from_npz(args.heads_npz)
    elif args.heads_state_dict:
        head_weights, heads = heads_from_state_dict(args.heads_state_dict, args.heads_meta, feature_dim)
    else:
        srcids = list(demo_vocab.DEMO_SRCIDS) if args.demo and args.heads is None else list(
            range(1, (args.heads or 1) + 1))
        head_weights = random_heads(len(srcids), feature_dim, HEAD_HIDDEN, args.seed + 2)
        heads = [Head(s, demo_vocab.head_name(s), 0.5) for s in srcids]
    if head_weights.w1.shape[0] != feature_dim:
        raise SystemExit(f"heads expect {head_weights.w1.shape[0]} features, the bottom and look-ups give "
                         f"{feature_dim} (hidden {encoder.shape.hidden_size} + site {lookups.site.shape[1]} + NER "
                         f"{lookups.ner.shape[1]} + industry {lookups.industry.shape[1]})")

    path = write_version(
        ModelWeights(encoder, lookups, head_weights),
        heads,
        tokenizer,
        vocabs,
        root=args.out,
        model_name=model,
        version=version,
        max_seq_len=args.max_seq_len,
        max_ner_tags=args.max_ner_tags,
        precisions=["fp32", *args.precision],
        progress=progress,
        extra={"source": "demo (seeded random init)" if checkpoint is None
               else f"{'hf' if args.from_hf else 'paddle'}:{checkpoint.name}",
               "seed": args.seed, "tokenizer": tokenizer_source,
               "lookups": f"files: {args.lookups.name}" if args.lookups else "demo vocabularies, random tables"},
    )
    steps.close()
    sizes = ", ".join(f"{p.name} {p.stat().st_size / 2**20:.1f} MiB" for p in sorted(path.glob("*.onnx")))
    print(f"built {path} in {time.perf_counter() - t0:.1f} s ({len(heads)} heads; {sizes})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
