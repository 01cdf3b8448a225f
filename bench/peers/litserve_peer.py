"""Lightning LitServe peer: a `LitAPI` around the same ORT session and tokenizer, batched by LitServe.

    python -m bench.peers.litserve_peer --version-dir model_repo/demo/1 --port 50064

Route: LitServe serves HTTP only (FastAPI on uvicorn), so clients `POST /predict` the ScoreRequest as JSON
(protobuf's JSON mapping, `bench.peers.wire.json_request`) and get `{"scores": {srcid: score}, "model",
"version"}` back: the JSON a LitServe user would exchange, built from the same ScoreResponse as every other peer
(`PeerModel.response`). The load generator drives it through `bench.kit.http_channel.HttpChannel` (aiohttp,
keep-alive); a JSON body rather than the protobuf bytes, because LitServe's request path parses JSON (a raw body
would need a custom request type, which is not how LitServe is used).

Batching: LitServe's own (`max_batch_size` 16, `batch_timeout` 5 ms: the Ray peer's settings; given to `LitAPI`,
where LitServe 0.2.19 takes them, `LitServer(max_batch_size=…)` being deprecated). Layout: `--workers` inference
processes (LitServe's `workers_per_device` on the CPU; one per lane, as Ray gets one replica per lane), each with
a session of `--threads` ORT threads, which decode the JSON into a ScoreRequest, encode, score and answer; in front,
`--num-api-servers` uvicorn processes (0: LitServe's default, as many as inference workers) that parse HTTP/JSON and
pass requests over LitServe's queues (`--fast-queue`: its ZeroMQ transport instead of multiprocessing queues).
Annotated request and response (a JSON object each), so FastAPI parses and writes them with pydantic.
An item that cannot be decoded or encoded fails its batch (400): LitServe answers a batch as a whole. SIGTERM is
turned into LitServe's Ctrl+C shutdown (workers and API servers stopped).
"""

import logging
import os
import signal
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import litserve as ls
import numpy as np
from fastapi import HTTPException
from google.protobuf import json_format

from bench.peers.model import PeerModel
from bench.peers.rpc import peer_parser
from bench.peers.wire import LITSERVE_PATH
from model_format.features import EncodedRequest, FeatureError
from scoring.v1 import scoring_pb2

Decoded = tuple[scoring_pb2.ScoreRequest, EncodedRequest]


class ScorerAPI(ls.LitAPI):  # type: ignore[misc, unused-ignore]  # LitAPI is Any where litserve is absent
    """One instance per inference worker (LitServe pickles it into each); `setup` loads the session there."""

    def __init__(self, version_dir: Path, threads: int, max_batch_size: int, batch_timeout_s: float) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout_s, api_path=LITSERVE_PATH)
        self.version_dir, self.threads = version_dir, threads

    def setup(self, device: str) -> None:
        self.model = PeerModel.load(self.version_dir, self.threads)

    # No `from __future__ import annotations` here: LitServe and FastAPI read these two annotations at run time
    # (the request body parsed as a JSON object; the answer serialized by FastAPI as one).
    def decode_request(self, request: dict[str, Any]) -> Decoded:
        try:
            message = json_format.ParseDict(request, scoring_pb2.ScoreRequest())
            return message, self.model.encode(message)
        except (FeatureError, json_format.ParseError) as exc:
            raise HTTPException(400, str(exc)) from exc

    def batch(self, inputs: list[Decoded]) -> list[Decoded]:
        return inputs  # padded in `predict` (PeerModel.score), to the longest item of the batch

    def predict(self, x: list[Decoded]) -> list[tuple[np.ndarray, scoring_pb2.ScoreRequest]]:
        rows = self.model.score([item for _, item in x])
        return [(row, req) for row, (req, _) in zip(rows, x, strict=True)]

    def unbatch(self, output: list[Any]) -> list[Any]:
        return output

    def encode_response(self, output: tuple[np.ndarray, scoring_pb2.ScoreRequest]) -> dict[str, Any]:
        answer = self.model.response(*output)
        return {"scores": dict(answer.scores), "model": answer.model, "version": answer.version}


def stop_on_sigterm() -> None:
    """SIGTERM as Ctrl+C, on which LitServe stops its workers and API servers (it handles no SIGTERM itself)."""
    main_pid = os.getpid()

    def on_term(_sig: int, _frame: FrameType | None) -> None:
        if os.getpid() == main_pid:
            raise KeyboardInterrupt
        # A forked API server: uvicorn has shut it down and re-raises the signal it caught; leave quietly.
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_term)


def main(argv: Sequence[str] | None = None) -> int:
    ap = peer_parser("litserve_peer", __doc__)
    ap.add_argument("--threads", type=int, default=1, help="ORT intra-op threads in each inference worker")
    ap.add_argument("--workers", type=int, default=2, help="inference processes (workers_per_device on the CPU)")
    ap.add_argument("--num-api-servers", type=int, default=0, help="uvicorn processes (0: one per worker)")
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--batch-timeout-ms", type=float, default=5.0)
    ap.add_argument("--fast-queue", action="store_true", help="ZeroMQ between the API servers and the workers")
    args = ap.parse_args(argv)
    api = ScorerAPI(args.version_dir.resolve(), args.threads, args.max_batch_size, args.batch_timeout_ms / 1000.0)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=args.workers, fast_queue=args.fast_queue,
                          timeout=30)
    stop_on_sigterm()
    logging.getLogger("litserve").setLevel(logging.WARNING)
    server.run(host=args.host, port=args.port, num_api_servers=args.num_api_servers or None,
               generate_client_file=False, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
