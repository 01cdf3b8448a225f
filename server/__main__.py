"""python -m server --model-repo DIR --grpc-port 50051 --metrics-port 9100

Every flag can also be set by environment: --max-batch-size is SCORING_MAX_BATCH_SIZE, and so on.
A flag on the command line wins over the environment.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvloop

from server.app import ScoringServer, ServerConfig
from server.batcher import CPU_MAX_BATCH_SIZE, GPU_MAX_BATCH_SIZE, BatcherConfig
from server.cache import default_cache_bytes
from server.logs import setup_logging
from server.manager import ManagerConfig
from server.resources import cpu_limit
from server.runtime import RuntimeOptions, cuda_usable
from server.validation import RequestLimits
from server.workers import supervise

ENV_PREFIX = "SCORING_"


def _flag(ap: argparse.ArgumentParser, name: str, kind: Callable[[str], Any], default: Any, help_: str,
          **kw: Any) -> None:
    env = ENV_PREFIX + name.lstrip("-").replace("-", "_").upper()
    value = os.environ.get(env)
    ap.add_argument(name, type=kind, default=kind(value) if value is not None else default,
                    help=f"{help_} [env {env}; default {default}]", **kw)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m server", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    d_batch, d_limits, d_rt = BatcherConfig(), RequestLimits(), RuntimeOptions()
    _flag(ap, "--model-repo", Path, Path("model_repo"), "model repository root")
    _flag(ap, "--default-model", str, None, "model used when a request names none (default: the only model)")
    _flag(ap, "--host", str, "[::]", "gRPC bind address")
    _flag(ap, "--grpc-port", int, 50051, "gRPC port (0 = pick a free one)")
    _flag(ap, "--metrics-port", int, 9100, "Prometheus /metrics port (0 = off)")
    _flag(ap, "--device", str, d_rt.device, "auto | cpu | cuda", choices=["auto", "cpu", "cuda"])
    _flag(ap, "--precision", str, d_rt.precision, "auto (fp16 on GPU, fp32 on CPU) | fp32 | int8 | fp16",
          choices=["auto", "fp32", "int8", "fp16"])
    _flag(ap, "--intra-op-threads", int, d_rt.intra_op_threads,
          "ORT threads per engine run (0 = by device: 1 on CPU, the CPUs the container may use on GPU)")
    _flag(ap, "--engine-lanes", int, d_rt.engine_lanes,
          "batches the engine runs at once (0 = by device: usable CPUs // threads on CPU, 1 on GPU)")
    _flag(ap, "--inter-op-threads", int, d_rt.inter_op_threads, "ORT inter-op threads")
    _flag(ap, "--ort-spin", int, int(d_rt.spin), "1 = ORT threads spin while waiting for work; 0 = they sleep")
    _flag(ap, "--shape-buckets", str, d_rt.shape_buckets,
          "pad batches to fixed shapes (powers of two x multiples of 16 tokens): auto = on for CUDA only",
          choices=["auto", "on", "off"])
    _flag(ap, "--cuda-graphs", int, 0, "1 = capture and replay one CUDA graph per shape bucket (CUDA only)")
    _flag(ap, "--max-batch-size", int, d_batch.max_batch_size,
          f"items per engine batch (0 = by device: {CPU_MAX_BATCH_SIZE} on CPU, {GPU_MAX_BATCH_SIZE} on GPU)")
    _flag(ap, "--max-batch-tokens", int, d_batch.max_batch_tokens, "batch size x padded length per batch")
    _flag(ap, "--max-queue-delay-ms", float, d_batch.max_queue_delay_ms,
          "how long an idle engine waits for more items to fill a batch")
    _flag(ap, "--max-queue-size", int, d_batch.max_queue_size, "queued items before RESOURCE_EXHAUSTED")
    _flag(ap, "--max-queue-wait-ms", float, d_batch.max_queue_wait_ms,
          "estimated engine time queued before RESOURCE_EXHAUSTED, a burst's bound (0 = no time bounds)")
    _flag(ap, "--queue-target-ms", float, d_batch.queue_target_ms,
          "under a standing queue (see --standing-wait-ms), admit only while the queue holds less than this "
          "much engine work, and plan no batch to run longer")
    _flag(ap, "--standing-wait-ms", float, d_batch.standing_wait_ms,
          "batches that waited longer than this for --queue-interval-ms on end, while more work arrived than "
          "the lanes run at full batches, make a standing queue")
    _flag(ap, "--queue-interval-ms", float, d_batch.queue_interval_ms,
          "how long batches must wait over --standing-wait-ms before the queue counts as standing")
    _flag(ap, "--batch-overhead-tokens", int, d_batch.batch_overhead_tokens,
          "fixed cost of one engine run in padded tokens, for splitting the queue into batches (0 = by device)")
    _flag(ap, "--max-message-bytes", int, d_limits.max_message_bytes, "largest gRPC message accepted")
    _flag(ap, "--grace-period-s", float, 10.0, "shutdown: time allowed for calls in flight")
    _flag(ap, "--shutdown-delay-s", float, 0.0, "shutdown: NOT_SERVING this long before refusing calls")
    _flag(ap, "--max-connection-age-s", float, 300.0, "clients reconnect after this long (rebalancing)")
    _flag(ap, "--poll-interval-s", float, 5.0, "rescan the model repository this often (0 = only on admin call)")
    _flag(ap, "--pin", str, "", "serve these versions instead of the newest: model=version[,model=version]")
    _flag(ap, "--admin-host", str, "127.0.0.1", "ModelAdmin bind address (loopback unless a token is set)")
    _flag(ap, "--admin-port", int, 50052, "ModelAdmin port (0 = off)")
    _flag(ap, "--admin-token", str, "", "shared token for ModelAdmin (`authorization: Bearer <token>`)")
    _flag(ap, "--tls-cert", Path, None, "PEM certificate chain: serve the scoring port over TLS")
    _flag(ap, "--tls-key", Path, None, "PEM private key for --tls-cert")
    _flag(ap, "--tls-client-ca", Path, None, "PEM CA bundle: require client certificates signed by it (mTLS)")
    _flag(ap, "--cache-bytes", int, default_cache_bytes(),
          "result cache and request coalescing memory bound (0 = off)")
    _flag(ap, "--cache-ttl-s", float, 0.0, "result cache time to live (0 = until evicted)")
    _flag(ap, "--workers", int, 1, "server processes sharing the gRPC port (SO_REUSEPORT); each its own engine")
    _flag(ap, "--reuse-port", int, 0, "set SO_REUSEPORT on the gRPC port (workers do)")
    ap.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
    _flag(ap, "--log-level", str, "INFO", "DEBUG | INFO | WARNING | ERROR")
    return ap.parse_args(argv)


def parse_pins(text: str) -> dict[str, int]:
    pins = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        model, sep, version = part.partition("=")
        if not sep or not version.isdigit() or int(version) <= 0:
            raise SystemExit(f"--pin expects model=version, got {part!r}")
        pins[model] = int(version)
    return pins


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        manager=ManagerConfig(
            repo=args.model_repo,
            default_model=args.default_model,
            runtime=RuntimeOptions(device=args.device, precision=args.precision,
                                   intra_op_threads=args.intra_op_threads, engine_lanes=args.engine_lanes,
                                   inter_op_threads=args.inter_op_threads,
                                   spin=bool(args.ort_spin), shape_buckets=args.shape_buckets,
                                   cuda_graphs=bool(args.cuda_graphs)),
            batcher=BatcherConfig(max_batch_size=args.max_batch_size, max_batch_tokens=args.max_batch_tokens,
                                  max_queue_delay_ms=args.max_queue_delay_ms, max_queue_size=args.max_queue_size,
                                  max_queue_wait_ms=args.max_queue_wait_ms,
                                  queue_target_ms=args.queue_target_ms, standing_wait_ms=args.standing_wait_ms,
                                  queue_interval_ms=args.queue_interval_ms,
                                  batch_overhead_tokens=args.batch_overhead_tokens),
            poll_interval_s=args.poll_interval_s,
            pinned=parse_pins(args.pin),
        ),
        admin_host=args.admin_host,
        admin_port=args.admin_port,
        admin_token=args.admin_token,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        cache_bytes=args.cache_bytes,
        cache_ttl_s=args.cache_ttl_s,
        reuse_port=bool(args.reuse_port),
        worker_index=args.worker_index,
        host=args.host,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        limits=RequestLimits(max_message_bytes=args.max_message_bytes),
        grace_period_s=args.grace_period_s,
        shutdown_delay_s=args.shutdown_delay_s,
        max_connection_age_s=args.max_connection_age_s,
    )


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
