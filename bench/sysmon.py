"""The machine, and who used its CPUs during a measurement (this process, the server, everyone else)."""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def machine_info(repo_root: Path) -> dict[str, Any]:
    cpuinfo = _read("/proc/cpuinfo")
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
                 platform.processor() or "unknown")
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    mem_kb = next((int(line.split()[1]) for line in _read("/proc/meminfo").splitlines()
                   if line.startswith("MemTotal:")), 0)
    import onnxruntime

    return {
        "cpu_model": model,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "cpu_features": [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16")
                         if f in flags],
        "ram_gib": round(mem_kb / 2**20, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "git": git_describe(repo_root),
        "loadavg_at_start": _read("/proc/loadavg").split()[:3],
    }


def git_describe(repo_root: Path) -> str:
    """Commit of the code under test, with '+dirty' when the working tree has changes."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo_root, capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo_root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit or "unknown") + ("+dirty" if dirty else "")


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of a process, all its threads (0 if it is gone)."""
    text = _read(f"/proc/{pid}/stat")
    if not text:
        return 0.0
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def thread_cpu_seconds(pid: int, tid: int) -> float:
    text = _read(f"/proc/{pid}/task/{tid}/stat")
    if not text:
        return 0.0
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _machine_busy_seconds() -> tuple[float, float]:
    """(busy, steal) CPU seconds since boot, all CPUs."""
    fields = [int(x) for x in _read("/proc/stat").splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    steal = fields[7] if len(fields) > 7 else 0
    return (sum(fields[:8]) - idle - steal) / CLK_TCK, steal / CLK_TCK


@dataclass
class CpuSample:
    wall: float
    machine_busy: float
    steal: float
    own: float
    server: float
    server_main: float


class CpuMonitor:
    """CPU seconds used between `start` and `stop` by this process, a server process (and its event-loop
    thread), the whole machine; "foreign" is whatever else ran: other tenants of a shared machine."""

    def __init__(self, server_pid: int | None = None) -> None:
        self.server_pid = server_pid
        self._start: CpuSample | None = None

    def _sample(self) -> CpuSample:
        busy, steal = _machine_busy_seconds()
        pid = self.server_pid
        return CpuSample(
            wall=time.perf_counter(),
            machine_busy=busy,
            steal=steal,
            own=time.process_time(),
            server=process_cpu_seconds(pid) if pid else 0.0,
            server_main=thread_cpu_seconds(pid, pid) if pid else 0.0,
        )

    def start(self) -> None:
        self._start = self._sample()

    def stop(self) -> dict[str, float]:
        """CPU use in cores (CPU seconds per wall second) over the interval."""
        if self._start is None:
            raise RuntimeError("CpuMonitor.stop before start")
        a, b = self._start, self._sample()
        wall = max(b.wall - a.wall, 1e-9)
        machine = b.machine_busy - a.machine_busy
        own, server = b.own - a.own, b.server - a.server
        return {
            "wall_s": round(wall, 3),
            "machine_cores": round(machine / wall, 3),
            "steal_cores": round((b.steal - a.steal) / wall, 3),
            "bench_cores": round(own / wall, 3),
            "server_cores": round(server / wall, 3),
            "server_event_loop_cores": round((b.server_main - a.server_main) / wall, 3),
            "foreign_cores": round(max(machine - own - server, 0.0) / wall, 3),
        }
