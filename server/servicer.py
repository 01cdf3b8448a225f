"""The scoring.v1.Scorer service: decode, validate, resolve the model, queue, answer.

Every call ends in exactly one place that counts it: pv when the items arrive, lost with a reason
for every item that gets no scores. Requests are decoded here rather than by gRPC so that a
malformed message (for example invalid UTF-8) is INVALID_ARGUMENT, not an opaque INTERNAL. Answers
are serialized here too, from the score rows (server.responses). ScoreStream is server.stream.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from typing import NoReturn, TypeVar

import grpc
import numpy as np
from google.protobuf.message import DecodeError, Message

from model_format.features import EncodedRequest
from scoring.v1 import scoring_pb2
from server.admission import QueueFull
from server.batcher import BatcherClosed
from server.cache import CachingScheduler
from server.logs import SampledLog
from server.manager import ModelManager, ModelNotFound, ModelUnavailable
from server.metrics import UNKNOWN, LostReason, Metrics
from server.model import LoadedModel
from server.outcomes import ITEM_FAILURES, Rejection, queueing_rejection, reject, result_rejection
from server.responses import batch_response
from server.stream import ScoreStreamCall
from server.validation import InvalidRequest, RequestLimits, check_version_field, validate_and_encode

log = logging.getLogger(__name__)
SERVICE = "scoring.v1.Scorer"
M = TypeVar("M", bound=Message)


class _Ledger:
    """pv and lost for the items of one call, each under its own model/version labels."""

    __slots__ = ("counted", "labels", "metrics", "request_id")

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.labels = [(UNKNOWN, UNKNOWN)]
        self.counted = False
        self.request_id = ""

    def arrive(self) -> None:
        if not self.counted:
            self.counted = True
            for model, version in self.labels:
                self.metrics.count_pv(model, version)

    def lose(self, reason: LostReason) -> None:
        self.arrive()
        for model, version in self.labels:
            self.metrics.count_lost(model, version, reason)


class ScorerServicer:
    def __init__(self, manager: ModelManager, metrics: Metrics, limits: RequestLimits,
                 scheduler: CachingScheduler | None = None) -> None:
        self.manager = manager
        self.metrics = metrics
        self.limits = limits
        self.scheduler = scheduler or CachingScheduler(None, None)
        self.shutting_down = asyncio.Event()  # open streams stop reading, answer what they hold and end
        self.rejections = SampledLog(log)

    # --- shared steps (ScoreStream uses them too) ---------------------------------------------------

    @staticmethod
    def decode(raw: bytes, message: type[M]) -> M:
        try:
            decoded: M = message.FromString(raw)
        except DecodeError as exc:
            raise reject(LostReason.INVALID, f"request is not a valid {message.DESCRIPTOR.full_name} "
                         f"(strings must be valid UTF-8): {exc}") from exc
        return decoded

    def resolve(self, model: str, version: int) -> LoadedModel:
        try:
            check_version_field(version, self.limits)
            return self.manager.resolve(model, version)
        except InvalidRequest as exc:
            raise reject(LostReason.INVALID, str(exc)) from exc
        except ModelNotFound as exc:
            raise reject(LostReason.NOT_FOUND, str(exc)) from exc
        except ModelUnavailable as exc:
            raise reject(LostReason.UNAVAILABLE, str(exc)) from exc

    def labels(self, model: str) -> tuple[str, str]:
        """Metric labels for an item that never resolved a version (never raw request text)."""
        name = model or self.manager.default_model or UNKNOWN
        return (name if self.manager.known_model(name) else UNKNOWN), UNKNOWN

    def encode(self, req: scoring_pb2.ScoreRequest, model: LoadedModel) -> EncodedRequest:
        try:
            return validate_and_encode(req, model, self.limits)
        except InvalidRequest as exc:
            raise reject(LostReason.INVALID, str(exc)) from exc

    def submit(self, model: LoadedModel, items: list[EncodedRequest],
               deadline: float | None) -> list[asyncio.Future[np.ndarray]]:
        """Queues items on the version that was just resolved. Synchronous on purpose: no other task
        runs between resolving a version and queueing on it, so a swap cannot close it in between."""
        try:
            return self.scheduler.submit(model, items, deadline)
        except (QueueFull, BatcherClosed) as exc:
            raise queueing_rejection(exc) from exc

    @staticmethod
    def item_deadline(context: grpc.aio.ServicerContext, timeout_ms: int, now: float) -> float | None:
        """The event-loop time an item must reach the engine by: the earlier of the call's deadline and
        the item's own `timeout_ms` budget (either may be absent)."""
        remaining = context.time_remaining()
        deadline = now + remaining if remaining is not None else None
        if timeout_ms:
            own = now + timeout_ms / 1000.0
            deadline = own if deadline is None else min(deadline, own)
        return deadline

    @staticmethod
    async def _results(futures: list[asyncio.Future[np.ndarray]]) -> list[np.ndarray]:
        try:
            return list(await asyncio.gather(*futures)) if len(futures) > 1 else [await futures[0]]
        except ITEM_FAILURES as exc:
            raise result_rejection(exc) from exc
        finally:
            for f in futures:
                f.cancel()  # no-op when done; otherwise tells the batcher to drop the item

    def log_rejection(self, rej: Rejection, request_id: str, labels: tuple[str, str], items: int) -> None:
        fields = {"event": "rejected", "reason": rej.reason.value, "code": rej.code.name, "detail": rej.message,
                  "request_id": request_id[:128], "model": labels[0], "version": labels[1], "items": items}
        level = logging.ERROR if rej.reason is LostReason.INTERNAL else logging.WARNING
        self.rejections.log(level, rej.reason.value, "request rejected", **fields)

    @staticmethod
    def cancel_reason(context: grpc.aio.ServicerContext) -> LostReason:
        remaining = context.time_remaining()
        return LostReason.DEADLINE if remaining is not None and remaining <= 0 else LostReason.CANCELLED

    # --- unary RPCs -------------------------------------------------------------------------------

    async def Score(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        ledger = _Ledger(self.metrics)
        return await self._answer("Score", ledger, context, self._score(raw, ledger, context))

    async def ScoreBatch(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        ledger = _Ledger(self.metrics)
        return await self._answer("ScoreBatch", ledger, context, self._score_batch(raw, ledger, context))

    async def _answer(self, method: str, ledger: _Ledger, context: grpc.aio.ServicerContext,
                      call: Awaitable[tuple[bytes, str]]) -> bytes:
        """Runs a scoring call (which returns its serialized response and model name); every way it
        ends is counted here and answered with its status code."""
        t0 = time.perf_counter()
        try:
            response, model = await call
        except Rejection as rej:
            await self._abort(ledger, context, rej)
        except asyncio.CancelledError:
            ledger.lose(self.cancel_reason(context))
            raise
        except Exception:  # a bug, not the caller's fault: answer INTERNAL, count it, keep serving
            log.exception("unexpected error", extra={"event": "internal_error", "request_id": ledger.request_id})
            await self._abort(ledger, context, reject(LostReason.INTERNAL, "internal error"))
        self.metrics.observe_latency(model, method, time.perf_counter() - t0)
        return response

    async def _abort(self, ledger: _Ledger, context: grpc.aio.ServicerContext, rej: Rejection) -> NoReturn:
        ledger.lose(rej.reason)
        labels = ledger.labels[0] if ledger.labels else (UNKNOWN, UNKNOWN)
        self.log_rejection(rej, ledger.request_id, labels, len(ledger.labels))
        await context.abort(rej.code, rej.message)
        raise AssertionError("unreachable: abort raises")

    async def _score(self, raw: bytes, ledger: _Ledger, context: grpc.aio.ServicerContext) -> tuple[bytes, str]:
        req = self.decode(raw, scoring_pb2.ScoreRequest)
        ledger.request_id = req.request_id
        ledger.labels = [self.labels(req.model)]
        model = self.resolve(req.model, req.version)
        ledger.labels = [(model.name, str(model.version))]
        ledger.arrive()
        item = self.encode(req, model)
        deadline = self.item_deadline(context, req.timeout_ms, model.loop.time())
        (row,) = await self._results(self.submit(model, [item], deadline))
        return model.responses.encode(row, req.srcids, model.srcid_index), model.name

    async def _score_batch(self, raw: bytes, ledger: _Ledger,
                           context: grpc.aio.ServicerContext) -> tuple[bytes, str]:
        batch = self.decode(raw, scoring_pb2.ScoreBatchRequest)
        items = list(batch.items)
        ledger.labels = [self.labels(it.model) for it in items]
        ledger.request_id = items[0].request_id if items else ""
        if not items:
            raise reject(LostReason.INVALID, "items is empty")
        if len(items) > self.limits.max_batch_items:
            raise reject(LostReason.INVALID,
                         f"items has {len(items)} entries; the limit is {self.limits.max_batch_items}")
        models = []
        for i, it in enumerate(items):
            try:
                models.append(self.resolve(it.model, it.version))
            except Rejection as rej:
                raise rej.at_item(i) from None
        ledger.labels = [(m.name, str(m.version)) for m in models]
        ledger.arrive()
        encoded = []
        for i, (it, m) in enumerate(zip(items, models, strict=True)):
            try:
                encoded.append(self.encode(it, m))
            except Rejection as rej:
                raise rej.at_item(i) from None
        rows = await self._score_groups(models, encoded, items, context)
        results = [m.responses.encode(row, it.srcids, m.srcid_index)
                   for it, m, row in zip(items, models, rows, strict=True)]
        return batch_response(results), models[0].name

    async def _score_groups(self, models: list[LoadedModel], items: list[EncodedRequest],
                            requests: list[scoring_pb2.ScoreRequest],
                            context: grpc.aio.ServicerContext) -> list[np.ndarray]:
        """Items of one call usually share a version; otherwise each version's batcher gets its share.
        Admission is all-or-nothing: if one group is refused, the groups already queued are withdrawn."""
        groups: dict[tuple[int, int], list[int]] = {}
        for i, m in enumerate(models):
            groups.setdefault((id(m), requests[i].timeout_ms), []).append(i)
        now = models[0].loop.time()
        futures: list[asyncio.Future[np.ndarray]] = [None] * len(items)  # type: ignore[list-item]
        try:
            for (_, timeout_ms), idx in groups.items():
                deadline = self.item_deadline(context, timeout_ms, now)
                queued = self.submit(models[idx[0]], [items[i] for i in idx], deadline)
                for i, fut in zip(idx, queued, strict=True):
                    futures[i] = fut
        except Rejection:
            for fut in futures:
                if fut is not None:
                    fut.cancel()
            raise
        return await self._results(futures)

    async def GetModelInfo(self, raw: bytes, context: grpc.aio.ServicerContext) -> scoring_pb2.ModelInfo:
        try:
            req = self.decode(raw, scoring_pb2.ModelInfoRequest)
            m = self.resolve(req.model, req.version)
        except Rejection as rej:
            await context.abort(rej.code, rej.message)
            raise AssertionError("unreachable: abort raises") from None
        info = m.info()
        return scoring_pb2.ModelInfo(
            model=info.name,
            version=info.version,
            heads=[scoring_pb2.HeadInfo(srcid=h.srcid, name=h.name, threshold=h.threshold) for h in info.heads],
            precision=info.precision,
            execution_provider=info.provider,
            max_seq_len=info.max_seq_len,
            bottom_fingerprint=info.bottom_fingerprint,
        )

    # --- streaming --------------------------------------------------------------------------------

    async def ScoreStream(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
        await ScoreStreamCall(self, context).run(requests)

    def handler(self) -> grpc.GenericRpcHandler:
        """Method handlers that take raw bytes, so decoding errors are ours to report; the scoring
        methods answer bytes they serialized themselves."""
        def unary(fn: object, serialize: object = None) -> grpc.RpcMethodHandler:
            return grpc.unary_unary_rpc_method_handler(fn, request_deserializer=None, response_serializer=serialize)

        return grpc.method_handlers_generic_handler(SERVICE, {
            "Score": unary(self.Score),
            "ScoreBatch": unary(self.ScoreBatch),
            "ScoreStream": grpc.stream_stream_rpc_method_handler(self.ScoreStream),
            "GetModelInfo": unary(self.GetModelInfo, lambda m: m.SerializeToString()),
        })
