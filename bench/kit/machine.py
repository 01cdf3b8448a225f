"""The machine, who used its CPUs and memory during a measurement (this process, the server or a process tree,
everyone else), and process trees: their pids, memory, and the descendants left behind when the root stops."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.kit.data import REPO_ROOT
from server.resources import cpu_limit

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


def _stat(pid: int, tid: int | None = None) -> list[str]:
    """The fields of /proc/<pid>[/task/<tid>]/stat after the command name ([0] is the state); [] when gone."""
    text = _read(f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat")
    return text[text.rindex(")") + 2:].split() if text else []


def process_cpu_seconds(pid: int, tid: int | None = None) -> float:
    """utime + stime of a process, all its threads (or of its thread `tid`); 0 if it is gone."""
    fields = _stat(pid, tid)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK if fields else 0.0


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
    server: dict[int, float]  # CPU seconds by pid
    server_main: float


class CpuMonitor:
    """CPU seconds used between `start` and `stop` by this process, a server process (and its event-loop
    thread; with `tree`, the server and all its descendants: one born during the interval counts from 0, one
    that died is lost), the whole machine; "foreign" is whatever else ran: other tenants of a shared machine."""

    def __init__(self, server_pid: int | None = None, tree: bool = False) -> None:
        self.server_pid = server_pid
        self.tree = tree
        self._start: CpuSample | None = None

    def _sample(self) -> CpuSample:
        busy, steal = _machine_busy_seconds()
        pid = self.server_pid
        pids = (tree_pids(pid) if self.tree else [pid]) if pid else []
        return CpuSample(wall=time.perf_counter(), machine_busy=busy, steal=steal, own=time.process_time(),
                         server={p: process_cpu_seconds(p) for p in pids},
                         server_main=process_cpu_seconds(pid, pid) if pid else 0.0)

    def start(self) -> None:
        self._start = self._sample()

    def stop(self) -> dict[str, float]:
        """CPU use in cores (CPU seconds per wall second) over the interval."""
        if self._start is None:
            raise RuntimeError("CpuMonitor.stop before start")
        a, b = self._start, self._sample()
        wall = max(b.wall - a.wall, 1e-9)
        machine = b.machine_busy - a.machine_busy
        own, server = b.own - a.own, sum(v - a.server.get(p, 0.0) for p, v in b.server.items())
        return {
            "wall_s": round(wall, 3),
            "machine_cores": round(machine / wall, 3),
            "steal_cores": round((b.steal - a.steal) / wall, 3),
            "bench_cores": round(own / wall, 3),
            "server_cores": round(server / wall, 3),
            "server_event_loop_cores": round((b.server_main - a.server_main) / wall, 3),
            "foreign_cores": round(max(machine - own - server, 0.0) / wall, 3),
        }


def wait_idle(pid: int, below_cores: float = 0.3, limit_s: float = 120.0) -> float:
    """Seconds until `pid`'s process tree uses under `below_cores` over one second (at most `limit_s`): a server
    left up still computing calls its clients gave up on would load whatever is measured next."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit_s:
        monitor = CpuMonitor(pid, tree=True)
        monitor.start()
        time.sleep(1.0)
        if monitor.stop()["server_cores"] < below_cores:
            break
    return time.monotonic() - t0


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat(int(entry))):
            kids.setdefault(int(fields[1]), []).append(int(entry))
    return kids


def children(pid: int) -> list[int]:
    """The living children of `pid` (e.g. a supervisor's workers)."""
    return _children_map().get(pid, [])


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
    """RSS (counts shared pages once per process, so it overstates a multi-process stack) and PSS (shares them
    out), summed over the tree."""
    pids = tree_pids(root)
    rss = sum(_status_kib(p, "VmRSS") for p in pids)
    pss = sum(_status_kib(p, "Pss", "smaps_rollup") for p in pids)
    return {"rss_mib": round(rss / 1024, 1), "pss_mib": round(pss / 1024, 1), "processes": len(pids)}


def _start_time(pid: int) -> int:
    fields = _stat(pid)
    return int(fields[19]) if fields else -1


def alive(pid: int) -> bool:
    fields = _stat(pid)
    return bool(fields) and fields[0] != "Z"


def terminate(pid: int, wait_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL if it still runs after `wait_s`."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + wait_s
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


class ProcessTree:
    """Every descendant of `root` seen (`remember`), by pid and start time, so that those still running after
    the root has gone can be ended (`end_leftovers`) and a reused pid is never touched."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.seen: dict[int, int] = {}

    def remember(self) -> None:
        for pid in tree_pids(self.root):
            self.seen.setdefault(pid, _start_time(pid))

    def end_leftovers(self) -> int:
        left = [p for p, t in sorted(self.seen.items()) if p != self.root and alive(p) and _start_time(p) == t]
        for pid in left:
            terminate(pid)
        return len(left)


def arrangement(threads: int = 0) -> tuple[int, int]:
    """(threads per run, lanes) as the server picks them on the CPU (server.runtime.ModelRuntime):
    `threads` 0 = one thread per run and one lane per usable core."""
    t = threads or 1
    return t, max(1, cpu_limit() // t)


def arrangement_flags(threads: int = 0) -> list[str]:
    """The server flags for `arrangement(threads)`, so the server runs as the raw engine was measured."""
    t, lanes = arrangement(threads)
    return ["--intra-op-threads", str(t), "--engine-lanes", str(lanes)]


def describe(threads: int = 0) -> str:
    t, lanes = arrangement(threads)
    return f"{lanes} lane{'s' if lanes > 1 else ''} x {t} intra-op thread{'s' if t > 1 else ''}"


def machine_line(m: dict[str, Any]) -> str:
    return (f"Machine: {m['cpu_model']}, {m['usable_cpus']} CPUs, {m['ram_gib']} GiB RAM, onnxruntime "
            f"{m['onnxruntime']}, Python {m['python']}, {m['date']}, code {m['git']}, load average at start "
            f"{' '.join(m['loadavg_at_start'])}.")


def machine() -> dict[str, Any]:
    return machine_info(REPO_ROOT)
