"""Peers as subprocesses: the kit's `ServerProcess` (loopback ports, picked again when a bind fails; stop and
kill) running `python -m bench.peers.<name>` instead, serving once a real call answers OK: a gRPC `method`
(Score, or MLServer's ModelInfer), or for an HTTP peer (`http`, LitServe) a POST to `method` answering 200."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import grpc

from bench.kit.data import REPO_ROOT
from bench.kit.server import ServerProcess, ServerSpec
from loadtest.openloop import SCORE_METHOD


class PeerProcess(ServerProcess):
    """`python -m bench.peers.<name> --port P <args>`, its output in `log_path`, run by `python` (default: this
    interpreter; MLServer runs from its own environment). Every descendant seen while it runs is remembered, and
    `stop` (or `kill`) ends any that outlive it (Ray's daemons when a shutdown goes wrong), so a run never leaves
    processes behind; `leftovers` counts them."""

    def __init__(self, name: str, args: Sequence[str], probe: bytes, log_path: Path,
                 metadata: tuple[tuple[str, str], ...] = (), *, method: str = SCORE_METHOD, http: bool = False,
                 python: str | None = None) -> None:
        self.name, self.args, self.probe, self.metadata = name, list(args), probe, metadata
        self.method, self.http, self.python = method, http, python or sys.executable
        super().__init__(ServerSpec(REPO_ROOT, log_path=log_path))

    stdout_to_log = True
    stop_timeout_s = 60.0  # Ray's shutdown

    def argv(self) -> list[str]:
        return [self.python, "-m", f"bench.peers.{self.name}", "--port", str(self.grpc_port), *self.args]

    def wait_serving(self, timeout: float = 240.0) -> None:
        """Until a real call (the probe request, with the metadata) answers OK."""
        deadline = time.monotonic() + timeout
        with self.channel() as channel:
            call = channel.unary_unary(self.method, request_serializer=None, response_deserializer=None)
            while True:
                self.remember_tree()
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.spec.log_path}")
                try:
                    if self.http:
                        self._post_probe()
                    else:
                        call(self.probe, timeout=5, metadata=self.metadata or None)
                    return
                except (grpc.RpcError, OSError) as exc:
                    if time.monotonic() > deadline:
                        why = exc.code().name if isinstance(exc, grpc.RpcError) else str(exc)
                        raise TimeoutError(f"{self.name} not answering after {timeout:.0f} s ({why}); "
                                           f"see {self.spec.log_path}") from exc
                time.sleep(0.5)

    def _post_probe(self) -> None:
        """Raises OSError (urllib's errors are OSErrors) unless the POST answers 200."""
        request = urllib.request.Request(f"http://{self.target}{self.method}", data=self.probe, method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=5) as resp:
            if resp.status != 200:
                raise urllib.error.URLError(f"HTTP {resp.status}")


def package_version(python: Path, package: str) -> str | None:
    """`package`'s version in the environment of `python` (another virtual environment), None when absent."""
    code = f"from importlib.metadata import version; print(version({package!r}))"
    try:
        done = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None
