"""Starts the real server as a subprocess (`python -m server`) and talks to it over loopback: the benchmark
kit's `ServerProcess`, with the defaults tests want."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc

from bench.kit.data import REPO_ROOT
from bench.kit.server import ServerProcess, ServerSpec, free_port

__all__ = ["REPO_ROOT", "ServerProcess", "free_port", "run_server", "scrape"]

# The time-based queue bound estimates engine speed from recent batches; on a shared CI machine that
# estimate is noise, so tests switch it off unless they test it (a command-line flag wins over this).
TEST_ENV = {"SCORING_MAX_QUEUE_WAIT_MS": "0"}


@contextmanager
def run_server(
    repo: Path, *extra: str, wait: bool = True, env: dict[str, str] | None = None,
    credentials: grpc.ChannelCredentials | None = None, workers: int = 1,
) -> Iterator[ServerProcess]:
    server = ServerProcess(ServerSpec(repo, extra=extra, env={**TEST_ENV, **(env or {})}, admin=True,
                                      credentials=credentials, workers=workers))
    server.start(timeout=120.0, wait=wait)
    try:
        yield server
    finally:
        server.kill()


def scrape(server: ServerProcess, worker: int = 0) -> dict[str, float]:
    """The metrics endpoint (of one worker) as {'name{labels}': value}."""
    return server.scrape(worker)
