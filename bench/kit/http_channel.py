"""An HTTP/1.1 JSON endpoint driven by the gRPC load generator (`loadtest.openloop.run_open_loop`,
`loadtest.sweep.find_max_rate`) unchanged: `HttpChannel` offers the one part of `grpc.aio.Channel` they use,
`unary_unary(path)(body, timeout=…, metadata=…) -> bytes`, as a POST of the pre-serialized body on keep-alive
connections (aiohttp, no cap on their number, so an open loop is never held back by a pool). A status other than
200, a timeout or a refused connection raises `grpc.aio.AioRpcError` with the matching code, so failures are
counted by name exactly as a gRPC server's are, and latency is timed by the same code from the scheduled send.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

import aiohttp
import grpc

# How an HTTP status reads as a gRPC code (the gRPC-HTTP mapping, plus 504 for a server-side timeout).
STATUS_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
                403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.UNIMPLEMENTED,
                413: grpc.StatusCode.RESOURCE_EXHAUSTED, 422: grpc.StatusCode.INVALID_ARGUMENT,
                429: grpc.StatusCode.UNAVAILABLE, 500: grpc.StatusCode.INTERNAL, 502: grpc.StatusCode.UNAVAILABLE,
                503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.DEADLINE_EXCEEDED}
Call = Callable[..., Awaitable[bytes]]


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


class HttpChannel:
    """`async with HttpChannel("127.0.0.1:8000") as channel: await channel.unary_unary("/predict")(body)`."""

    def __init__(self, target: str, content_type: str = "application/json") -> None:
        self.base = f"http://{target}"
        self.headers = {"Content-Type": content_type}
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> HttpChannel:
        # limit=0: as many connections as calls in flight (HTTP/1.1 carries one call at a time per connection).
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), headers=self.headers,
                                              timeout=aiohttp.ClientTimeout(total=None))
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def unary_unary(self, method: str, request_serializer: Any = None, response_deserializer: Any = None) -> Call:
        """POST to `method` (a path); raw bytes in and out, like the generator's gRPC calls (no serializers)."""
        if request_serializer is not None or response_deserializer is not None:
            raise ValueError("HttpChannel carries raw bytes only")
        url = self.base + method

        async def call(body: bytes, timeout: float | None = None, metadata: Any = None) -> bytes:
            session = self._session
            if session is None:
                raise RuntimeError("HttpChannel used outside `async with`")
            try:
                async with asyncio.timeout(timeout):
                    async with session.post(url, data=body) as resp:
                        payload: bytes = await resp.read()
            except TimeoutError as exc:
                raise rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded") from exc
            except aiohttp.ClientError as exc:
                raise rpc_error(grpc.StatusCode.UNAVAILABLE, f"{type(exc).__name__}: {exc}") from exc
            if resp.status != 200:
                code = STATUS_CODES.get(resp.status, grpc.StatusCode.UNKNOWN)
                raise rpc_error(code, f"HTTP {resp.status}: {payload[:200]!r}")
            return payload

        return call
