"""Every server setting, declared once: the flags, the SCORING_* variables and the config come from `SETTINGS`.

A value from the environment goes through the same parser, choices and range as the flag, so a bad
`SCORING_DEVICE=gpu` stops the server at start instead of being used or ignored. A flag on the command
line wins over the environment, which wins over the default.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any, NoReturn

from server.app import ServerConfig
from server.batcher import CPU_MAX_BATCH_SIZE, GPU_MAX_BATCH_SIZE, BatcherConfig
from server.cache import default_cache_bytes
from server.manager import ManagerConfig
from server.runtime import RuntimeOptions
from server.validation import RequestLimits

ENV_PREFIX = "SCORING_"
USAGE = """python -m server --model-repo DIR --grpc-port 50051 --metrics-port 9100

Every flag can also be set by environment: --max-batch-size is SCORING_MAX_BATCH_SIZE, and so on.
A flag on the command line wins over the environment; an invalid value in either stops the server.
"""

# The config dataclasses a setting's `target` reaches into, deepest first: config_from_args builds a
# section before the one that holds it. "" is ServerConfig itself.
SECTIONS: dict[str, type[Any]] = {
    "manager.runtime": RuntimeOptions,
    "manager.batcher": BatcherConfig,
    "manager": ManagerConfig,
    "limits": RequestLimits,
    "": ServerConfig,
}
FROM_CONFIG: Any = object()  # a setting's default is its target field's default


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"expected an integer, got {text!r}") from None


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {text!r}")
    return value


def _switch(text: str) -> bool:
    if text not in ("0", "1"):
        raise ValueError(f"expected 0 or 1, got {text!r}")
    return text == "1"


def _path(text: str) -> Path:
    if not text:
        raise ValueError("expected a path, got an empty string")  # Path("") would be the working directory
    return Path(text)


def parse_pins(text: str) -> dict[str, int]:
    """`model=version[,model=version]` -> {model: version}."""
    pins = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        model, sep, version = part.partition("=")
        if not sep or not model or not version.isdigit() or int(version) <= 0:
            raise ValueError(f"expected model=version[,model=version] with versions above 0, got {part!r}")
        pins[model] = int(version)
    return pins


@dataclass(frozen=True)
class Setting:
    flag: str
    parse: Callable[[str], Any]  # text -> value; raises ValueError saying what it expected
    help: str
    target: str | None  # the ServerConfig field it fills ("manager.batcher.max_batch_size"); None: main()'s own
    default: Any = FROM_CONFIG
    choices: tuple[str, ...] = ()  # allowed parsed values
    lo: int | None = None  # inclusive bounds
    hi: int | None = None
    hidden: bool = False  # internal (supervisor -> worker): not in --help nor the README

    @property
    def dest(self) -> str:
        return self.flag[2:].replace("-", "_")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.dest.upper()

    def value(self, text: str) -> Any:
        """The one validation for a flag and an environment value alike."""
        value = self.parse(text)
        if self.choices and value not in self.choices:
            raise ValueError(f"{text!r} is not one of {', '.join(self.choices)}")
        if self.lo is not None and value < self.lo:
            raise ValueError(f"{text} is below the minimum {self.lo}")
        if self.hi is not None and value > self.hi:
            raise ValueError(f"{text} is above the maximum {self.hi}")
        return value

    def default_value(self) -> Any:
        if self.default is not FROM_CONFIG:
            return self.default
        assert self.target is not None, f"{self.flag}: a setting without a target declares its default"
        section, _, name = self.target.rpartition(".")
        field = next(f for f in fields(SECTIONS[section]) if f.name == name)
        if field.default is not MISSING:
            return field.default
        assert field.default_factory is not MISSING, f"{self.flag}: {self.target} has no default"
        return field.default_factory()


def _port(flag: str, help_: str, target: str | None) -> Setting:
    return Setting(flag, _integer, help_, target, lo=0, hi=65535)


def _duration(flag: str, help_: str, target: str) -> Setting:
    return Setting(flag, _number, help_, target, lo=0)


_RT, _BATCH = "manager.runtime.", "manager.batcher."
SETTINGS: tuple[Setting, ...] = (
    Setting("--model-repo", _path, "model repository root", "manager.repo", default=Path("model_repo")),
    Setting("--default-model", str, "model used when a request names none (default: the only model)",
            "manager.default_model"),
    Setting("--host", str, "gRPC bind address", "host"),
    _port("--grpc-port", "gRPC port (0 = pick a free one)", "grpc_port"),
    _port("--metrics-port", "Prometheus /metrics port (0 = off)", "metrics_port"),
    Setting("--device", str, "auto | cpu | cuda", _RT + "device", choices=("auto", "cpu", "cuda")),
    Setting("--precision", str, "auto (fp16 on GPU, fp32 on CPU) | fp32 | int8 | fp16", _RT + "precision",
            choices=("auto", "fp32", "int8", "fp16")),
    Setting("--intra-op-threads", _integer,
            "ORT threads per engine run (0 = by device: 1 on CPU, the CPUs the container may use on GPU)",
            _RT + "intra_op_threads", lo=0),
    Setting("--engine-lanes", _integer,
            "batches the engine runs at once (0 = by device: usable CPUs // threads on CPU, 1 on GPU)",
            _RT + "engine_lanes", lo=0),
    Setting("--inter-op-threads", _integer, "ORT inter-op threads", _RT + "inter_op_threads", lo=0),
    Setting("--ort-spin", _switch, "1 = ORT threads spin while waiting for work; 0 = they sleep", _RT + "spin"),
    Setting("--shape-buckets", str,
            "pad batches to fixed shapes (powers of two x multiples of 16 tokens): auto = on for CUDA only",
            _RT + "shape_buckets", choices=("auto", "on", "off")),
    Setting("--cuda-graphs", _switch, "1 = capture and replay one CUDA graph per shape bucket (CUDA only)",
            _RT + "cuda_graphs"),
    Setting("--max-batch-size", _integer,
            f"items per engine batch (0 = by device: {CPU_MAX_BATCH_SIZE} on CPU, {GPU_MAX_BATCH_SIZE} on GPU)",
            _BATCH + "max_batch_size", lo=0),
    Setting("--max-batch-tokens", _integer,
            "batch size x padded length per batch (0 = by cost: as wide as keeps a run's fixed cost under 8%%)",
            _BATCH + "max_batch_tokens", lo=0),
    _duration("--max-queue-delay-ms", "how long an idle engine waits for more items to fill a batch",
              _BATCH + "max_queue_delay_ms"),
    Setting("--max-queue-size", _integer, "queued items before RESOURCE_EXHAUSTED", _BATCH + "max_queue_size",
            lo=1),
    _duration("--max-queue-wait-ms",
              "estimated engine time queued before RESOURCE_EXHAUSTED, a burst's bound (0 = no time bounds)",
              _BATCH + "max_queue_wait_ms"),
    _duration("--queue-target-ms",
              "under a standing queue (see --standing-wait-ms), admit only while the queue holds less than this "
              "much engine work, and plan no batch to run longer", _BATCH + "queue_target_ms"),
    _duration("--standing-wait-ms",
              "batches that waited longer than this for --queue-interval-ms on end, while more work arrived than "
              "the lanes run at full batches, make a standing queue", _BATCH + "standing_wait_ms"),
    _duration("--queue-interval-ms",
              "how long batches must wait over --standing-wait-ms before the queue counts as standing",
              _BATCH + "queue_interval_ms"),
    Setting("--batch-overhead-tokens", _integer,
            "fixed cost of one engine run in padded tokens, for splitting the queue into batches (0 = by device)",
            _BATCH + "batch_overhead_tokens", lo=0),
    Setting("--max-stream-inflight", _integer,
            "ScoreStream: unanswered items one stream may hold; the server reads no further until one is answered",
            "limits.max_stream_inflight", lo=1, hi=1 << 20),
    # gRPC takes message sizes as a C int.
    Setting("--max-message-bytes", _integer, "largest gRPC message accepted", "limits.max_message_bytes",
            lo=1, hi=2**31 - 1),
    _duration("--grace-period-s", "shutdown: time allowed for calls in flight", "grace_period_s"),
    _duration("--shutdown-delay-s", "shutdown: NOT_SERVING this long before refusing calls", "shutdown_delay_s"),
    _duration("--max-connection-age-s", "clients reconnect after this long (rebalancing)", "max_connection_age_s"),
    _duration("--poll-interval-s", "rescan the model repository this often (0 = only on admin call)",
              "manager.poll_interval_s"),
    Setting("--pin", parse_pins, "serve these versions instead of the newest: model=version[,model=version]",
            "manager.pinned"),
    Setting("--admin-host", str, "ModelAdmin bind address (loopback unless a token is set)", "admin_host"),
    _port("--admin-port", "ModelAdmin port (0 = off)", "admin_port"),
    Setting("--admin-token", str, "shared token for ModelAdmin (`authorization: Bearer <token>`)", "admin_token"),
    Setting("--tls-cert", _path, "PEM certificate chain: serve the scoring port over TLS", "tls_cert"),
    Setting("--tls-key", _path, "PEM private key for --tls-cert", "tls_key"),
    Setting("--tls-client-ca", _path, "PEM CA bundle: require client certificates signed by it (mTLS)",
            "tls_client_ca"),
    # The config's own default is 0 (no cache); the server's follows the memory it may use.
    Setting("--cache-bytes", _integer, "result cache and request coalescing memory bound (0 = off)", "cache_bytes",
            default=default_cache_bytes(), lo=0),
    _duration("--cache-ttl-s", "result cache time to live (0 = until evicted)", "cache_ttl_s"),
    Setting("--workers", _integer, "server processes sharing the gRPC port (SO_REUSEPORT); each its own engine",
            None, default=1, lo=1),
    Setting("--reuse-port", _switch, "set SO_REUSEPORT on the gRPC port (workers do)", "reuse_port"),
    Setting("--worker-index", _integer, "", "worker_index", lo=0, hidden=True),
    Setting("--log-level", str.upper, "DEBUG | INFO | WARNING | ERROR | CRITICAL", None, default="INFO",
            choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")),
)


def _shown(value: Any) -> str:
    """A default as the text that would set it."""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    return str(value)


def _flag_type(setting: Setting) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return setting.value(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    return convert


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m server", description=USAGE,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    for s in SETTINGS:
        help_ = argparse.SUPPRESS if s.hidden else f"{s.help} [env {s.env}; default {_shown(s.default_value())}]"
        # SUPPRESS: a flag not given leaves no attribute, so parse_args can tell it from a default.
        ap.add_argument(s.flag, type=_flag_type(s), default=argparse.SUPPRESS, help=help_,
                        metavar="{" + ",".join(s.choices) + "}" if s.choices else None)
    return ap


def parse_args(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> argparse.Namespace:
    """Command line, then environment, then default, each value validated; exits 2 naming the flag or
    variable on a bad value."""
    ap = build_parser()
    args = ap.parse_args(argv)
    environ = os.environ if environ is None else environ
    for s in SETTINGS:
        if hasattr(args, s.dest):
            continue
        text = environ.get(s.env)
        if text is None:
            setattr(args, s.dest, s.default_value())
            continue
        try:
            setattr(args, s.dest, s.value(text))
        except ValueError as err:
            _fail(ap, f"environment variable {s.env} (for {s.flag}): {err}")
    try:
        config_from_args(args)  # the config dataclasses' own checks, before anything starts
    except ValueError as err:
        _fail(ap, str(err))
    return args


def _fail(ap: argparse.ArgumentParser, message: str) -> NoReturn:
    # As argparse's own error, less the usage: the fault is not in the command line.
    ap.exit(2, f"{ap.prog}: error: {message}\n")


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """Each setting's value into its target field; sections are built deepest first."""
    kwargs: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
    for s in SETTINGS:
        if s.target is not None:
            section, _, name = s.target.rpartition(".")
            kwargs[section][name] = getattr(args, s.dest)
    for section, cls in SECTIONS.items():
        if section:
            parent, _, name = section.rpartition(".")
            kwargs[parent][name] = cls(**kwargs[section])
    return ServerConfig(**kwargs[""])
