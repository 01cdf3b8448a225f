"""One ONNX Runtime session for one model version: provider choice, threads, warm-up, run."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from server.manifest import Manifest
from server.resources import cpu_limit

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


class EngineError(RuntimeError):
    """The engine could not be created or failed on a batch."""


@dataclass(frozen=True)
class RuntimeOptions:
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto | fp32 | int8 | fp16
    intra_op_threads: int = 0  # 0 = ONNX Runtime's default (one per physical core)
    inter_op_threads: int = 1
    cuda_device_id: int = 0


def _cuda_usable() -> bool:
    """onnxruntime-gpu lists CUDA even on machines without a GPU; the loaded driver is the real sign."""
    return CUDA in ort.get_available_providers() and Path("/proc/driver/nvidia/version").exists()


def choose_precision(manifest: Manifest, on_cuda: bool, wanted: str) -> str:
    """fp16 on a GPU when the version has it; fp32 on the CPU unless int8 (or fp16) is asked for."""
    if wanted == "auto":
        wanted = "fp16" if on_cuda and "fp16" in manifest.precisions else "fp32"
    if wanted not in manifest.precisions:
        raise EngineError(f"precision {wanted} requested but the version has only {sorted(manifest.precisions)}")
    if wanted == "fp16" and not on_cuda:
        # It runs (ORT falls back to casts around the ops it lacks), but slower than fp32: a way to
        # check the variant's numbers on a machine without a GPU, not a way to serve.
        log.warning("fp16 on the CPU: for verification only, slower than fp32", extra={"event": "fp16_on_cpu"})
    return wanted


class ModelRuntime:
    """Owns the session. `run` is thread-safe in ORT and releases the GIL while computing."""

    def __init__(self, version_dir: Path, manifest: Manifest, options: RuntimeOptions) -> None:
        want_cuda = options.device == "cuda" or (options.device == "auto" and _cuda_usable())
        if options.device == "cuda" and not _cuda_usable():
            raise EngineError("--device cuda but this onnxruntime build has no CUDA execution provider")
        self.precision = choose_precision(manifest, want_cuda, options.precision)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # 0 would let ORT count the node's cores; inside a container, count what we may use.
        so.intra_op_num_threads = options.intra_op_threads or cpu_limit()
        so.inter_op_num_threads = options.inter_op_threads
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        providers: list[str | tuple[str, dict[str, object]]] = [CPU]
        if want_cuda:
            providers = [(CUDA, {"device_id": options.cuda_device_id}), CPU]
        path = version_dir / manifest.precisions[self.precision]
        t0 = time.perf_counter()
        try:
            self.session = ort.InferenceSession(str(path), so, providers=providers)
        except Exception as exc:  # ORT raises several unrelated exception types
            raise EngineError(f"cannot create an ONNX Runtime session for {path.name}: {exc}") from exc
        self.provider = self.session.get_providers()[0]
        self.load_seconds = time.perf_counter() - t0
        if want_cuda and self.provider != CUDA:
            log.warning("CUDA requested but the session runs on %s", self.provider)
        self._use_io_binding = self.provider == CUDA
        self.num_heads = len(manifest.heads)

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """Scores [B, N] float32 for a padded batch."""
        if self._use_io_binding:
            return self._run_bound(inputs)
        scores: np.ndarray = self.session.run(["scores"], inputs)[0]
        return scores

    def _run_bound(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        # IOBinding copies inputs to the device once and skips the `features` output entirely.
        binding = self.session.io_binding()
        for name, value in inputs.items():
            binding.bind_cpu_input(name, value)
        binding.bind_output("scores", "cpu")
        self.session.run_with_iobinding(binding)
        scores: np.ndarray = binding.copy_outputs_to_cpu()[0]
        return scores

    def warm_up(self, shapes: list[tuple[int, int]]) -> float:
        """Runs every (batch, length) shape once so the first real requests pay no allocation cost."""
        t0 = time.perf_counter()
        for batch, length in shapes:
            ids = np.full((batch, length), 100, np.int64)
            ids[:, 0] = 1
            inputs = {
                "input_ids": ids,
                "attention_mask": np.ones((batch, length), np.int64),
                "token_type_ids": np.zeros((batch, length), np.int64),
                "site_id": np.zeros((batch,), np.int64),
                "ner_ids": np.zeros((batch, 1), np.int64),
                "industry_id": np.zeros((batch,), np.int64),
            }
            scores = self.run(inputs)
            if scores.shape != (batch, self.num_heads) or not np.all(np.isfinite(scores)):
                raise EngineError(f"warm-up batch {batch}x{length} gave scores of shape {scores.shape} "
                                    "or non-finite values")
        return time.perf_counter() - t0
