"""The afternoon version: a plain `grpc.server(ThreadPoolExecutor)`, one ORT run per request, no batching.

    python -m bench.peers.naive_server --version-dir model_repo/demo/1 --port 50061

Same tokenizer and vocabularies (`FeatureEncoder`), same session options as the raw engine. Concurrent calls
run the one session from several pool threads at once (ORT allows that); nothing queues or groups them.
Stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent import futures

import grpc

from bench.peers.model import PeerModel
from bench.peers.rpc import peer_parser, scorer_handler, until_signal
from model_format.features import FeatureError
from scoring.v1 import scoring_pb2


def main(argv: Sequence[str] | None = None) -> int:
    ap = peer_parser("naive_server", __doc__)
    ap.add_argument("--threads", type=int, default=2, help="ORT intra-op threads")
    ap.add_argument("--workers", type=int, default=10, help="gRPC handler threads (10: the usual example value)")
    args = ap.parse_args(argv)
    wait = until_signal()
    model = PeerModel.load(args.version_dir, args.threads)

    def score(request: scoring_pb2.ScoreRequest, context: grpc.ServicerContext) -> scoring_pb2.ScoreResponse:
        try:
            item = model.encode(request)
        except FeatureError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return model.response(model.score([item])[0], request)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=args.workers))
    server.add_generic_rpc_handlers((scorer_handler(score),))
    server.add_insecure_port(f"{args.host}:{args.port}")
    server.start()
    wait()
    server.stop(grace=2).wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
