"""The transport floor: a gRPC server that decodes each ScoreRequest and answers a canned ScoreResponse.

    python -m bench.peers.canned_server --version-dir model_repo/demo/1 --port 50061

No model, no tokenizer, no batching: the same `grpc.aio` server on uvloop, raw-bytes handler and response size
(every head of the version, fixed scores) as `python -m server`, so its CPU per call is what any Python gRPC
front end pays before it does any work. `ScoreStream` is answered the same way, one canned answer with the
item's request_id per message read: the floor of a streamed item. Stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Sequence

import grpc
import uvloop
from google.protobuf.message import DecodeError

from bench.peers.rpc import SERVICE, peer_parser, scorer_handler
from model_format.manifest import read_manifest
from scoring.v1 import scoring_pb2
from server.responses import stream_answer


async def serve(host: str, port: int, answer: bytes) -> None:
    async def score(raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            scoring_pb2.ScoreRequest.FromString(raw)  # the decoding every real server does
        except DecodeError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"not a ScoreRequest: {exc}")
        return answer

    async def score_stream(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
        async for raw in requests:
            request = scoring_pb2.ScoreRequest.FromString(raw)
            await context.write(stream_answer(request.request_id, result=answer))

    stream = grpc.method_handlers_generic_handler(SERVICE, {
        "ScoreStream": grpc.stream_stream_rpc_method_handler(score_stream)})
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((scorer_handler(score, decode=False), stream))
    server.add_insecure_port(f"{host}:{port}")
    await server.start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=2)


def main(argv: Sequence[str] | None = None) -> int:
    args = peer_parser("canned_server", __doc__).parse_args(argv)
    manifest = read_manifest(args.version_dir)
    answer = scoring_pb2.ScoreResponse(scores=dict.fromkeys(manifest.srcids, 0.5), model=manifest.model,
                                       version=manifest.version).SerializeToString()
    uvloop.run(serve(args.host, args.port, answer))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
