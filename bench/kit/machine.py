"""The machine, and who used its CPUs and memory during a measurement (this process, the server or a process
tree, everyone else)."""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.kit.data import REPO_ROOT

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


def machine_line(m: dict[str, Any]) -> str:
    return (f"Machine: {m['cpu_model']}, {m['usable_cpus']} CPUs, {m['ram_gib']} GiB RAM, onnxruntime "
            f"{m['onnxruntime']}, Python {m['python']}, {m['date']}, code {m['git']}, load average at start "
            f"{' '.join(m['loadavg_at_start'])}.")


def machine() -> dict[str, Any]:
    return machine_info(REPO_ROOT)
