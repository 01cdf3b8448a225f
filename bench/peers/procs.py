"""Peers as subprocesses, and the CPU and memory of a whole process tree (Ray runs many processes).

CPU per process comes from `bench.sysmon.process_cpu_seconds`; memory is summed over the tree: RSS
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import grpc

from bench.sysmon import _machine_busy_seconds, process_cpu_seconds
from loadtest.openloop import SCORE_METHOD


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(text[text.rindex(")") + 2:].split()[1])
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def tree_pids(root: int) -> list[int]:
    """`root` and all its living descendants."""
    kids = _children_map()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        if Path(f"/proc/{pid}").exists():
            out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def _status_kib(pid: int, key: str, file: str = "status") -> int:
    try:
        for line in Path(f"/proc/{pid}/{file}").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def tree_memory_mib(root: int) -> dict[str, float]:
    pids = tree_pids(root)
    rss = sum(_status_kib(p, "VmRSS") for p in pids)
    pss = sum(_status_kib(p, "Pss", "smaps_rollup") for p in pids)
    return {"rss_mib": round(rss / 1024, 1), "pss_mib": round(pss / 1024, 1), "processes": len(pids)}


@dataclass
class TreeCpuMonitor:
    """CPU used by a process tree between `start` and `stop`, and by everyone else ("foreign")."""

    root: int
    _t0: float = 0.0
    _busy0: float = 0.0
    _own0: float = 0.0
    _cpu0: dict[int, float] = field(default_factory=dict)

    def _tree_cpu(self) -> dict[int, float]:
        return {p: process_cpu_seconds(p) for p in tree_pids(self.root)}

    def start(self) -> None:
        self._cpu0 = self._tree_cpu()
        self._busy0, _ = _machine_busy_seconds()
        self._own0 = time.process_time()
        self._t0 = time.perf_counter()

    def stop(self) -> dict[str, float]:
        wall = max(time.perf_counter() - self._t0, 1e-9)
        cpu1 = self._tree_cpu()
        busy1, _ = _machine_busy_seconds()
        # A process born during the interval counts from 0; one that died is lost (rare while serving).
        server = sum(v - self._cpu0.get(p, 0.0) for p, v in cpu1.items())
        own = time.process_time() - self._own0
        machine = busy1 - self._busy0
        return {"wall_s": round(wall, 3), "server_cores": round(server / wall, 3),
                "bench_cores": round(own / wall, 3), "machine_cores": round(machine / wall, 3),
                "foreign_cores": round(max(machine - own - server, 0.0) / wall, 3)}


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
