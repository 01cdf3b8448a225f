"""The real server as a subprocess (`python -m server`), as tests/server_harness.py runs it, plus /metrics."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def server_flags(cwd: Path) -> str:
    """`python -m server --help`, to pass only the flags this server version knows."""
    proc = subprocess.run([sys.executable, "-m", "server", "--help"], cwd=cwd, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(cwd)})
    return proc.stdout


@dataclass
class ServerSpec:
    model_repo: Path
    cwd: Path  # the checkout whose `server` package runs
    extra: Sequence[str] = ()
    log_path: Path | None = None


class ServerProcess:
    def __init__(self, spec: ServerSpec) -> None:
        self.spec = spec
        self.grpc_port = free_port()
        self.metrics_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.command: list[str] = []
        self.start_seconds = 0.0
        self._log: IO[bytes] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 180.0) -> None:
        spec = self.spec
        self.command = [sys.executable, "-m", "server", "--model-repo", str(spec.model_repo.resolve()),
                        "--host", "127.0.0.1", "--grpc-port", str(self.grpc_port),
                        "--metrics-port", str(self.metrics_port), "--admin-port", "0", *spec.extra]
        self._log = spec.log_path.open("wb") if spec.log_path else None
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.command, cwd=spec.cwd, stdout=subprocess.DEVNULL,
                                     stderr=self._log if self._log is not None else subprocess.DEVNULL,
                                     env={**os.environ, "PYTHONPATH": str(spec.cwd)})
        self._wait_serving(timeout)
        self.start_seconds = time.perf_counter() - t0

    def _wait_serving(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.target) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while time.monotonic() < deadline:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.spec.log_path}")
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        raise TimeoutError(f"server not SERVING after {timeout:.0f} s; see {self.spec.log_path}")

    def scrape(self) -> dict[str, float]:
        """/metrics as {'name{labels}': value}."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                try:
                    values[key] = float(value)
                except ValueError:
                    continue
        return values

    async def ascrape(self) -> dict[str, float]:
        return await asyncio.to_thread(self.scrape)

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def metric_sum(values: dict[str, float], name: str) -> float:
    """Sum of a metric over all its label sets (e.g. every model's `scoring_batch_size_sum`)."""
    return sum(v for k, v in values.items() if k == name or k.startswith(name + "{"))


def batch_stats(before: dict[str, float], after: dict[str, float], wall_s: float) -> dict[str, float | None]:
    """What the server's batcher and engine did between two scrapes."""
    def delta(name: str) -> float:
        return metric_sum(after, name) - metric_sum(before, name)

    # Lanes run batches at once: busy and per-busy-second figures are per lane-second of the serving
    # version (the largest lane count scraped; 1 for a server without lanes).
    lanes = max([v for k, v in after.items() if k.startswith("scoring_engine_lanes")] or [1.0])
    batches = delta("scoring_batch_size_count")
    items = delta("scoring_batch_size_sum")
    engine_s = delta("scoring_inference_duration_seconds_sum")
    waits = delta("scoring_queue_wait_seconds_count")
    requests = delta("scoring_request_duration_seconds_count")

    def ratio(a: float, b: float, digits: int = 4) -> float | None:
        return round(a / b, digits) if b > 0 else None

    return {
        "batches": batches,
        "items": items,
        "mean_batch_size": ratio(items, batches, 2),
        "mean_padding_ratio": ratio(delta("scoring_batch_padding_ratio_sum"), batches),
        "engine_lanes": lanes,
        "engine_busy_fraction": ratio(engine_s, wall_s * lanes),
        "engine_items_per_busy_s": ratio(items * lanes, engine_s, 2),
        "mean_engine_ms_per_batch": ratio(engine_s * 1000, batches, 2),
        "mean_queue_wait_ms": ratio(delta("scoring_queue_wait_seconds_sum") * 1000, waits, 2),
        "mean_server_request_ms": ratio(delta("scoring_request_duration_seconds_sum") * 1000, requests, 2),
    }
