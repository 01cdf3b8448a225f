"""Ray Serve peer: the usual Python choice, `@serve.batch` around the same ORT session and tokenizer.

    python -m bench.peers.ray_peer --version-dir model_repo/demo/1 --grpc-port 50062

Clients call `scoring.v1.Scorer/Score` on Ray Serve's gRPC proxy with the metadata
`application: scoring` (the proxy routes by it), so this peer is driven by exactly the same load
generator and serialized requests as the others. The deployment is one replica with ORT's 2 intra-op
threads; Ray itself is told it has `--num-cpus` CPUs (default 2, the machine), so it starts no more
worker processes than the box has cores. On SIGTERM or SIGINT, Serve and Ray are shut down (Ray's
own processes stop with it; `bench.compare` also ends any of this process's descendants left over).

Batching: `max_batch_size` 16 (the raw engine's best batch size on a quiet 2-core CPU: larger batches
are slower per item here), `batch_wait_timeout_s` 0.005 (about one arrival at 200/s), and
`max_ongoing_requests` 64 per replica, which must be above the batch size or batches never fill (Ray's
default is 5). Serve's per-request access log is off (`--access-log` turns it on; it made no measurable
difference to the unloaded latency here). Tried during development, on a shared machine whose other
tenants used 1-1.4 cores, so only roughly: 16/5 ms, 8/2 ms and 32/10 ms sustained similar rates within
the noise; a batch wait of 0 vs 5 ms changed the unloaded latency by ~3 ms, against ~13-20 ms that the
proxy-to-replica path adds per call over the naive server. `bench.compare` therefore sweeps 8/2 ms as
well (`--ray-variants`) and compares against the better of the two.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import ray
from ray import serve
from ray.serve.config import HTTPOptions, gRPCOptions
from ray.serve.schema import LoggingConfig

from bench.peers.model import PeerModel
from model_format.features import EncodedRequest, FeatureError
from scoring.v1 import scoring_pb2

APP_NAME = "scoring"
SERVICER = "bench.peers.ray_grpc.add_scorer_to_ray_proxy"  # see ray_grpc.py for why not the generated one


@serve.deployment(name="Scorer")  # type: ignore[misc, untyped-decorator, unused-ignore]  # untyped where ray is absent
class RayScorer:
    def __init__(self, version_dir: str, threads: int, max_batch_size: int, batch_wait_s: float) -> None:
        self.model = PeerModel.load(Path(version_dir), threads)
        # The setters exist on the wrapper `serve.batch` returns; its annotations do not show them.
        self.score_batch.set_max_batch_size(max_batch_size)  # type: ignore[attr-defined, unused-ignore]
        self.score_batch.set_batch_wait_timeout_s(batch_wait_s)  # type: ignore[attr-defined, unused-ignore]

    # The real values are set in __init__ (the decorator's arguments are fixed at import).
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)  # type: ignore[misc, untyped-decorator, unused-ignore]
    async def score_batch(self, requests: list[scoring_pb2.ScoreRequest]) -> list[Any]:
        # An item that cannot be encoded fails alone: its slot gets the exception, the others are scored.
        items: list[EncodedRequest | Exception] = []
        for req in requests:
            try:
                if not req.query.strip():
                    raise FeatureError("query is blank")
                items.append(self.model.encode(req))
            except FeatureError as exc:
                items.append(exc)
        good = [it for it in items if isinstance(it, EncodedRequest)]
        rows = iter(self.model.score(good)) if good else iter(())
        return [it if isinstance(it, Exception) else self.model.response(next(rows), req)
                for it, req in zip(items, requests, strict=True)]

    async def Score(self, request: scoring_pb2.ScoreRequest) -> scoring_pb2.ScoreResponse:
        result = await self.score_batch(request)
        if isinstance(result, Exception):
            raise result
        response: scoring_pb2.ScoreResponse = result
        return response


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.peers.ray_peer", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version-dir", type=Path, required=True, help="model version folder (manifest.json)")
    ap.add_argument("--grpc-port", type=int, required=True)
    ap.add_argument("--http-port", type=int, required=True, help="Serve's HTTP proxy (unused, but always started)")
    ap.add_argument("--threads", type=int, default=2, help="ORT intra-op threads in the replica")
    ap.add_argument("--num-cpus", type=int, default=2, help="CPUs Ray may schedule on")
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--batch-wait-ms", type=float, default=5.0)
    ap.add_argument("--max-ongoing-requests", type=int, default=64)
    ap.add_argument("--access-log", action="store_true",
                    help="keep Serve's per-request access log lines (off: this service logs no line per call either)")
    args = ap.parse_args(argv)

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage reporting over the network
    # Workers must import `scoring` and `bench` (the gRPC proxy imports the servicer function too).
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", os.getcwd())}})
    stop = threading.Event()

    def on_signal(_sig: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        logging_config = LoggingConfig(enable_access_log=args.access_log)
        serve.start(http_options=HTTPOptions(host="127.0.0.1", port=args.http_port),
                    grpc_options=gRPCOptions(port=args.grpc_port, grpc_servicer_functions=[SERVICER]),
                    logging_config=logging_config)
        # The replica's ORT threads are the CPU it uses: reserve them. (The decorator returns a Deployment.)
        app = RayScorer.options(  # type: ignore[attr-defined, unused-ignore]
            num_replicas=args.replicas, max_ongoing_requests=args.max_ongoing_requests,
            ray_actor_options={"num_cpus": min(args.threads, args.num_cpus)},
        ).bind(str(args.version_dir.resolve()), args.threads, args.max_batch_size, args.batch_wait_ms / 1000.0)
        # A route prefix is what makes the proxies route to the application (None: reachable by handle only).
        serve.run(app, name=APP_NAME, route_prefix="/", logging_config=logging_config)
        print(f"ray serve gRPC on 127.0.0.1:{args.grpc_port}, application {APP_NAME}", flush=True)
        while not stop.wait(1.0):
            pass
    finally:
        serve.shutdown()  # type: ignore[no-untyped-call, unused-ignore]
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
