"""Exit 0 when the server's gRPC health service answers SERVING (container and probe health check)."""

from __future__ import annotations

import argparse

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.healthcheck")
    ap.add_argument("--target", default="127.0.0.1:50051")
    ap.add_argument("--service", default="", help="'' for the whole server, or scoring.v1.Scorer")
    ap.add_argument("--timeout", type=float, default=2.0)
    args = ap.parse_args(argv)
    with grpc.insecure_channel(args.target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
        except grpc.RpcError as err:
            print(f"unhealthy: {err.code().name}")
            return 1
    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
    print(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
    return 0 if serving else 1


if __name__ == "__main__":
    raise SystemExit(main())
