"""ScoreStream: one bidirectional stream, many items, each answered on its own with its own status.

The reader decodes each message, validates and queues it exactly as Score does (same cache,
coalescing and batcher) and reads on; when an item's future is done, its answer goes on the outbox,
which the call's coroutine writes. No task per item. At most `max_stream_inflight` items are read and
not yet answered: the reader waits for room before it reads on, so a client that does not read its
answers is slowed by gRPC flow control instead of filling the server's memory.

Every item counts in `model_pv`, and in `model_lost` with its reason when it gets no scores, as a
Score call would. Cancelling the stream cancels its queued items (the batcher drops them before
compute) and counts them lost. A server shutdown stops the reading, answers what was read, then
ends the call with UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc
import numpy as np

from scoring.v1 import scoring_pb2
from server.metrics import UNKNOWN, LostReason
from server.model import LoadedModel
from server.outcomes import ITEM_FAILURES, Rejection, reject, result_rejection
from server.responses import stream_answer

if TYPE_CHECKING:
    from server.servicer import ScorerServicer

log = logging.getLogger(__name__)
METHOD = "ScoreStream"


# An answer on the outbox: its bytes, and for a scored item its labels and start (the latency is observed,
# and the item counted lost if the call ends first, once it is written); error answers are counted already.
_Answer = tuple[bytes, tuple[str, str] | None, float]


class _Item:
    """An item queued on a batcher, until its answer is on the outbox."""

    __slots__ = ("future", "labels", "model", "request_id", "srcids", "started")

    def __init__(self, request_id: str, model: LoadedModel, srcids: list[int], future: asyncio.Future[np.ndarray],
                 started: float) -> None:
        self.request_id = request_id
        self.model = model
        self.srcids = srcids
        self.labels = (model.name, str(model.version))
        self.future = future
        self.started = started


class ScoreStreamCall:
    """One ScoreStream call, from its first message to its end."""

    def __init__(self, servicer: ScorerServicer, context: grpc.aio.ServicerContext) -> None:
        self.servicer = servicer
        self.metrics = servicer.metrics
        self.context = context
        # None ends the call: every item is answered.
        self.outbox: asyncio.Queue[_Answer | None] = asyncio.Queue()
        self.room = asyncio.Semaphore(servicer.limits.max_stream_inflight)
        self.queued: set[_Item] = set()
        self.unanswered = 0  # read and not yet on the outbox
        self.reading = True
        self.stopped_by_shutdown = False

    async def run(self, requests: AsyncIterator[bytes]) -> None:
        loop = asyncio.get_running_loop()
        reader = loop.create_task(self._read(requests), name="score-stream-reader")
        stopper = loop.create_task(self._stop_on_shutdown(reader), name="score-stream-stopper")
        writing: _Answer | None = None
        try:
            while (writing := await self.outbox.get()) is not None:
                answer, scored, started = writing
                await self.context.write(answer)
                writing = None
                if scored is not None:
                    self.metrics.observe_latency(scored[0], METHOD, time.perf_counter() - started)
                self.room.release()
        except asyncio.CancelledError:  # the client went away or the call's deadline passed
            self._drop_unanswered(self.servicer.cancel_reason(self.context), writing)
            raise
        except Exception:  # the transport failed under a write: nobody will read what is queued
            self._drop_unanswered(LostReason.CANCELLED, writing)
            raise
        finally:
            reader.cancel()
            stopper.cancel()
        if self.stopped_by_shutdown:
            await self.context.abort(grpc.StatusCode.UNAVAILABLE, "server shutting down; reconnect to another replica")

    async def _stop_on_shutdown(self, reader: asyncio.Task[None]) -> None:
        await self.servicer.shutting_down.wait()
        self.stopped_by_shutdown = True
        reader.cancel()

    async def _read(self, requests: AsyncIterator[bytes]) -> None:
        try:
            while True:
                await self.room.acquire()
                raw = await anext(requests, None)
                if raw is None:
                    break
                self._admit(raw)
        except asyncio.CancelledError:
            pass  # shutdown, or the call ended: read no further
        except Exception:  # the transport failed mid-read; what was read is still answered
            log.warning("stream read failed", exc_info=True, extra={"event": "stream_read_failed"})
        self.reading = False
        self._end_if_answered()

    def _admit(self, raw: bytes) -> None:
        started = time.perf_counter()
        self.unanswered += 1
        s = self.servicer
        request_id, labels, counted = "", (UNKNOWN, UNKNOWN), False
        try:
            req = s.decode(raw, scoring_pb2.ScoreRequest)
            request_id, labels = req.request_id, s.labels(req.model)
            model = s.resolve(req.model, req.version)
            labels, counted = (model.name, str(model.version)), True
            self.metrics.count_pv(*labels)
            encoded = s.encode(req, model)
            deadline = s.item_deadline(self.context, req.timeout_ms, model.loop.time())
            (future,) = s.submit(model, [encoded], deadline)
        except Rejection as rej:
            self._reject(request_id, labels, counted, rej)
            return
        except Exception:  # a bug, not the caller's fault: this item answers INTERNAL, the stream lives on
            log.exception("unexpected error", extra={"event": "internal_error", "request_id": request_id[:128]})
            self._reject(request_id, labels, counted, reject(LostReason.INTERNAL, "internal error"))
            return
        item = _Item(request_id, model, list(req.srcids), future, started)
        self.queued.add(item)
        future.add_done_callback(functools.partial(self._done, item))

    def _done(self, item: _Item, future: asyncio.Future[np.ndarray]) -> None:
        self.queued.discard(item)
        if future.cancelled():
            return  # the stream is going away: _drop_unanswered counted it
        exc = future.exception()
        if exc is None:
            model = item.model
            result = model.responses.encode(future.result(), item.srcids, model.srcid_index)
            self._send(stream_answer(item.request_id, result=result), item.labels, item.started)
            return
        if not isinstance(exc, ITEM_FAILURES):
            log.error("unexpected error", exc_info=exc, extra={"event": "internal_error",
                                                               "request_id": item.request_id[:128]})
        self._reject(item.request_id, item.labels, True, result_rejection(exc))

    def _reject(self, request_id: str, labels: tuple[str, str], counted: bool, rej: Rejection) -> None:
        if not counted:
            self.metrics.count_pv(*labels)
        self.metrics.count_lost(*labels, rej.reason)
        self.servicer.log_rejection(rej, request_id, labels, 1)
        self._send(stream_answer(request_id, rej.code.value[0], rej.message))

    def _send(self, answer: bytes, scored: tuple[str, str] | None = None, started: float = 0.0) -> None:
        self.outbox.put_nowait((answer, scored, started))
        self.unanswered -= 1
        self._end_if_answered()

    def _end_if_answered(self) -> None:
        if not self.reading and self.unanswered == 0:
            self.outbox.put_nowait(None)

    def _drop_unanswered(self, reason: LostReason,
                         writing: _Answer | None) -> None:
        """The call ends before every item read was answered: the queued ones are withdrawn (the batcher
        drops them before compute) and, like the scores computed but not delivered, counted lost."""
        for item in list(self.queued):
            if item.future.cancel():  # tells the batcher (or the coalescing leader) to drop it
                self.metrics.count_lost(*item.labels, reason)
        self.queued.clear()
        unsent: list[_Answer | None] = [writing]
        while not self.outbox.empty():
            unsent.append(self.outbox.get_nowait())
        for entry in unsent:
            if entry is not None and entry[1] is not None:
                self.metrics.count_lost(*entry[1], reason)

