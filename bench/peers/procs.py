"""Peers as subprocesses, and the CPU and memory of a whole process tree (Ray runs many processes).

CPU per process comes from `bench.kit.machine`; memory is summed over the tree: RSS
(counts shared pages once per process, so it overstates a multi-process stack) and PSS (shares them out).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import grpc

from bench.kit.machine import tree_pids
from loadtest.openloop import SCORE_METHOD


class PeerProcess:
    """A peer server as a subprocess: started, waited for until a real Score call answers OK, stopped.

    Every descendant seen while it ran is remembered; `stop` ends, by pid, any that outlive the root
    (Ray's daemons when a shutdown goes wrong), so a run never leaves processes behind."""

    def __init__(self, name: str, command: Sequence[str], port: int, probe_request: bytes, *, cwd: Path,
                 log_path: Path, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self.name = name
        self.command = [sys.executable, *command]
        self.port = port
        self.probe_request = probe_request
        self.cwd = cwd
        self.log_path = log_path
        self.metadata = metadata
        self.proc: subprocess.Popen[bytes] | None = None
        self.start_seconds = 0.0
        self._seen: dict[int, int] = {}  # pid -> start time, so a reused pid is never touched
        self._log: IO[bytes] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def remember_tree(self) -> list[int]:
        pids = tree_pids(self.pid)
        for p in pids:
            self._seen.setdefault(p, _start_time(p))
        return pids

    def start(self, timeout: float = 240.0) -> None:
        self._log = self.log_path.open("wb")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.command, cwd=self.cwd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONPATH": str(self.cwd)})
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.target) as ch:
            call = ch.unary_unary(SCORE_METHOD, request_serializer=None, response_deserializer=None)
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log_path}")
                try:
                    call(self.probe_request, timeout=5, metadata=self.metadata or None)
                    break
                except grpc.RpcError as exc:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{self.name} not answering after {timeout:.0f} s ({exc.code().name}); "
                                           f"see {self.log_path}") from exc
                self.remember_tree()
                time.sleep(0.5)
        self.remember_tree()
        self.start_seconds = time.perf_counter() - t0

    def stop(self, timeout: float = 60.0) -> dict[str, object]:
        """SIGTERM, wait, SIGKILL if needed; then ends leftover descendants. Returns what was cleaned up."""
        if self.proc is None:
            return {}
        if self.proc.poll() is None:
            self.remember_tree()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        leftovers = [p for p, t in sorted(self._seen.items())
                     if p != self.proc.pid and _alive(p) and _start_time(p) == t]
        for p in leftovers:
            _terminate(p)
        if self._log is not None:
            self._log.close()
            self._log = None
        return {"returncode": self.proc.returncode, "leftover_processes_ended": len(leftovers)}


def _start_time(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return -1
    return int(text[text.rindex(")") + 2:].split()[19])


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rindex(")") + 2] != "Z"


def _terminate(pid: int, wait_s: float = 5.0) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if not _alive(pid):
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
