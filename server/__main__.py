"""python -m server --model-repo DIR --grpc-port 50051 --metrics-port 9100

Every setting, its flag and its SCORING_* variable are declared in `server.settings`; a flag on the
command line wins over the environment, and an invalid value in either stops the server at start.
"""

from __future__ import annotations

import sys

import uvloop

from server.app import ScoringServer, ServerConfig
from server.logs import setup_logging
from server.resources import cpu_limit
from server.runtime import cuda_usable
from server.settings import config_from_args, parse_args
from server.workers import supervise

__all__ = ["config_from_args", "main", "parse_args", "serve"]


async def serve(config: ServerConfig) -> None:
    server = ScoringServer(config)
    server.install_signal_handlers()
    await server.start()
    await server.wait_stopped()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level)
    if args.workers > 1:
        # On the CPU each worker's default lanes would fill every core: give each its share instead.
        on_cpu = args.device == "cpu" or (args.device == "auto" and not cuda_usable())
        lanes = 0 if args.engine_lanes or not on_cpu else max(
            1, cpu_limit() // (args.workers * (args.intra_op_threads or 1)))
        return supervise(sys.argv[1:] if argv is None else argv, args.workers, args.metrics_port, args.admin_port,
                         args.shutdown_delay_s + args.grace_period_s, lanes)
    uvloop.run(serve(config_from_args(args)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
