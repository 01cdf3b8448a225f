"""python -m bench.heads --model-repo model_repo --rows 20000 [--out bench_out/heads.json]

Labeled rows to a new head serving, each step timed: the online version is hard-linked (never modified) into a
temporary repository that a real server serves, polling it every second; `--rows` rows are derived from the QBQTC
pairs (`derive_rows`); `train` (cold feature cache: frozen-bottom features, numpy training, single-head export);
`merge` into the next version, with its verification; the hot swap, from the rename until the server answers with
the new version and srcid, every old srcid's score equal to the previous version's.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

from bench.kit.cli import new_parser
from bench.kit.data import DEFAULT_DATA
from bench.kit.server import ServerProcess, ServerSpec
from bench.kit.swap import _link_or_copy
from bench.reports.heads import markdown
from model_format.manifest import read_lookup_vocab, read_manifest
from model_format.repository import latest_complete, scan_model
from scoring.v1 import scoring_pb2, scoring_pb2_grpc
from tools.heads.edit import merge
from tools.heads.new_head import train_new_head
from tools.heads.train import TrainConfig

NEW_SRCID, HEAD = 990001, "bench_relevance"
PROBE_QUERIES = ["北京旅游攻略", "感冒发烧吃什么药", "阿里巴巴公司地址", "抖音短视频怎么剪辑", "iPhone 15 价格"]


def derive_rows(qbqtc: Path, n: int, sites: list[str], industries: list[str], tags: list[str],
                seed: int = 7) -> list[dict[str, object]]:
    """`n` labeled rows from QBQTC (label = relevance >= 1), in rounds over the pairs: 0, the pair as is; 1, with a
    site, an industry and a NER tag from the model's vocabularies; 2, the query with another row's title (label 0, a
    sampled negative); 3, the title cut to its first half; further rounds repeat 1-3 with other draws. Every row is a
    different model input, so the feature step computes every one of them."""
    pairs = [json.loads(line) for line in qbqtc.read_text(encoding="utf-8").splitlines() if line.strip()]
    rng = random.Random(seed)
    rows: list[dict[str, object]] = []
    round_ = 0
    while len(rows) < n:
        kind = 0 if round_ == 0 else 1 + (round_ - 1) % 3
        for p in pairs[:n - len(rows)]:
            q, t, label = str(p["query"]), str(p["title"]), int(int(p["label"]) >= 1)
            if kind == 0:
                rows.append({"query": q, "title": t, "label": label})
            elif kind == 1:
                rows.append({"query": q, "title": t, "site": rng.choice(sites), "industry": rng.choice(industries),
                             "ner": [rng.choice(tags)], "label": label})
            elif kind == 2:
                other = pairs[rng.randrange(len(pairs))]
                rows.append({"query": q, "title": str(other["title"]), "label": 0 if other["query"] != q else label})
            else:
                cut = max(4, len(t) // 2 - rng.randrange(0, 3) * (round_ // 4))
                rows.append({"query": q, "title": t[:cut], "label": label})
        round_ += 1
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = new_parser("heads", __doc__)
    ap.add_argument("--model-repo", type=Path, default=Path("model_repo"))
    ap.add_argument("--model", default="demo")
    ap.add_argument("--version", type=int, default=None, help="the online version (default: the latest complete)")
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="QBQTC JSONL to derive rows from")
    ap.add_argument("--out", type=Path, default=None, help="write the timings as JSON here")
    ap.add_argument("--keep", action="store_true", help="keep the temporary repository")
    args = ap.parse_args(argv)
    if not args.data.is_file():
        ap.error(f"{args.data} not found: this benchmark needs the QBQTC pairs")
    base = latest_complete([s for s in scan_model(args.model_repo, args.model) if args.version in (None, s.version)])
    if base is None:
        ap.error(f"no complete {args.model} version in {args.model_repo} (make demo)")
    work = Path(tempfile.mkdtemp(prefix="heads-bench-"))
    online = work / "repo" / args.model / str(base.version)
    shutil.copytree(base.path, online, copy_function=_link_or_copy)
    manifest = read_manifest(online)
    t = time.perf_counter()
    sites, industries, tags = (read_lookup_vocab(online / f.vocab_file)[2:]
                               for f in (manifest.site, manifest.industry, manifest.ner))
    data = work / "labeled.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in derive_rows(
        args.data, args.rows, sites, industries, tags)), encoding="utf-8")
    timings = {"derive rows (not counted)": time.perf_counter() - t}
    flags = ["--poll-interval-s", "1", "--log-level", "INFO"]  # the server's defaults; it polls: sees the merge
    server = ServerProcess(ServerSpec(work / "repo", extra=flags, log_path=work / "server.log"))
    try:
        with server, server.channel() as channel:
            stub = scoring_pb2_grpc.ScorerStub(channel)  # type: ignore[no-untyped-call]

            def score(query: str) -> tuple[int, dict[int, float]]:
                resp = stub.Score(scoring_pb2.ScoreRequest(query=query), timeout=30)
                return int(resp.version), dict(resp.scores)

            before = {q: score(q)[1] for q in PROBE_QUERIES}
            t_all = time.perf_counter()
            result = train_new_head(online, data, NEW_SRCID, HEAD, work / "single" / HEAD / "1", config=TrainConfig(),
                                    cache_dir=work / "cache", report=print)
            timings.update({f"train: {step}": secs for step, secs in result.steps.items()})
            t = time.perf_counter()
            merged = merge(online, result.path, report=print)
            t_published = time.perf_counter()
            timings["merge (incl. verification)"] = t_published - t
            while (served := score(PROBE_QUERIES[0]))[0] != merged.manifest.version or NEW_SRCID not in served[1]:
                if time.perf_counter() - t_published > 120:
                    raise TimeoutError("the merged version never served:\n" + "\n".join(server.logs()[-30:]))
                time.sleep(0.05)
            timings["hot swap (publish -> serving)"] = time.perf_counter() - t_published
            timings["total: rows -> new head serving"] = time.perf_counter() - t_all
            for q, old in before.items():
                version, new = score(q)
                assert version == merged.manifest.version and NEW_SRCID in new
                if changed := [s for s in old if old[s] != new[s]]:
                    raise AssertionError(f"{q}: old srcids changed score after the swap: {changed[:5]}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    doc = {"rows": args.rows, "seconds": {k: round(v, 2) for k, v in timings.items()},
           "features": {"distinct": result.features.unique, "computed": result.features.computed,
                        "rows_per_s": round(result.features.computed / max(result.features.seconds, 1e-9), 1)},
           "held_out": vars(result.training.val), "epochs": result.training.epochs,
           "merged": f"{merged.manifest.model}/{merged.manifest.version}", "cpu_count": os.cpu_count(),
           "unchanged_scores": sum(len(old) for old in before.values()), "probe_queries": len(before),
           "new_srcid": NEW_SRCID, "new_srcid_score": new[NEW_SRCID]}
    print(markdown(doc))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
