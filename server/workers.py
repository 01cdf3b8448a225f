"""`--workers N`: N server processes share the gRPC port through SO_REUSEPORT.

Each worker is a whole server (own session, batcher, repository poller), so a hot swap reaches
every worker by itself. Per-worker ports: metrics on `--metrics-port + i`, admin on
`--admin-port + i` (one Prometheus target per worker; sum across them). The supervisor forwards
SIGTERM/SIGINT, restarts a worker that dies unexpectedly, and exits when all workers have exited.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from types import FrameType

log = logging.getLogger(__name__)
RESTART_BACKOFF_S = 1.0


def worker_argv(argv: list[str], index: int, metrics_port: int, admin_port: int, lanes: int = 0) -> list[str]:
    """The worker's command line: the parent's flags, one worker, its own side ports, and `lanes`
    engine lanes when given (each worker's share of the cores; 0 = the worker's own default)."""
    args = [a for a in argv]
    if lanes:
        args += ["--engine-lanes", str(lanes)]
    args += ["--workers", "1", "--worker-index", str(index), "--reuse-port", "1",
             "--metrics-port", str(metrics_port + index if metrics_port else 0),
             "--admin-port", str(admin_port + index if admin_port else 0)]
    return [sys.executable, "-m", "server", *args]


def supervise(argv: list[str], workers: int, metrics_port: int, admin_port: int, drain_s: float,
              lanes: int = 0) -> int:
    """`drain_s`: a worker's shutdown delay plus grace period; it is killed only after that (+5 s)."""
    procs: dict[int, subprocess.Popen[bytes]] = {}
    stopping = False

    def start(i: int) -> None:
        procs[i] = subprocess.Popen(worker_argv(argv, i, metrics_port, admin_port, lanes), env=os.environ.copy())
        log.info("worker started", extra={"event": "worker_started", "worker": i, "pid": procs[i].pid})

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for i in range(workers):
        start(i)
    deadline: float | None = None
    while True:
        alive = {i: p for i, p in procs.items() if p.poll() is None}
        if not alive and stopping:
            break
        if stopping:
            deadline = deadline or time.monotonic() + drain_s + 5.0
            if time.monotonic() > deadline:
                for p in alive.values():
                    p.kill()
        else:
            for i, p in procs.items():
                if p.poll() is not None:
                    log.error("worker exited; restarting", extra={"event": "worker_died", "worker": i,
                                                                   "returncode": p.returncode})
                    time.sleep(RESTART_BACKOFF_S)
                    start(i)
        time.sleep(0.1)
    codes = [p.returncode for p in procs.values()]
    return 0 if all(c == 0 for c in codes) else 1
