"""How a load run sends one serialized ScoreRequest: a unary call, or an item on a few ScoreStream calls.

`open_caller` gives `send(body) -> status code name` ("OK", "RESOURCE_EXHAUSTED", ...) and `close()`.
On `STREAM_METHOD` the items are multiplexed over `streams` bidirectional streams by
`scoring_client.StreamingScorer`, each with the run's timeout as its `timeout_ms`, and each answer's
own status is what is counted, as a unary call's status is.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import grpc

from scoring_client import ScoreError, StreamingScorer

STREAM_METHOD = "/scoring.v1.Scorer/ScoreStream"
Send = Callable[[bytes], Awaitable[str]]


async def _nothing() -> None:
    return None


def open_caller(channel: grpc.aio.Channel, method: str, timeout_s: float | None,
                metadata: tuple[tuple[str, str], ...], streams: int = 4) -> tuple[Send, Callable[[], Awaitable[None]]]:
    call_metadata = tuple(metadata) or None  # None: no metadata object per call
    if method == STREAM_METHOD:
        scorer = StreamingScorer(channel, streams=streams, metadata=call_metadata)

        async def send_item(body: bytes) -> str:
            try:
                await scorer.score_serialized(body, timeout=timeout_s)
            except ScoreError as exc:
                return str(exc.code.name)
            return "OK"

        return send_item, scorer.close

    call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)

    async def send_call(body: bytes) -> str:
        try:
            await call(body, timeout=timeout_s, metadata=call_metadata)
        except grpc.aio.AioRpcError as exc:
            return str(exc.code().name)
        return "OK"

    return send_call, _nothing
