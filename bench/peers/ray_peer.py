"""Ray Serve peer: the usual Python choice, `@serve.batch` around the same ORT session and tokenizer.

    python -m bench.peers.ray_peer --version-dir model_repo/demo/1 --port 50062

Clients call `scoring.v1.Scorer/Score` on Serve's gRPC proxy with the metadata `application: scoring` (the proxy
routes by it). Ray gets `--num-cpus` CPUs; each replica reserves those its ORT threads use. On SIGTERM or SIGINT
Serve and Ray are shut down. Batching: `max_batch_size` 16 (the raw engine's best on a quiet 2-core CPU), a 5 ms
wait (one arrival at 200/s), `max_ongoing_requests` 64 (Ray's default of 5 caps every batch at 5). Tried during
development, roughly: 16/5, 8/2 and 32/10 ms sustained similar rates; a 0 vs 5 ms wait changed the unloaded
latency by ~3 ms, against the ~13-20 ms the proxy-to-replica path adds per call. `bench.compare` also sweeps
8/2 ms (`--ray-variants`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import ray
from ray import serve
from ray.serve.config import HTTPOptions, gRPCOptions
from ray.serve.schema import LoggingConfig

from bench.kit.server import free_port
from bench.peers.model import PeerModel
from bench.peers.rpc import peer_parser, until_signal
from model_format.features import EncodedRequest, FeatureError
from scoring.v1 import scoring_pb2

APP_NAME = "scoring"
SERVICER = "bench.peers.rpc.add_scorer_to_ray_proxy"  # see there for why not the generated one


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
        return cast(scoring_pb2.ScoreResponse, result)


def main(argv: Sequence[str] | None = None) -> int:
    ap = peer_parser("ray_peer", __doc__)
    ap.add_argument("--http-port", type=int, default=0, help="Serve's HTTP proxy (unused; 0: a free port)")
    ap.add_argument("--threads", type=int, default=2, help="ORT intra-op threads in each replica")
    ap.add_argument("--num-cpus", type=int, default=2, help="CPUs Ray may schedule on")
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--batch-wait-timeout-ms", "--batch-wait-ms", type=float, default=5.0)
    ap.add_argument("--max-ongoing-requests", type=int, default=64)
    ap.add_argument("--access-log", action="store_true", help="Serve's per-request log (no measurable cost)")
    args = ap.parse_args(argv)

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage reporting over the network
    # Workers must import `scoring` and `bench` (the gRPC proxy imports the servicer function too).
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", os.getcwd())}})
    wait = until_signal()
    try:
        logging_config = LoggingConfig(enable_access_log=args.access_log)
        serve.start(http_options=HTTPOptions(host=args.host, port=args.http_port or free_port()),
                    grpc_options=gRPCOptions(port=args.port, grpc_servicer_functions=[SERVICER]),
                    logging_config=logging_config)
        app = RayScorer.options(  # type: ignore[attr-defined, unused-ignore]  # (a Deployment)
            num_replicas=args.replicas, max_ongoing_requests=args.max_ongoing_requests,
            ray_actor_options={"num_cpus": min(args.threads, args.num_cpus)},
        ).bind(str(args.version_dir.resolve()), args.threads, args.max_batch_size,
               args.batch_wait_timeout_ms / 1000.0)
        # A route prefix is what makes the proxies route to the application (None: reachable by handle only).
        serve.run(app, name=APP_NAME, route_prefix="/", logging_config=logging_config)
        wait()
    finally:
        serve.shutdown()  # type: ignore[no-untyped-call, unused-ignore]
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
