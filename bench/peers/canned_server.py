"""The transport floor: a gRPC server that decodes each ScoreRequest and answers a canned ScoreResponse.

    python -m bench.peers.canned_server --version-dir model_repo/demo/1 --port 50061

No model, no tokenizer, no batching: the same `grpc.aio` server on uvloop, raw-bytes handler and response size
(every head of the version, fixed scores) as `python -m server`, so its CPU per call is what any Python gRPC
front end pays before it does any work. `ScoreStream` is answered the same way, one canned answer with the
item's request_id per message read: the floor of a streamed item. `--delay-ms D` answers each call (and each
streamed item) D ms after it arrives, without holding anything else up: a closed loop then runs at the rate
a real server's misses do, and the floor is measured at that rate too (per-call costs fall as the rate rises).
Stops on SIGTERM or SIGINT.
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


async def serve(host: str, port: int, answer: bytes, delay_s: float) -> None:
    async def score(raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            scoring_pb2.ScoreRequest.FromString(raw)  # the decoding every real server does
        except DecodeError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"not a ScoreRequest: {exc}")
        if delay_s:
            await asyncio.sleep(delay_s)
        return answer

    async def score_stream(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
        if not delay_s:
            async for raw in requests:
                request = scoring_pb2.ScoreRequest.FromString(raw)
                await context.write(stream_answer(request.request_id, result=answer))
            return
        loop = asyncio.get_running_loop()
        due: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()  # FIFO is due order: one delay

        async def read() -> None:
            async for raw in requests:
                request = scoring_pb2.ScoreRequest.FromString(raw)
                due.put_nowait((loop.time() + delay_s, stream_answer(request.request_id, result=answer)))
            due.put_nowait(None)

        reader = loop.create_task(read())
        while (item := await due.get()) is not None:
            await asyncio.sleep(max(0.0, item[0] - loop.time()))
            await context.write(item[1])
        await reader

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
    ap = peer_parser("canned_server", __doc__)
    ap.add_argument("--delay-ms", type=float, default=0.0, help="answer each call this long after it arrives")
    args = ap.parse_args(argv)
    manifest = read_manifest(args.version_dir)
    answer = scoring_pb2.ScoreResponse(scores=dict.fromkeys(manifest.srcids, 0.5), model=manifest.model,
                                       version=manifest.version).SerializeToString()
    uvloop.run(serve(args.host, args.port, answer, args.delay_ms / 1000.0))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
