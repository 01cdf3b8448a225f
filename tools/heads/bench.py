"""Benchmark: labeled rows to a new head serving, on a running server, each step timed.

  python -m tools.heads.bench --model-repo model_repo --rows 20000 [--out bench_out/heads.json]

1. The online model (`<model-repo>/demo/<latest>`) is hard-linked (never modified) into a fresh
   temporary repository, and a real server (`python -m server`, polling every second) serves it.
2. 20,000 labeled rows are derived from the QBQTC pairs (see `derive_rows`).
3. `train` (cold feature cache): features of the frozen bottom, numpy training, single-head export.
4. `merge` into the next version of the online model, with its verification.
5. Hot swap: from the rename until the server answers with the new version and the new srcid,
   and every old srcid's score equal to the previous version's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from model_format.manifest import read_lookup_vocab, read_manifest
from model_format.repository import latest_complete, scan_model
from tools.heads.edit import merge
from tools.heads.new_head import train_new_head
from tools.heads.train import TrainConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
QBQTC = REPO_ROOT.parent / "shared" / "data" / "qbqtc_test_public.jsonl"
NEW_SRCID = 990001
PROBE_QUERIES = ["北京旅游攻略", "感冒发烧吃什么药", "阿里巴巴公司地址", "抖音短视频怎么剪辑", "iPhone 15 价格"]


def derive_rows(qbqtc: Path, n: int, sites: list[str], industries: list[str], tags: list[str],
                seed: int = 7) -> list[dict[str, object]]:
    """`n` labeled rows from QBQTC (label = relevance >= 1), in rounds over the pairs:

    round 0: the pair as is; round 1: the pair with a site, an industry and a NER tag from the model's
    vocabularies (label kept); round 2: the query with another row's title (label 0, a sampled
    negative); round 3: the pair with its title cut to the first half (label kept); further rounds
    repeat 1-3 with other draws. Every row is a different request for the model (distinct
    look-ups, titles or cuts), so the feature step computes every one of them.
    """
    pairs = [json.loads(line) for line in qbqtc.read_text(encoding="utf-8").splitlines() if line.strip()]
    rng = random.Random(seed)
    rows: list[dict[str, object]] = []
    round_ = 0
    while len(rows) < n:
        kind = 0 if round_ == 0 else 1 + (round_ - 1) % 3
        for p in pairs:
            if len(rows) >= n:
                break
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


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _link_tree(src: Path, dst: Path) -> None:
    """A read-only twin of a version folder: hard links where possible (no copy, no write to the source)."""
    def link(a: str, b: str) -> object:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)
        return b
    shutil.copytree(src, dst, copy_function=link)


def _score(target: str, query: str) -> tuple[int, dict[int, float]]:
    import grpc

    from scoring.v1 import scoring_pb2, scoring_pb2_grpc

    with grpc.insecure_channel(target) as ch:
        stub = scoring_pb2_grpc.ScorerStub(ch)  # type: ignore[no-untyped-call]
        resp = stub.Score(scoring_pb2.ScoreRequest(query=query), timeout=30)
    return int(resp.version), dict(resp.scores)


def _wait_serving(target: str, proc: subprocess.Popen[bytes], timeout: float = 180.0) -> None:
    import grpc

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the server exited")
        try:
            _score(target, "测试")
            return
        except grpc.RpcError:
            time.sleep(0.2)
    raise TimeoutError("the server did not serve in time")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.heads.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-repo", type=Path, default=Path("model_repo"))
    ap.add_argument("--model", default="demo")
    ap.add_argument("--version", type=int, default=None, help="the online version (default: the latest complete)")
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--data", type=Path, default=QBQTC, help="QBQTC JSONL to derive rows from")
    ap.add_argument("--out", type=Path, default=None, help="write the timings as JSON here")
    ap.add_argument("--keep", action="store_true", help="keep the temporary repository")
    args = ap.parse_args(argv)
    if not args.data.is_file():
        print(f"{args.data} not found: this benchmark needs the QBQTC pairs", file=sys.stderr)
        return 2
    statuses = [s for s in scan_model(args.model_repo, args.model) if args.version in (None, s.version)]
    base_status = latest_complete(statuses)
    if base_status is None:
        print(f"no complete {args.model} version in {args.model_repo} (make demo)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="heads-bench-"))
    repo = work / "repo"
    online = repo / args.model / str(base_status.version)
    _link_tree(base_status.path, online)
    manifest = read_manifest(online)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    rows = derive_rows(args.data, args.rows, read_lookup_vocab(online / manifest.site.vocab_file)[2:],
                       read_lookup_vocab(online / manifest.industry.vocab_file)[2:],
                       read_lookup_vocab(online / manifest.ner.vocab_file)[2:])
    data = work / "labeled.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    timings["derive rows (not counted)"] = time.perf_counter() - t

    grpc_port = _free_port()
    cmd = [sys.executable, "-m", "server", "--model-repo", str(repo), "--host", "127.0.0.1", "--grpc-port",
           str(grpc_port), "--metrics-port", "0", "--admin-port", "0", "--poll-interval-s", "1",
           "--log-level", "INFO"]
    server_log = (work / "server.log").open("wb")
    server = subprocess.Popen(cmd, cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
                              stdout=subprocess.DEVNULL, stderr=server_log)
    target = f"127.0.0.1:{grpc_port}"
    try:
        _wait_serving(target, server)
        before = {q: _score(target, q) for q in PROBE_QUERIES}
        t_all = time.perf_counter()
        result = train_new_head(online, data, NEW_SRCID, "bench_relevance", work / "single" / "bench_relevance" / "1",
                                config=TrainConfig(), cache_dir=work / "cache", report=print)
        for step, secs in result.steps.items():
            timings[f"train: {step}"] = secs
        t = time.perf_counter()
        merged = merge(online, result.path, report=print)
        t_published = time.perf_counter()
        timings["merge (incl. verification)"] = t_published - t
        while True:
            version, scores = _score(target, PROBE_QUERIES[0])
            if version == merged.manifest.version and NEW_SRCID in scores:
                break
            if time.perf_counter() - t_published > 120:
                raise TimeoutError("the merged version never served")
            time.sleep(0.05)
        timings["hot swap (publish -> serving)"] = time.perf_counter() - t_published
        timings["total: rows -> new head serving"] = time.perf_counter() - t_all
        unchanged = 0
        for q, (_, old) in before.items():
            version, new = _score(target, q)
            assert version == merged.manifest.version and NEW_SRCID in new
            changed = [s for s in old if old[s] != new[s]]
            if changed:
                raise AssertionError(f"{q}: old srcids changed score after the swap: {changed[:5]}")
            unchanged += len(old)
        print(f"after the swap: {unchanged} old scores on {len(before)} queries unchanged, srcid {NEW_SRCID} "
              f"served: {new[NEW_SRCID]:.6f}")
    except BaseException:
        server_log.flush()
        print("server log (tail):\n" + (work / "server.log").read_text(errors="replace")[-3000:], file=sys.stderr)
        raise
    finally:
        server.terminate()
        server.wait(timeout=30)
        server_log.close()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    doc = {"rows": args.rows, "seconds": {k: round(v, 2) for k, v in timings.items()},
           "features": {"distinct": result.features.unique, "computed": result.features.computed,
                        "rows_per_s": round(result.features.computed / max(result.features.seconds, 1e-9), 1)},
           "held_out": vars(result.training.val), "epochs": result.training.epochs,
           "merged": f"{merged.manifest.model}/{merged.manifest.version}", "cpu_count": os.cpu_count()}
    print(json.dumps(doc, indent=2, ensure_ascii=False))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
