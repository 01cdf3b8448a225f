"""One ONNX Runtime session for one model version: provider choice, threads, shape buckets, warm-up, run.

Shape buckets pad every batch to a fixed set of shapes (batch sizes in powers of two, lengths in
steps of `LENGTH_STEP`). On a GPU that keeps the set of shapes small, so each is warmed up once and,
with `cuda_graphs`, captured once as a CUDA graph and replayed (ORT's CUDA graphs need fixed shapes
and fixed input/output buffers). On a CPU a padded token costs a full token, so buckets are off there
by default.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from model_format.manifest import Manifest
from server.resources import cpu_limit, thread_is_background

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


class EngineError(RuntimeError):
    """The engine could not be created or failed on a batch."""


@dataclass(frozen=True)
class RuntimeOptions:
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto | fp32 | int8 | fp16
    intra_op_threads: int = 0  # per run; 0 = by device: 1 on CPU, every usable core on GPU
    engine_lanes: int = 0  # batches run at once; 0 = by device: usable cores // threads on CPU, 1 on GPU
    inter_op_threads: int = 1
    cuda_device_id: int = 0
    spin: bool = True  # ORT worker threads busy-wait for work between and inside runs
    shape_buckets: str = "auto"  # auto (on for CUDA) | on | off
    cuda_graphs: bool = False  # capture one CUDA graph per shape bucket (CUDA only; needs buckets)


class CoreBudget:
    """The usable cores, handed out to CPU runs: a run takes as many as it has threads.

    The serving version's lanes already fill every core; the lanes of another loaded version (a call
    may name a READY version) would oversubscribe them. Runs on a background thread (a version warming
    up on the manager's loader thread) skip the budget: they run at lower OS priority instead, so a
    slow low-priority run never holds a core that a serving lane waits for.
    """

    def __init__(self, cores: int) -> None:
        self.cores = max(1, cores)
        self._free = self.cores
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def hold(self, cores: int) -> Iterator[None]:
        cores = min(max(1, cores), self.cores)
        with self._cond:
            self._cond.wait_for(lambda: self._free >= cores)
            self._free -= cores
        try:
            yield
        finally:
            with self._cond:
                self._free += cores
                self._cond.notify_all()


_CPU_CORES = CoreBudget(cpu_limit())

LENGTH_STEP = 16
MAX_OVERHEAD_TOKENS = 8192  # a measured fixed cost is clamped to this (a GPU's wide runs cost about nothing more)
INPUTS = ("input_ids", "attention_mask", "token_type_ids", "site_id", "ner_ids", "industry_id")


@dataclass(frozen=True)
class ShapeBuckets:
    max_batch_size: int
    max_seq_len: int
    max_ner: int

    def batch_sizes(self) -> list[int]:
        sizes = [1]
        while sizes[-1] < self.max_batch_size:
            sizes.append(min(sizes[-1] * 2, self.max_batch_size))
        return sizes

    def lengths(self) -> list[int]:
        return sorted({min(n, self.max_seq_len) for n in range(LENGTH_STEP, self.max_seq_len + LENGTH_STEP,
                                                                 LENGTH_STEP)})

    def shapes(self) -> list[tuple[int, int]]:
        return [(b, s) for b in self.batch_sizes() for s in self.lengths()]

    def fit(self, batch: int, length: int) -> tuple[int, int]:
        """The smallest bucket that holds a batch; a batch over the limits keeps its own size."""
        b = next((x for x in self.batch_sizes() if x >= batch), batch)
        s = next((x for x in self.lengths() if x >= length), length)
        return b, s

    def pad(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch, length = inputs["input_ids"].shape
        b, s = self.fit(batch, length)
        k = max(self.max_ner, inputs["ner_ids"].shape[1])  # wider only if a caller exceeds the manifest
        out = {}
        for name, value in inputs.items():
            if value.ndim == 2:
                width = k if name == "ner_ids" else s
                grown = np.zeros((b, width), value.dtype)
                grown[:batch, : value.shape[1]] = value
            else:
                grown = np.zeros((b,), value.dtype)
                grown[:batch] = value
            if b > batch:
                grown[batch:] = grown[0]  # filler rows copy a real row: no all-masked rows, scores dropped
            out[name] = grown
        return out


def cuda_usable() -> bool:
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
        want_cuda = options.device == "cuda" or (options.device == "auto" and cuda_usable())
        if options.device == "cuda" and not cuda_usable():
            raise EngineError("--device cuda but this onnxruntime build has no CUDA execution provider")
        self.precision = choose_precision(manifest, want_cuda, options.precision)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # 0 would let ORT count the node's cores; inside a container, count what we may use.
        # On the CPU the default is several single-threaded runs at once (lanes) rather than one run
        # over every core: a one-thread run never waits at a barrier for a thread that the event loop
        # preempted. `make bench` compares the two (its `--intra-op-threads 2 --engine-lanes 1` what-if).
        cores = cpu_limit()
        self.threads = options.intra_op_threads or (cores if want_cuda else 1)
        self.lanes = options.engine_lanes or (1 if want_cuda else max(1, cores // self.threads))
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = options.inter_op_threads
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if not options.spin:
            # Idle ORT threads sleep instead of spinning, leaving the cores to the event loop that
            # receives requests and forms the next batch; each op then pays a thread wake-up.
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.log_severity_level = 3
        self.cuda_graphs = want_cuda and options.cuda_graphs
        providers: list[str | tuple[str, dict[str, object]]] = [CPU]
        if want_cuda:
            cuda_options: dict[str, object] = {"device_id": options.cuda_device_id}
            if self.cuda_graphs:
                cuda_options["enable_cuda_graph"] = "1"
            providers = [(CUDA, cuda_options), CPU]
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
            self.cuda_graphs = False
        self._use_io_binding = self.provider == CUDA
        self.num_heads = len(manifest.heads)
        self.max_seq_len = manifest.max_seq_len
        self.max_ner = max(1, manifest.max_ner_tags)  # features never emit more NER ids than this
        use_buckets = options.shape_buckets == "on" or (options.shape_buckets == "auto" and self.provider == CUDA)
        if self.cuda_graphs and not use_buckets:
            raise EngineError("CUDA graphs need shape buckets (--shape-buckets auto or on)")
        self.buckets: ShapeBuckets | None = None
        self._use_buckets = use_buckets
        self._graphs: dict[tuple[int, int], _CudaGraphSlot] = {}
        self._device_id = options.cuda_device_id

    def set_batch_limit(self, max_batch_size: int) -> None:
        """Fixes the bucket set once the batcher's limit for this device is known."""
        if self._use_buckets:
            self.buckets = ShapeBuckets(max_batch_size, self.max_seq_len, self.max_ner)

    def warm_up_shapes(self, fallback: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Every bucket when buckets are on (each is then allocated, or captured, once); else `fallback`."""
        return self.buckets.shapes() if self.buckets is not None else fallback

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """Scores [B, N] float32 for a padded batch."""
        return self.run_timed(inputs)[0]

    def run_timed(self, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, float]:
        """Scores and the seconds the engine computed them in (not counting the wait for cores).
        Up to `lanes` calls may run at once. A run on a background thread (a version warming up while
        another serves) takes no cores from the budget: the OS scheduler already gives serving the CPU
        first, and holding a core while running slowly would block a serving lane."""
        turn: contextlib.AbstractContextManager[None] = (
            _CPU_CORES.hold(self.threads) if self.provider == CPU and not thread_is_background()
            else contextlib.nullcontext())
        with turn:
            t0 = time.perf_counter()
            scores = self._run(inputs)
            return scores, time.perf_counter() - t0

    def _run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        batch = inputs["input_ids"].shape[0]
        if self.buckets is not None:
            inputs = self.buckets.pad(inputs)
        if self.cuda_graphs:
            return self._run_graph(inputs)[:batch]
        if self._use_io_binding:
            return self._run_bound(inputs)[:batch]
        scores: np.ndarray = self.session.run(["scores"], inputs)[0]
        return scores[:batch]

    def _run_graph(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        shape = inputs["input_ids"].shape
        key = (int(shape[0]), int(shape[1]))
        slot = self._graphs.get(key)
        if slot is None:  # first run of this bucket: allocate its buffers; ORT captures the graph
            slot = _CudaGraphSlot(self.session, inputs, self.num_heads, self._device_id, len(self._graphs) + 1)
            self._graphs[key] = slot
        return slot.run(self.session, inputs)

    def _run_bound(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        # IOBinding copies inputs to the device once and skips the `features` output entirely.
        binding = self.session.io_binding()
        for name, value in inputs.items():
            binding.bind_cpu_input(name, value)
        binding.bind_output("scores", "cpu")
        self.session.run_with_iobinding(binding)
        scores: np.ndarray = binding.copy_outputs_to_cpu()[0]
        return scores

    def measure_overhead_tokens(self, length: int = 16, wide: int = 8, repeats: int = 5) -> int:
        """The fixed cost of one run in padded-token equivalents, from the fastest of `repeats` runs of
        1 and of `wide` items of `length` tokens: t = (overhead + size x length) x seconds per token."""
        one = min(self._timed_dummy(1, length) for _ in range(repeats))
        many = min(self._timed_dummy(wide, length) for _ in range(repeats))
        per_token = (many - one) / ((wide - 1) * length)
        if per_token <= 0:  # wider is no slower: the fixed cost is all there is (a GPU)
            return MAX_OVERHEAD_TOKENS
        return max(1, min(MAX_OVERHEAD_TOKENS, round(one / per_token - length)))

    def _timed_dummy(self, batch: int, length: int) -> float:
        return self.run_timed(_dummy_inputs(batch, length))[1]

    def warm_up(self, shapes: list[tuple[int, int]]) -> float:
        """Runs every (batch, length) shape once so the first real requests pay no allocation cost."""
        t0 = time.perf_counter()
        for batch, length in shapes:
            scores = self.run(_dummy_inputs(batch, length))
            if scores.shape != (batch, self.num_heads) or not np.all(np.isfinite(scores)):
                raise EngineError(f"warm-up batch {batch}x{length} gave scores of shape {scores.shape} "
                                    "or non-finite values")
        return time.perf_counter() - t0


def _dummy_inputs(batch: int, length: int) -> dict[str, np.ndarray]:
    ids = np.full((batch, length), 100, np.int64)
    ids[:, 0] = 1
    return {
        "input_ids": ids,
        "attention_mask": np.ones((batch, length), np.int64),
        "token_type_ids": np.zeros((batch, length), np.int64),
        "site_id": np.zeros((batch,), np.int64),
        "ner_ids": np.zeros((batch, 1), np.int64),
        "industry_id": np.zeros((batch,), np.int64),
    }


class _CudaGraphSlot:
    """Fixed device buffers and a graph id for one bucket shape: ORT captures on the first run and
    replays after that, reading inputs from the same addresses (so they are updated in place)."""

    def __init__(self, session: ort.InferenceSession, inputs: dict[str, np.ndarray], num_heads: int,
                 device_id: int, graph_id: int) -> None:
        batch = inputs["input_ids"].shape[0]
        self.values = {name: ort.OrtValue.ortvalue_from_numpy(inputs[name], "cuda", device_id) for name in INPUTS}
        self.scores = ort.OrtValue.ortvalue_from_shape_and_type([batch, num_heads], np.float32, "cuda", device_id)
        width = next(o.shape[1] for o in session.get_outputs() if o.name == "features")
        self.features = ort.OrtValue.ortvalue_from_shape_and_type([batch, width], np.float32, "cuda", device_id)
        self.binding = session.io_binding()
        for name, value in self.values.items():
            self.binding.bind_ortvalue_input(name, value)
        self.binding.bind_ortvalue_output("scores", self.scores)
        self.binding.bind_ortvalue_output("features", self.features)
        self.options = ort.RunOptions()
        self.options.add_run_config_entry("gpu_graph_id", str(graph_id))
        self.captured = False

    def run(self, session: ort.InferenceSession, inputs: dict[str, np.ndarray]) -> np.ndarray:
        if self.captured:
            for name, value in self.values.items():
                value.update_inplace(inputs[name])
        session.run_with_iobinding(self.binding, self.options)
        self.captured = True
        scores: np.ndarray = self.scores.numpy()
        return scores
