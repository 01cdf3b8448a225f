"""The server process: gRPC (scoring, health, reflection), metrics endpoint, startup and shutdown."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from scoring.v1 import admin_pb2_grpc, scoring_pb2
from server.admin import AdminServicer, TokenInterceptor
from server.cache import CacheMetrics, CachingScheduler, ResultCache
from server.manager import ManagerConfig, ModelManager
from server.metrics import Metrics
from server.servicer import SERVICE, ScorerServicer
from server.validation import RequestLimits

log = logging.getLogger(__name__)
LIVENESS = "liveness"  # SERVING while the process works, whatever the models do: for liveness probes
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass(frozen=True)
class ServerConfig:
    manager: ManagerConfig
    host: str = "[::]"
    grpc_port: int = 50051
    metrics_port: int = 9100  # 0 = no metrics endpoint
    limits: RequestLimits = field(default_factory=RequestLimits)
    grace_period_s: float = 10.0
    shutdown_delay_s: float = 0.0  # NOT_SERVING this long before refusing calls, so balancers drain
    max_connection_age_s: float = 300.0  # clients reconnect and rebalance across replicas
    admin_host: str = "127.0.0.1"
    admin_port: int = 50052  # 0 = no admin service
    admin_token: str = ""  # empty = no token (only sensible on loopback)
    tls_cert: Path | None = None  # PEM server certificate chain: TLS on the scoring port
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # PEM CA bundle: require and verify client certificates (mTLS)
    cache_bytes: int = 0  # result cache bound; 0 = no cache, no coalescing
    cache_ttl_s: float = 0.0  # 0 = entries live until evicted (a new version never hits old entries)
    reuse_port: bool = False  # SO_REUSEPORT: several worker processes share the gRPC port
    worker_index: int = 0


def server_credentials(cfg: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS when a certificate is configured; mutual TLS when a client CA is configured too."""
    if cfg.tls_cert is None and cfg.tls_key is None:
        if cfg.tls_client_ca is not None:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if cfg.tls_cert is None or cfg.tls_key is None:
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    client_ca = cfg.tls_client_ca.read_bytes() if cfg.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(cfg.tls_key.read_bytes(), cfg.tls_cert.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


class ScoringServer:
    def __init__(self, config: ServerConfig, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.manager = ModelManager(config.manager, self.metrics)
        self.manager.on_change(self.metrics.publish_versions)
        self.health = health_aio.HealthServicer()
        cache = None
        cache_metrics = CacheMetrics.create(self.metrics.registry)
        if config.cache_bytes > 0:
            cache = ResultCache(config.cache_bytes, config.cache_ttl_s, cache_metrics)
        self.servicer = ScorerServicer(self.manager, self.metrics, config.limits,
                                       CachingScheduler(cache, cache_metrics if cache is not None else None))
        self.port = 0
        self.admin_port = 0
        self._server: grpc.aio.Server | None = None
        self._admin: grpc.aio.Server | None = None
        self._stopped = asyncio.Event()
        self._shutting_down = False
        self._background: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        """Binds the ports, answers NOT_SERVING, loads and warms the models, then turns SERVING."""
        cfg = self.config
        options = [
            ("grpc.max_receive_message_length", cfg.limits.max_message_bytes),
            ("grpc.max_send_message_length", cfg.limits.max_message_bytes),
            ("grpc.max_connection_age_ms", int(cfg.max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", int(cfg.grace_period_s * 1000)),
            ("grpc.so_reuseport", 1 if cfg.reuse_port else 0),
        ]
        server = grpc.aio.server(options=options)
        server.add_generic_rpc_handlers((self.servicer.handler(),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (scoring_pb2.DESCRIPTOR.services_by_name["Scorer"].full_name,
             health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME),
            server,
        )
        address = f"{cfg.host}:{cfg.grpc_port}"
        credentials = server_credentials(cfg)
        self.port = (server.add_secure_port(address, credentials) if credentials
                     else server.add_insecure_port(address))
        if self.port == 0:
            raise OSError(f"cannot bind gRPC port {cfg.host}:{cfg.grpc_port}")
        await self._set_health(False)
        await self.health.set(LIVENESS, SERVING)
        await server.start()
        self._server = server
        if cfg.metrics_port:
            start_http_server(cfg.metrics_port, registry=self.metrics.registry)
        log.info("listening", extra={"event": "listening", "grpc_port": self.port, "metrics_port": cfg.metrics_port,
                                     "worker": cfg.worker_index, "pid": os.getpid()})
        self.manager.on_change(lambda _models: self._schedule_health_refresh())
        if cfg.admin_port:
            await self._start_admin()
        await self.manager.start()
        await self._refresh_health()
        return self.port

    async def _start_admin(self) -> None:
        cfg = self.config
        if not cfg.admin_token and cfg.admin_host not in ("127.0.0.1", "::1", "localhost"):
            log.warning("admin service exposed without a token", extra={"event": "admin_insecure",
                                                                         "host": cfg.admin_host})
        interceptors = [TokenInterceptor(cfg.admin_token)] if cfg.admin_token else []
        admin = grpc.aio.server(interceptors=interceptors)
        admin_pb2_grpc.add_ModelAdminServicer_to_server(AdminServicer(self.manager), admin)  # type: ignore[no-untyped-call]
        self.admin_port = admin.add_insecure_port(f"{cfg.admin_host}:{cfg.admin_port}")
        if self.admin_port == 0:
            raise OSError(f"cannot bind admin port {cfg.admin_host}:{cfg.admin_port}")
        await admin.start()
        self._admin = admin
        log.info("admin listening", extra={"event": "admin_listening", "host": cfg.admin_host,
                                            "port": self.admin_port, "token": bool(cfg.admin_token)})

    def _schedule_health_refresh(self) -> None:
        task = asyncio.get_running_loop().create_task(self._refresh_health())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _refresh_health(self) -> None:
        await self._set_health(self.manager.is_serving() and not self._shutting_down)

    async def _set_health(self, serving: bool) -> None:
        status = SERVING if serving else NOT_SERVING
        await self.health.set("", status)
        await self.health.set(SERVICE, status)

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        task = asyncio.get_running_loop().create_task(self.stop(f"signal {sig.name}"))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def stop(self, why: str = "stop requested") -> None:
        """NOT_SERVING first, then refuse new calls, answer every call in flight, release the engines."""
        if self._shutting_down:
            return
        self._shutting_down = True
        log.info("shutting down", extra={"event": "shutdown", "why": why, "grace_s": self.config.grace_period_s})
        await self.health.enter_graceful_shutdown()
        self.servicer.shutting_down.set()
        if self.config.shutdown_delay_s:
            await asyncio.sleep(self.config.shutdown_delay_s)
        if self._admin is not None:
            await self._admin.stop(0)
        if self._server is not None:
            await self._server.stop(self.config.grace_period_s)
        await self.manager.close()
        log.info("stopped", extra={"event": "stopped"})
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()
