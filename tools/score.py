"""python -m tools.score --target HOST:PORT --query Q [--title T] [--site S] [--ner TAG ...] [--industry I]

Prints `srcid:score` lines, highest score first.
"""

from __future__ import annotations

import argparse
import sys

import grpc

from scoring.v1 import scoring_pb2, scoring_pb2_grpc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.score", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="localhost:50051")
    ap.add_argument("--query", required=True)
    ap.add_argument("--title")
    ap.add_argument("--site")
    ap.add_argument("--ner", nargs="*", default=[])
    ap.add_argument("--industry")
    ap.add_argument("--srcid", type=int, action="append", default=[], help="score only these heads (repeatable)")
    ap.add_argument("--model", default="")
    ap.add_argument("--version", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=10.0, help="deadline in seconds")
    ap.add_argument("--names", action="store_true", help="also print each head's name")
    args = ap.parse_args(argv)

    request = scoring_pb2.ScoreRequest(query=args.query, ner=args.ner, srcids=args.srcid, model=args.model,
                                       version=args.version)
    for field in ("title", "site", "industry"):
        if getattr(args, field) is not None:
            setattr(request, field, getattr(args, field))
    with grpc.insecure_channel(args.target) as channel:
        stub = scoring_pb2_grpc.ScorerStub(channel)  # type: ignore[no-untyped-call]
        try:
            response = stub.Score(request, timeout=args.timeout)
            names = {}
            if args.names:
                info = stub.GetModelInfo(scoring_pb2.ModelInfoRequest(model=response.model,
                                                                      version=response.version),
                                         timeout=args.timeout)
                names = {h.srcid: h.name for h in info.heads}
        except grpc.RpcError as err:
            print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
    print(f"# {response.model} v{response.version}", file=sys.stderr)
    for srcid, score in sorted(response.scores.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"{srcid}:{score:.6f}" + (f"\t{names.get(srcid, '')}" if names else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
