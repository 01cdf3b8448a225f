"""The scoring.v1.Scorer service: decode, validate, resolve the model, queue, answer.

Every call ends in exactly one place that counts it: pv when the items arrive, lost with a reason
for every item that gets no scores. Requests are decoded here rather than by gRPC so that a
malformed message (for example invalid UTF-8) is INVALID_ARGUMENT, not an opaque INTERNAL.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TypeVar

import grpc
import numpy as np
from google.protobuf.message import DecodeError, Message

from model_format.features import EncodedRequest
from scoring.v1 import scoring_pb2
from server.admission import QueueFull
from server.batcher import BatcherClosed, DeadlineExpired, EngineFailed
from server.cache import CachingScheduler
from server.logs import SampledLog
from server.manager import ModelManager, ModelNotFound, ModelUnavailable
from server.metrics import UNKNOWN, LostReason, Metrics
from server.model import LoadedModel
from server.validation import InvalidRequest, RequestLimits, check_version_field, validate_and_encode

log = logging.getLogger(__name__)
SERVICE = "scoring.v1.Scorer"
M = TypeVar("M", bound=Message)
R = TypeVar("R")


@dataclass
class _Rejection(Exception):
    code: grpc.StatusCode
    reason: LostReason
    message: str


class _Ledger:
    """pv and lost for the items of one call, each under its own model/version labels."""

    def __init__(self, metrics: Metrics, labels: list[tuple[str, str]]) -> None:
        self.metrics = metrics
        self.labels = labels
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


_STATUS = {
    LostReason.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    LostReason.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    LostReason.QUEUE_FULL: grpc.StatusCode.RESOURCE_EXHAUSTED,
    LostReason.DEADLINE: grpc.StatusCode.DEADLINE_EXCEEDED,
    LostReason.CANCELLED: grpc.StatusCode.CANCELLED,
    LostReason.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    LostReason.INTERNAL: grpc.StatusCode.INTERNAL,
}


def _reject(reason: LostReason, message: str) -> _Rejection:
    return _Rejection(_STATUS[reason], reason, message)


def build_response(model: LoadedModel, row: np.ndarray, srcids: list[int]) -> scoring_pb2.ScoreResponse:
    if srcids:
        index = model.srcid_index
        scores = {s: float(row[index[s]]) for s in srcids}
    else:
        scores = dict(zip(model.srcids, row.tolist(), strict=True))
    return scoring_pb2.ScoreResponse(scores=scores, model=model.name, version=model.version)


class ScorerServicer:
    def __init__(self, manager: ModelManager, metrics: Metrics, limits: RequestLimits,
                 scheduler: CachingScheduler | None = None) -> None:
        self.manager = manager
        self.metrics = metrics
        self.limits = limits
        self.scheduler = scheduler or CachingScheduler(None, None)
        self._rejections = SampledLog(log)

    # --- shared steps -----------------------------------------------------------------------------

    @staticmethod
    def _decode(raw: bytes, message: type[M]) -> M:
        try:
            decoded: M = message.FromString(raw)
        except DecodeError as exc:
            raise _reject(LostReason.INVALID, f"request is not a valid {message.DESCRIPTOR.full_name} "
                          f"(strings must be valid UTF-8): {exc}") from exc
        return decoded

    def _resolve(self, model: str, version: int) -> LoadedModel:
        try:
            check_version_field(version, self.limits)
            return self.manager.resolve(model, version)
        except InvalidRequest as exc:
            raise _reject(LostReason.INVALID, str(exc)) from exc
        except ModelNotFound as exc:
            raise _reject(LostReason.NOT_FOUND, str(exc)) from exc
        except ModelUnavailable as exc:
            raise _reject(LostReason.UNAVAILABLE, str(exc)) from exc

    def _labels(self, model: str) -> tuple[str, str]:
        """Metric labels for a call that never resolved a version (never raw request text)."""
        name = model or self.manager.default_model or UNKNOWN
        return (name if self.manager.known_model(name) else UNKNOWN), UNKNOWN

    def _submit(self, model: LoadedModel, items: list[EncodedRequest],
                context: grpc.aio.ServicerContext) -> list[asyncio.Future[np.ndarray]]:
        """Queues items on the version that was just resolved. Synchronous on purpose: no other task
        runs between resolving a version and queueing on it, so a swap cannot close it in between."""
        remaining = context.time_remaining()
        deadline = asyncio.get_running_loop().time() + remaining if remaining is not None else None
        try:
            return self.scheduler.submit(model, items, deadline)
        except QueueFull as exc:
            raise _reject(LostReason.QUEUE_FULL, f"server overloaded: {exc}") from exc
        except BatcherClosed as exc:
            raise _reject(LostReason.UNAVAILABLE, f"version {model.version} is draining; retry") from exc

    @staticmethod
    async def _results(futures: list[asyncio.Future[np.ndarray]]) -> list[np.ndarray]:
        try:
            return list(await asyncio.gather(*futures)) if len(futures) > 1 else [await futures[0]]
        except DeadlineExpired as exc:
            raise _reject(LostReason.DEADLINE, "deadline passed while queued; not computed") from exc
        except EngineFailed as exc:
            raise _reject(LostReason.INTERNAL, str(exc)) from exc
        finally:
            for f in futures:
                f.cancel()  # no-op when done; otherwise tells the batcher to drop the item

    async def _finish(self, ledger: _Ledger, context: grpc.aio.ServicerContext, rej: _Rejection) -> None:
        ledger.lose(rej.reason)
        model, version = ledger.labels[0] if ledger.labels else (UNKNOWN, UNKNOWN)
        fields = {"event": "rejected", "reason": rej.reason.value, "code": rej.code.name, "detail": rej.message,
                  "request_id": ledger.request_id[:128], "model": model, "version": version,
                  "items": len(ledger.labels)}
        level = logging.ERROR if rej.reason is LostReason.INTERNAL else logging.WARNING
        self._rejections.log(level, rej.reason.value, "request rejected", **fields)
        await context.abort(rej.code, rej.message)

    @staticmethod
    def _cancel_reason(context: grpc.aio.ServicerContext) -> LostReason:
        remaining = context.time_remaining()
        return LostReason.DEADLINE if remaining is not None and remaining <= 0 else LostReason.CANCELLED

    # --- RPCs -------------------------------------------------------------------------------------

    async def Score(self, raw: bytes, context: grpc.aio.ServicerContext) -> scoring_pb2.ScoreResponse:
        ledger = _Ledger(self.metrics, [(UNKNOWN, UNKNOWN)])
        return await self._answer("Score", ledger, context, self._score(raw, ledger, context))

    async def ScoreBatch(self, raw: bytes, context: grpc.aio.ServicerContext) -> scoring_pb2.ScoreBatchResponse:
        ledger = _Ledger(self.metrics, [(UNKNOWN, UNKNOWN)])
        return await self._answer("ScoreBatch", ledger, context, self._score_batch(raw, ledger, context))

    async def _answer(self, method: str, ledger: _Ledger, context: grpc.aio.ServicerContext,
                      call: Awaitable[tuple[R, str]]) -> R:
        """Runs a scoring call (which returns its response and model name); every way it ends is
        counted here and answered with its status code."""
        t0 = time.perf_counter()
        try:
            response, model = await call
        except _Rejection as rej:
            await self._finish(ledger, context, rej)
            raise AssertionError("unreachable: abort raises") from None
        except asyncio.CancelledError:
            ledger.lose(self._cancel_reason(context))
            raise
        except Exception:  # a bug, not the caller's fault: answer INTERNAL, count it, keep serving
            log.exception("unexpected error", extra={"event": "internal_error", "request_id": ledger.request_id})
            await self._finish(ledger, context, _reject(LostReason.INTERNAL, "internal error"))
            raise AssertionError("unreachable: abort raises") from None
        self.metrics.request_latency.labels(model, method).observe(time.perf_counter() - t0)
        return response

    async def _score(self, raw: bytes, ledger: _Ledger,
                     context: grpc.aio.ServicerContext) -> tuple[scoring_pb2.ScoreResponse, str]:
        req = self._decode(raw, scoring_pb2.ScoreRequest)
        ledger.request_id = req.request_id
        ledger.labels = [self._labels(req.model)]
        model = self._resolve(req.model, req.version)
        ledger.labels = [(model.name, str(model.version))]
        ledger.arrive()
        try:
            item = validate_and_encode(req, model, self.limits)
        except InvalidRequest as exc:
            raise _reject(LostReason.INVALID, str(exc)) from exc
        (row,) = await self._results(self._submit(model, [item], context))
        return build_response(model, row, list(req.srcids)), model.name

    async def _score_batch(self, raw: bytes, ledger: _Ledger,
                           context: grpc.aio.ServicerContext) -> tuple[scoring_pb2.ScoreBatchResponse, str]:
        batch = self._decode(raw, scoring_pb2.ScoreBatchRequest)
        items = list(batch.items)
        ledger.labels = [self._labels(it.model) for it in items]
        ledger.request_id = items[0].request_id if items else ""
        if not items:
            raise _reject(LostReason.INVALID, "items is empty")
        if len(items) > self.limits.max_batch_items:
            raise _reject(LostReason.INVALID,
                          f"items has {len(items)} entries; the limit is {self.limits.max_batch_items}")
        models = []
        for i, it in enumerate(items):
            try:
                models.append(self._resolve(it.model, it.version))
            except _Rejection as rej:
                raise _Rejection(rej.code, rej.reason, f"items[{i}]: {rej.message}") from None
        ledger.labels = [(m.name, str(m.version)) for m in models]
        ledger.arrive()
        encoded = []
        for i, (it, m) in enumerate(zip(items, models, strict=True)):
            try:
                encoded.append(validate_and_encode(it, m, self.limits))
            except InvalidRequest as exc:
                raise _reject(LostReason.INVALID, f"items[{i}]: {exc}") from exc
        rows = await self._score_groups(models, encoded, context)
        results = [build_response(m, row, list(it.srcids)) for it, m, row in zip(items, models, rows, strict=True)]
        return scoring_pb2.ScoreBatchResponse(results=results), models[0].name

    async def _score_groups(self, models: list[LoadedModel], items: list[EncodedRequest],
                            context: grpc.aio.ServicerContext) -> list[np.ndarray]:
        """Items of one call usually share a version; otherwise each version's batcher gets its share.
        Admission is all-or-nothing: if one group is refused, the groups already queued are withdrawn."""
        groups: dict[int, list[int]] = {}
        for i, m in enumerate(models):
            groups.setdefault(id(m), []).append(i)
        futures: list[asyncio.Future[np.ndarray]] = [None] * len(items)  # type: ignore[list-item]
        try:
            for idx in groups.values():
                for i, fut in zip(idx, self._submit(models[idx[0]], [items[i] for i in idx], context), strict=True):
                    futures[i] = fut
        except _Rejection:
            for fut in futures:
                if fut is not None:
                    fut.cancel()
            raise
        return await self._results(futures)

    async def GetModelInfo(self, raw: bytes, context: grpc.aio.ServicerContext) -> scoring_pb2.ModelInfo:
        try:
            req = self._decode(raw, scoring_pb2.ModelInfoRequest)
            m = self._resolve(req.model, req.version)
        except _Rejection as rej:
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

    def handler(self) -> grpc.GenericRpcHandler:
        """Method handlers that take raw bytes, so decoding errors are ours to report."""
        def unary(fn: object) -> grpc.RpcMethodHandler:
            return grpc.unary_unary_rpc_method_handler(
                fn, request_deserializer=None, response_serializer=lambda m: m.SerializeToString()
            )

        return grpc.method_handlers_generic_handler(SERVICE, {
            "Score": unary(self.Score),
            "ScoreBatch": unary(self.ScoreBatch),
            "GetModelInfo": unary(self.GetModelInfo),
        })
