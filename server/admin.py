"""scoring.v1.ModelAdmin: version lifecycle by hand. Own port, loopback by default, optional token."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from model_format.repository import valid_model_name
from scoring.v1 import admin_pb2
from server.manager import LifecycleError, ModelManager, ModelNotFound

log = logging.getLogger(__name__)
SERVICE = "scoring.v1.ModelAdmin"


class TokenInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses every call without `authorization: Bearer <token>`; compares in constant time."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

        async def deny(_request: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong admin token")

        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        metadata = dict(details.invocation_metadata or ())
        given = str(metadata.get("authorization", "")).encode()
        if hmac.compare_digest(given, self._expected):
            return await continuation(details)
        log.warning("admin call refused", extra={"event": "admin_unauthenticated", "method": details.method})
        return self._deny


def _status_of(manager: ModelManager, model: str) -> admin_pb2.ModelStatus:
    records = manager.snapshot(model).get(model)
    if records is None:
        return admin_pb2.ModelStatus(model=model)
    versions = []
    for version, r in sorted(records.versions.items()):
        info = r.loaded.info() if r.loaded else None
        versions.append(admin_pb2.VersionStatus(
            version=version, state=r.state.value, reason=r.reason,
            precision=info.precision if info else "",
            execution_provider=info.provider if info else "",
            loaded_at_unix=info.loaded_at if info else 0.0,
        ))
    return admin_pb2.ModelStatus(model=model, serving_version=records.serving.version if records.serving else 0,
                                 pinned_version=records.pinned, versions=versions)


class AdminServicer:
    def __init__(self, manager: ModelManager) -> None:
        self.manager = manager

    async def _guard(self, context: grpc.aio.ServicerContext, model: str, version: int | None,
                     action: Callable[[], Awaitable[object]]) -> None:
        """Validates names (so no call can reach outside the repository) and maps errors to statuses."""
        if not valid_model_name(model):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"invalid model name {model[:80]!r}: [A-Za-z0-9][A-Za-z0-9_.-]{{0,63}}")
        if version is not None and version < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"invalid version {version}")
        try:
            await action()
        except ModelNotFound as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except LifecycleError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        log.info("admin call", extra={"event": "admin", "model": model, "version": version})

    async def ListModels(self, request: admin_pb2.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> admin_pb2.ListModelsResponse:
        return admin_pb2.ListModelsResponse(
            models=[_status_of(self.manager, name) for name in self.manager.snapshot(request.model)])

    async def LoadVersion(self, request: admin_pb2.VersionRef,
                          context: grpc.aio.ServicerContext) -> admin_pb2.ModelStatus:
        await self._guard(context, request.model, request.version,
                          lambda: self.manager.load(request.model, request.version))
        return _status_of(self.manager, request.model)

    async def UnloadVersion(self, request: admin_pb2.VersionRef,
                            context: grpc.aio.ServicerContext) -> admin_pb2.ModelStatus:
        await self._guard(context, request.model, request.version,
                          lambda: self.manager.unload(request.model, request.version))
        return _status_of(self.manager, request.model)

    async def SetServingVersion(self, request: admin_pb2.VersionRef,
                                context: grpc.aio.ServicerContext) -> admin_pb2.ModelStatus:
        await self._guard(context, request.model, request.version,
                          lambda: self.manager.set_serving(request.model, request.version))
        return _status_of(self.manager, request.model)

    async def Rollback(self, request: admin_pb2.ModelRef, context: grpc.aio.ServicerContext) -> admin_pb2.ModelStatus:
        await self._guard(context, request.model, None, lambda: self.manager.rollback(request.model))
        return _status_of(self.manager, request.model)

    async def ReloadRepository(self, request: admin_pb2.ReloadRequest,
                               context: grpc.aio.ServicerContext) -> admin_pb2.ListModelsResponse:
        await self.manager.reconcile()
        return await self.ListModels(admin_pb2.ListModelsRequest(), context)
