"""What this process may use: container (cgroup) limits first, then the machine.

ONNX Runtime's default thread count and a share-of-RAM default both read the node, not the
container; inside a pod limited to 4 CPUs on a 64-core node that oversubscribes badly.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
import threading
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii").strip()
    except OSError:
        return None


def machine_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 4 << 30


def memory_limit_bytes() -> int:
    """The cgroup v2 (memory.max) or v1 (memory.limit_in_bytes) limit, or the machine's memory."""
    machine = machine_memory_bytes()
    for raw in (_read(CGROUP / "memory.max"), _read(CGROUP / "memory" / "memory.limit_in_bytes")):
        if raw and raw.isdigit():
            return min(int(raw), machine)
    return machine


def cpu_limit() -> int:
    """CPUs this process may use: the cgroup quota (cpu.max / cfs_quota), else its affinity mask."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = None
    raw = _read(CGROUP / "cpu.max")
    if raw:
        q, _, period = raw.partition(" ")
        if q.isdigit() and period.isdigit() and int(period) > 0:
            quota = int(q) / int(period)
    else:
        q1, p1 = _read(CGROUP / "cpu" / "cpu.cfs_quota_us"), _read(CGROUP / "cpu" / "cpu.cfs_period_us")
        if q1 and p1 and q1.lstrip("-").isdigit() and int(q1) > 0 and p1.isdigit() and int(p1) > 0:
            quota = int(q1) / int(p1)
    return max(1, min(affinity, math.ceil(quota))) if quota else max(1, affinity)


BACKGROUND_NICE = 10  # CFS weight ~110 against 1024 at nice 0: a tenth of a core's share when contended
_thread = threading.local()


def lower_thread_priority(increment: int = BACKGROUND_NICE) -> bool:
    """Makes the calling thread give way to the rest of the process for the CPU (on Linux a thread has
    its own nice value). Needs no privilege and cannot be undone: for threads that only do background
    work, such as loading, verifying and warming a model version while another serves."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + increment)
    except (OSError, AttributeError):
        return False
    _thread.background = True
    return True


def thread_is_background() -> bool:
    """True on a thread whose priority `lower_thread_priority` lowered."""
    return getattr(_thread, "background", False)


def release_free_memory() -> None:
    """Returns freed heap pages to the system (glibc's malloc_trim), so an unloaded version's memory
    shows up as free in RSS instead of staying in the allocator's arenas. A no-op elsewhere."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)
