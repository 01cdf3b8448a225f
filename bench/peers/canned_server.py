"""The transport floor: a gRPC server that decodes each ScoreRequest and answers a canned ScoreResponse.

    python -m bench.peers.canned_server --version-dir model_repo/demo/1 --port 50061

No model, no tokenizer, no batching: the same `grpc.aio` server on uvloop, raw-bytes handler and
response size (every head of the version, fixed scores) as `python -m server`, so its CPU per call is
what any Python gRPC front end pays before it does any work. `bench.compare` runs the raw engine while
this server carries the target rate, to measure how much of the machine the transport leaves the
engine. Stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Sequence
from pathlib import Path

import grpc
import uvloop
from google.protobuf.message import DecodeError

from model_format.manifest import read_manifest
from scoring.v1 import scoring_pb2

SERVICE = "scoring.v1.Scorer"


def canned_response(version_dir: Path) -> bytes:
    """Every head of the version with a fixed score, serialized once."""
    manifest = read_manifest(version_dir)
    scores = {s: 0.5 for s in manifest.srcids}
    return bytes(scoring_pb2.ScoreResponse(scores=scores, model=manifest.model,
                                           version=manifest.version).SerializeToString())


async def serve(host: str, port: int, answer: bytes) -> None:
    async def score(raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            scoring_pb2.ScoreRequest.FromString(raw)  # the decoding every real server does
        except DecodeError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"not a ScoreRequest: {exc}")
        return answer

    server = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(score, request_deserializer=None, response_serializer=None)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Score": handler}),))
    server.add_insecure_port(f"{host}:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"canned-answer server on {host}:{port}", flush=True)
    await stop.wait()
    await server.stop(grace=2)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.peers.canned_server", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version-dir", type=Path, required=True, help="model version folder (manifest.json)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args(argv)
    uvloop.run(serve(args.host, args.port, canned_response(args.version_dir)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
