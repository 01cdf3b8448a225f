"""Starts the real server as a subprocess (`python -m server`) and talks to it over loopback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class ServerProcess:
    proc: subprocess.Popen[str]
    grpc_port: int
    metrics_port: int
    admin_port: int
    credentials: grpc.ChannelCredentials | None = None  # for a TLS scoring port
    log_lines: list[str] = field(default_factory=list)

    def channel(self) -> grpc.Channel:
        if self.credentials is not None:
            return grpc.secure_channel(self.target, self.credentials)
        return grpc.insecure_channel(self.target)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def admin_target(self) -> str:
        return f"127.0.0.1:{self.admin_port}"

    def events(self) -> list[dict[str, object]]:
        out = []
        for line in list(self.log_lines):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def health(self, service: str = "") -> int:
        with self.channel() as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            status: int = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status
            return status

    def wait_serving(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("server exited:\n" + "\n".join(self.log_lines[-30:]))
            try:
                if self.health() == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
        raise TimeoutError("server did not become SERVING:\n" + "\n".join(self.log_lines[-30:]))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)


@contextmanager
def run_server(
    repo: Path, *extra: str, wait: bool = True, env: dict[str, str] | None = None,
    credentials: grpc.ChannelCredentials | None = None,
) -> Iterator[ServerProcess]:
    # free_port() can race with another process taking the port before the server binds it: such a
    # start is retried on fresh ports (and only such a start).
    for attempt in range(3):
        server, pump = _start(repo, extra, env, credentials)
        if not wait:
            break
        try:
            server.wait_serving()
            break
        except BaseException as exc:
            if isinstance(exc, RuntimeError) and attempt < 2:  # RuntimeError: the server exited
                pump.join(timeout=5)
                if any("Failed to bind" in line for line in server.log_lines):
                    continue
            _kill(server.proc)
            raise
    try:
        yield server
    finally:
        _kill(server.proc)


def _kill(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)


def _start(repo: Path, extra: tuple[str, ...], env: dict[str, str] | None,
           credentials: grpc.ChannelCredentials | None) -> tuple[ServerProcess, threading.Thread]:
    grpc_port, metrics_port, admin_port = free_port(), free_port(), free_port()
    cmd = [sys.executable, "-m", "server", "--model-repo", str(repo), "--host", "127.0.0.1",
           "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port), "--admin-port", str(admin_port),
           *extra]
    # The time-based queue bound estimates engine speed from recent batches; on a shared CI machine that
    # estimate is noise, so tests switch it off unless they test it (a command-line flag wins over this).
    defaults = {"SCORING_MAX_QUEUE_WAIT_MS": "0"}
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **defaults, **(env or {})})
    server = ServerProcess(proc, grpc_port, metrics_port, admin_port, credentials)

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            server.log_lines.append(line.rstrip("\n"))

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return server, thread


def scrape(server: ServerProcess) -> dict[str, float]:
    """The metrics endpoint as {'name{labels}': value}."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            values[key] = float(value)
    return values
