"""Many concurrent `score()` calls multiplexed over a few ScoreStream calls.

    async with StreamingScorer(channel, streams=4) as scorer:
        response = await scorer.score(scoring_pb2.ScoreRequest(query="天气"), timeout=0.2)

Each item travels as one stream message with its own request id, and `score()` waits for the answer
carrying that id: callers keep a plain awaitable, and client and server spend a stream message per
item instead of a call (see BENCHMARKS.md, 'Per-call cost'). An item the server answers with an
error raises ScoreError with the gRPC status code and message a unary Score would have ended with.
A stream that breaks fails the calls waiting on it with its status and is reopened at the next call.
Retrying is the caller's choice, as with unary calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
from collections.abc import Sequence
from types import TracebackType

import grpc

from scoring.v1 import scoring_pb2

_CODES = {code.value[0]: code for code in grpc.StatusCode}
METHOD = "/scoring.v1.Scorer/ScoreStream"
class ScoreError(Exception):
    """An item that got no scores, with its gRPC status code."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class _Stream:
    """One ScoreStream call and the items waiting for their answers on it."""

    def __init__(self, channel: grpc.aio.Channel, metadata: Sequence[tuple[str, str]] | None) -> None:
        method = channel.stream_stream(METHOD, request_serializer=None,  # items arrive serialized
                                       response_deserializer=scoring_pb2.ScoreStreamResponse.FromString)
        self.call = method(metadata=metadata)
        self.waiting: dict[str, asyncio.Future[scoring_pb2.ScoreResponse]] = {}
        self.write_lock = asyncio.Lock()  # grpc.aio allows one write in progress per call
        self.broken: ScoreError | None = None
        self.reader = asyncio.get_running_loop().create_task(self._read(), name="score-stream-answers")

    async def _read(self) -> None:
        error = ScoreError(grpc.StatusCode.UNAVAILABLE, "the stream ended")
        try:
            async for answer in self.call:
                future = self.waiting.pop(answer.request_id, None)
                if future is None or future.done():
                    continue  # its caller stopped waiting
                if answer.code == 0:
                    future.set_result(answer.result)
                else:
                    future.set_exception(ScoreError(_CODES.get(answer.code, grpc.StatusCode.UNKNOWN), answer.message))
        except grpc.aio.AioRpcError as exc:
            error = ScoreError(exc.code(), exc.details() or "")
        except asyncio.CancelledError:
            error = ScoreError(grpc.StatusCode.CANCELLED, "the client closed the stream")
        self.broken = error
        for future in self.waiting.values():
            if not future.done():
                future.set_exception(error)
        self.waiting.clear()

    async def send(self, item: bytes, request_id: str) -> asyncio.Future[scoring_pb2.ScoreResponse]:
        future: asyncio.Future[scoring_pb2.ScoreResponse] = asyncio.get_running_loop().create_future()
        self.waiting[request_id] = future
        try:
            async with self.write_lock:
                await self.call.write(item)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
            self.waiting.pop(request_id, None)
            await asyncio.sleep(0)  # let the reader record why the stream broke
            raise self.broken or ScoreError(grpc.StatusCode.UNAVAILABLE, f"the stream broke: {exc}") from exc
        except BaseException:
            self.waiting.pop(request_id, None)
            raise
        return future

    async def close(self) -> None:
        """Half-closes the stream and waits until every item sent on it is answered."""
        if self.broken is None:
            async with self.write_lock:
                with contextlib.suppress(grpc.aio.AioRpcError):  # broken: the reader failed what waited
                    await self.call.done_writing()
        await self.reader


class StreamingScorer:
    """Scores through `streams` ScoreStream calls on one channel, each call on the least busy stream."""

    def __init__(self, channel: grpc.aio.Channel, streams: int = 2,
                 metadata: Sequence[tuple[str, str]] | None = None) -> None:
        if streams < 1:
            raise ValueError("streams must be at least 1")
        self._channel = channel
        self._metadata = metadata
        self._streams: list[_Stream | None] = [None] * streams
        self._ids = itertools.count()
        self._closed = False

    async def __aenter__(self) -> StreamingScorer:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    def _stream(self) -> _Stream:
        slot = min(range(len(self._streams)), key=lambda i: self._load(self._streams[i]))
        stream = self._streams[slot]
        if stream is None or stream.broken is not None:
            stream = self._streams[slot] = _Stream(self._channel, self._metadata)
        return stream

    @staticmethod
    def _load(stream: _Stream | None) -> int:
        return -1 if stream is None or stream.broken is not None else len(stream.waiting)

    async def score(self, request: scoring_pb2.ScoreRequest, timeout: float | None = None) -> scoring_pb2.ScoreResponse:
        """Scores one request; `timeout` (seconds) becomes the item's `timeout_ms` on the server, and the
        wait here ends a little later so the server's DEADLINE_EXCEEDED answer arrives first. The
        request is not modified; a request_id of its own must be unique among the calls in flight."""
        return await self.score_serialized(request.SerializeToString(), request.request_id, timeout)

    async def score_serialized(self, request: bytes, request_id: str = "",
                               timeout: float | None = None) -> scoring_pb2.ScoreResponse:
        """`score` for a request already serialized (a load generator's way); `request_id` is the one
        it holds, if any. The id and the time budget are appended as fields: the last value wins."""
        if self._closed:
            raise RuntimeError("the StreamingScorer is closed")
        stream = self._stream()
        own = not request_id
        if own:
            request_id = f"~{next(self._ids)}"
        elif request_id in stream.waiting:
            raise ValueError(f"request_id {request_id!r} is already in flight on this stream")
        if own or timeout is not None:  # serialized messages concatenate: these fields override the request's
            request += scoring_pb2.ScoreRequest(request_id=request_id if own else "",
                                                timeout_ms=0 if timeout is None else max(1, math.ceil(timeout * 1000))
                                                ).SerializeToString()
        future = await stream.send(request, request_id)
        try:
            async with asyncio.timeout(None if timeout is None else timeout + 1.0):
                return await future
        except TimeoutError:
            raise ScoreError(grpc.StatusCode.DEADLINE_EXCEEDED, "no answer within the timeout") from None
        finally:
            if not future.done():
                stream.waiting.pop(request_id, None)

    async def close(self) -> None:
        """Waits for every call in flight, then ends the streams."""
        self._closed = True
        await asyncio.gather(*(s.close() for s in self._streams if s is not None))
