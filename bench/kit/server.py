"""The real server as a subprocess (`python -m server`), for benchmarks and tests alike: flags, start,
health, /metrics, logs, stop (what a scrape says: `bench.kit.scrape`)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.kit.data import REPO_ROOT
from bench.kit.machine import ProcessTree, arrangement_flags, children
from bench.kit.scrape import rss_mib, serving_versions


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def free_port_run(count: int) -> int:
    """A port p with p .. p+count-1 all free: worker i serves /metrics on --metrics-port + i."""
    if count == 1:
        return free_port()
    for _ in range(100):
        base = free_port()
        if base + count > 65535:
            continue
        socks: list[socket.socket] = []
        try:
            for port in range(base, base + count):
                socks.append(socket.socket())
                socks[-1].bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError(f"no run of {count} free ports")


def server_flags(*, threads: int | None = 0, pin: tuple[str, int] | None = None, cache: bool = False,
                 log_level: str | None = "WARNING", extra: Sequence[str] = ()) -> list[str]:
    """The server as the benchmarks run it: fp32, `threads` as lanes x intra-op threads filling the cores
    (None: the server's own default), no reconnect during a run, the result cache off unless `cache` (replayed
    pairs must reach the engine), and with `pin` one version served with no repository polling."""
    flags = ["--precision", "fp32", *(arrangement_flags(threads) if threads is not None else []),
             "--max-connection-age-s", "3600"]
    if pin is not None:
        flags += ["--pin", f"{pin[0]}={pin[1]}", "--poll-interval-s", "0"]
    if not cache:
        flags += ["--cache-bytes", "0"]
    if log_level is not None:
        flags += ["--log-level", log_level]
    return [*flags, *extra]


@dataclass
class ServerSpec:
    model_repo: Path
    cwd: Path = REPO_ROOT  # the checkout whose `server` package runs
    extra: Sequence[str] = ()
    log_path: Path | None = None  # stderr (the JSON log) to this file; None: kept in `log_lines`
    env: Mapping[str, str] = field(default_factory=dict)
    admin: bool = False  # an admin port (else --admin-port 0)
    workers: int = 1  # --workers N: worker i serves /metrics on metrics_port + i
    credentials: grpc.ChannelCredentials | None = None  # for a TLS scoring port


class ServerProcess:
    """One `python -m server` on loopback ports of its own. A start that fails because another process took
    a port between `free_port()` and the bind is retried on fresh ports (and only such a start). Descendants
    (workers) seen while it runs are ended at stop if they outlive it."""

    stdout_to_log = False
    stop_timeout_s = 30.0

    def __init__(self, spec: ServerSpec) -> None:
        self.spec = spec
        self._proc: subprocess.Popen[bytes] | None = None
        self.log_lines: list[str] = []
        self.command: list[str] = []
        self.start_seconds = 0.0
        self._log: IO[bytes] | None = None
        self._pump: threading.Thread | None = None
        self.tree: ProcessTree | None = None  # the process and what it started, from the last start
        self.leftovers = 0  # descendants still running after the process itself had gone
        self._pick_ports()

    def _pick_ports(self) -> None:
        n = self.spec.workers
        while True:  # three picks of free ports may overlap: none may
            self.grpc_port = free_port()  # shared by the workers (SO_REUSEPORT)
            self.metrics_port = free_port_run(n)  # worker i: metrics_port + i, as the admin port
            self.admin_port = free_port_run(n) if self.spec.admin else 0
            ports = {self.grpc_port, *range(self.metrics_port, self.metrics_port + n),
                     *(range(self.admin_port, self.admin_port + n) if self.spec.admin else ())}
            if len(ports) == 1 + n + (n if self.spec.admin else 0):
                return

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def admin_target(self) -> str:
        return f"127.0.0.1:{self.admin_port}"

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        assert self._proc is not None, "not started"
        return self._proc

    @property
    def pid(self) -> int:
        return self.proc.pid

    def channel(self) -> grpc.Channel:
        if self.spec.credentials is not None:
            return grpc.secure_channel(self.target, self.spec.credentials)
        return grpc.insecure_channel(self.target)

    def start(self, timeout: float = 180.0, wait: bool = True) -> None:
        t0 = time.perf_counter()
        for attempt in range(3):
            self._spawn()
            if not wait:
                return
            try:
                self.wait_serving(timeout)
                break
            except RuntimeError:
                if attempt == 2 or not self._bind_failed():
                    self.kill()
                    raise
                self.kill()
                self._pick_ports()
            except BaseException:
                self.kill()
                raise
        self.start_seconds = time.perf_counter() - t0

    def argv(self) -> list[str]:
        spec = self.spec
        return [sys.executable, "-m", "server", "--model-repo", str(spec.model_repo.resolve()),
                "--host", "127.0.0.1", "--grpc-port", str(self.grpc_port),
                "--metrics-port", str(self.metrics_port), "--admin-port", str(self.admin_port),
                *(["--workers", str(spec.workers)] if spec.workers > 1 else []), *spec.extra]

    def _spawn(self) -> None:
        spec = self.spec
        self.log_lines = []
        self.command = self.argv()
        self._log = spec.log_path.open("wb") if spec.log_path else None
        self._proc = subprocess.Popen(
            self.command, cwd=spec.cwd, stdout=self._log if self.stdout_to_log else subprocess.DEVNULL,
            stderr=self._log if self._log is not None else subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(spec.cwd), **spec.env})
        self.tree = ProcessTree(self._proc.pid)
        if self._log is None:
            self._pump = threading.Thread(target=self._read_stderr, args=(self._proc,), daemon=True)
            self._pump.start()

    def _read_stderr(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            self.log_lines.append(line.decode("utf-8", "replace").rstrip("\n"))

    def _bind_failed(self) -> bool:
        if self._pump is not None:
            self._pump.join(timeout=5)
        return any("Failed to bind" in line or "Address already in use" in line for line in self.logs())

    def logs(self) -> list[str]:
        """The server's stderr lines so far (from the log file when there is one)."""
        if self.spec.log_path is not None:
            try:
                return self.spec.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
            except OSError:
                return []
        return list(self.log_lines)

    def events(self) -> list[dict[str, Any]]:
        """The JSON log's records."""
        out = []
        for line in self.logs():
            try:
                doc = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(doc, dict):
                out.append(doc)
        return out

    def health(self, service: str = "") -> int:
        with self.channel() as ch:
            status: int = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=2).status
            return status

    def wait_serving(self, timeout: float = 180.0) -> None:
        """Until the health service says SERVING; with workers, until every worker's /metrics answers too."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RuntimeError(f"server exited with {self._proc.returncode}:\n" + "\n".join(self.logs()[-30:]))
            try:
                if self.health() == health_pb2.HealthCheckResponse.SERVING and all(
                        self._worker_serving(i) for i in range(1, self.spec.workers)):
                    self.remember_tree()
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not SERVING after {timeout:.0f} s:\n" + "\n".join(self.logs()[-30:]))

    def _worker_serving(self, worker: int) -> bool:
        try:
            return bool(serving_versions(self.scrape(worker)))
        except OSError:
            return False

    def worker_pids(self) -> list[int]:
        """The processes that serve: the workers (the supervisor's children), or the server itself."""
        return [self.pid] if self.spec.workers == 1 else children(self.pid)

    def scrape(self, worker: int = 0) -> dict[str, float]:
        """/metrics (of one worker) as {'name{labels}': value}."""
        url = f"http://127.0.0.1:{self.metrics_port + worker}/metrics"
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

    def scrape_each(self) -> list[dict[str, float]]:
        return [self.scrape(i) for i in range(self.spec.workers)]

    def scrape_all(self) -> dict[str, float]:
        """/metrics summed over the workers (gauges too: each worker has its own queue and engine)."""
        total: dict[str, float] = {}
        for values in self.scrape_each():
            for key, value in values.items():
                total[key] = total.get(key, 0.0) + value
        return total

    async def ascrape(self) -> dict[str, float]:
        return await asyncio.to_thread(self.scrape_all)

    def stop(self, sig: int = signal.SIGTERM, timeout: float | None = None) -> int | None:
        """Signals the server and waits for its exit code (killed after `timeout`)."""
        if self._proc is None:
            return None
        if self._proc.poll() is None:
            self.remember_tree()  # the workers, before the supervisor that knows them goes
            self._proc.send_signal(sig)
            try:
                self._proc.wait(timeout=timeout or self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=10)
        self.kill()  # the root is gone by now: this ends descendants that outlived it
        return self._proc.returncode

    def kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self.remember_tree()
            self._proc.kill()
            self._proc.wait(timeout=10)
        self._close_log()
        self.leftovers += self.tree.end_leftovers() if self.tree is not None else 0

    def remember_tree(self) -> None:
        if self.tree is not None:
            self.tree.remember()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


LIVE: list[ServerProcess] = []  # every server `serving` started: `stop_all` stops them at exit, whatever happened


@asynccontextmanager
async def serving(spec: ServerSpec, progress: Callable[[str], None], label: str = "server"
                  ) -> AsyncIterator[ServerProcess]:
    """A started server for the `async with` block, stopped on leaving (and by `stop_all` if that never ran)."""
    server = ServerProcess(spec)
    LIVE.append(server)  # before the start: a cancelled start may still leave a process behind
    try:
        await asyncio.to_thread(server.start)
        progress(f"{label} up in {server.start_seconds:.1f} s (pids {server.worker_pids()}, RSS "
                 f"{rss_mib(server.pid):.0f} MiB): " + " ".join(spec.extra))
        yield server
    finally:
        await asyncio.to_thread(server.stop)


def stop_all() -> None:
    """Stops every server `serving` started (after asyncio.run has returned or raised: its threads joined)."""
    for server in LIVE:
        server.stop()
