"""Peers as subprocesses: the kit's `ServerProcess` (loopback ports, picked again when a bind fails; stop and
kill) running `python -m bench.peers.<name>` instead, serving once a real Score call answers OK."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path

import grpc

from bench.kit.data import REPO_ROOT
from bench.kit.server import ServerProcess, ServerSpec
from loadtest.openloop import SCORE_METHOD


class PeerProcess(ServerProcess):
    """`python -m bench.peers.<name> --port P <args>`, its output in `log_path`. Every descendant seen while it
    runs is remembered, and `stop` (or `kill`) ends any that outlive it (Ray's daemons when a shutdown goes
    wrong), so a run never leaves processes behind; `leftovers` counts them."""

    def __init__(self, name: str, args: Sequence[str], probe: bytes, log_path: Path,
                 metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self.name, self.args, self.probe, self.metadata = name, list(args), probe, metadata
        super().__init__(ServerSpec(REPO_ROOT, log_path=log_path))

    stdout_to_log = True
    stop_timeout_s = 60.0  # Ray's shutdown

    def argv(self) -> list[str]:
        return [sys.executable, "-m", f"bench.peers.{self.name}", "--port", str(self.grpc_port), *self.args]

    def wait_serving(self, timeout: float = 240.0) -> None:
        """Until a real Score call (the probe request, with the metadata) answers OK."""
        deadline = time.monotonic() + timeout
        with self.channel() as channel:
            call = channel.unary_unary(SCORE_METHOD, request_serializer=None, response_deserializer=None)
            while True:
                self.remember_tree()
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.spec.log_path}")
                try:
                    call(self.probe, timeout=5, metadata=self.metadata or None)
                    return
                except grpc.RpcError as exc:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{self.name} not answering after {timeout:.0f} s ({exc.code().name}); "
                                           f"see {self.spec.log_path}") from exc
                time.sleep(0.5)
