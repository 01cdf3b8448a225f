"""Seldon MLServer peer: a custom runtime (`MLModel`) around the same ORT session and tokenizer, behind MLServer's
adaptive batching.

    .venv-mlserver/bin/python -m bench.peers.mlserver_peer --version-dir model_repo/demo/1 --port 50063

Route: MLServer's own gRPC server, Open Inference Protocol `inference.GRPCInferenceService/ModelInfer`. MLServer
cannot serve `scoring.v1.Scorer/Score`: its custom endpoints are REST only (its gRPC server adds the OIP servicers
and nothing else). So the load generator sends each ScoreRequest serialized into a BYTES tensor `request` of
shape [1] and gets the serialized ScoreResponse back in a BYTES tensor `response` (`bench.peers.wire`): the same
request and answer bytes as every other system, plus what OIP costs (its envelope, MLServer's pydantic types, the
merge and split of batches). gRPC rather than REST: the generator and this service speak gRPC, and REST would add
JSON for the same tensors.

Batching: MLServer's adaptive batching (`max_batch_size` 16, `max_batch_time` 5 ms in the model settings, as
model-settings.json would give them; the same as the Ray peer's: the raw engine's best batch on a quiet 2-core CPU,
one arrival at 200/s). MLServer batches in its main process and runs each batch on one of `--parallel-workers`
inference processes (its default way of running a model; one per lane, as Ray gets one replica per lane), each
with a session of `--threads` ORT threads; batches are dispatched as they form, so each worker runs one at a
time. `debug` (a log line per call) is off; MLServer's own metrics stay on, as this service's do. An item that
cannot be encoded fails its whole batch (INVALID_ARGUMENT): MLServer answers a merged batch as one.

Under overload (seen with 1.7.0; 1.7.1's batching code is the same): a call cancelled at its deadline stays in the
batch queue and is computed anyway, and when its batch returns, `AdaptiveBatcher._predict_callback` raises KeyError
on the cancelled call's missing entry before answering the others in that batch, so they wait out their deadline
too. Once a sweep step has overloaded it, the next steps start behind that backlog and fail until it drains.

Runs from its own environment (`.venv-mlserver`, `make bench`; requirements-mlserver.txt): MLServer 1.7 needs
fastapi < 0.116 where Ray Serve 2.58 needs >= 0.133, and its workers die at start under uvloop >= 0.22 (ours is
0.23), so that environment has uvloop 0.21. On SIGTERM or SIGINT MLServer stops its servers and workers.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mlserver import MLModel, MLServer
from mlserver.errors import MLServerError
from mlserver.settings import ModelParameters, ModelSettings, Settings
from mlserver.types import InferenceRequest, InferenceResponse, ResponseOutput
from mlserver.utils import install_uvloop_event_loop

from bench.kit.server import free_port
from bench.peers.model import PeerModel
from bench.peers.rpc import peer_parser
from bench.peers.wire import OIP_BYTES, OIP_INPUT, OIP_MODEL, OIP_OUTPUT
from model_format.features import FeatureError
from scoring.v1 import scoring_pb2

RUNTIME = "bench.peers.mlserver_peer.ScorerRuntime"  # imported by name in each inference worker


class ScorerRuntime(MLModel):  # type: ignore[misc, unused-ignore]  # MLModel is Any where mlserver is absent
    """Loaded in every inference worker; `predict` gets a batch MLServer has already merged."""

    async def load(self) -> bool:
        params = self.settings.parameters
        self.scorer = PeerModel.load(Path(params.uri), int(params.extra["threads"]))
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        tensor = next((i for i in payload.inputs if i.name == OIP_INPUT), None)
        if tensor is None or tensor.datatype != OIP_BYTES:
            raise MLServerError(f"expected a {OIP_BYTES} input named {OIP_INPUT!r}", status_code=400)
        data: list[Any] = list(getattr(tensor.data, "root", tensor.data))
        try:
            requests = [scoring_pb2.ScoreRequest.FromString(bytes(b)) for b in data]
            items = [self.scorer.encode(r) for r in requests]
        except (FeatureError, ValueError) as exc:  # ValueError: protobuf's DecodeError
            raise MLServerError(str(exc), status_code=400) from exc
        rows = self.scorer.score(items)
        answers = [self.scorer.response(row, r).SerializeToString() for row, r in zip(rows, requests, strict=True)]
        return InferenceResponse(model_name=self.name, outputs=[
            ResponseOutput(name=OIP_OUTPUT, datatype=OIP_BYTES, shape=[len(answers)], data=answers)])


def model_settings(version_dir: Path, threads: int, max_batch_size: int, max_batch_time_ms: float) -> Any:
    return ModelSettings(name=OIP_MODEL, implementation=RUNTIME, max_batch_size=max_batch_size,
                         max_batch_time=max_batch_time_ms / 1000.0,
                         parameters=ModelParameters(uri=str(version_dir.resolve()), extra={"threads": threads}))


async def serve(settings: Any, models: list[Any]) -> None:
    server = MLServer(settings)  # inside the loop: it adds its SIGTERM/SIGINT handlers to the running loop
    await server.start(models)  # returns once a signal has stopped it


def main(argv: Sequence[str] | None = None) -> int:
    ap = peer_parser("mlserver_peer", __doc__)
    ap.add_argument("--http-port", type=int, default=0, help="MLServer's REST server (unused; 0: a free port)")
    ap.add_argument("--threads", type=int, default=1, help="ORT intra-op threads in each inference worker")
    ap.add_argument("--parallel-workers", type=int, default=2, help="MLServer's inference processes")
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--max-batch-time-ms", type=float, default=5.0)
    args = ap.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="mlserver-peer-"))  # its metrics and environments dirs (default: cwd)
    try:
        settings = Settings(host=args.host, grpc_port=args.port, http_port=args.http_port or free_port(),
                            metrics_port=free_port(), parallel_workers=args.parallel_workers, debug=False,
                            model_repository_root=str(scratch), metrics_dir=str(scratch / "metrics"),
                            environments_dir=str(scratch / "envs"), load_models_at_startup=False)
        models = [model_settings(args.version_dir, args.threads, args.max_batch_size, args.max_batch_time_ms)]
        install_uvloop_event_loop()  # as `mlserver start` does
        asyncio.run(serve(settings, models))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
