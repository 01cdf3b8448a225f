"""server.settings: every setting by flag and by SCORING_* variable, precedence, one validation for both,
and the documentation naming every setting."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from functools import reduce
from pathlib import Path
from typing import Any

import pytest

from server.app import ServerConfig
from server.cache import default_cache_bytes
from server.manager import ManagerConfig
from server.settings import SETTINGS, config_from_args, parse_args
from tests.helpers import REPO_ROOT, SmallModelFactory

# A valid value for every setting, each different from its default.
SAMPLES = {
    "--model-repo": "/srv/models", "--default-model": "demo", "--host": "127.0.0.1", "--grpc-port": "50061",
    "--metrics-port": "0", "--device": "cpu", "--precision": "int8", "--intra-op-threads": "2",
    "--engine-lanes": "3", "--inter-op-threads": "2", "--ort-spin": "0", "--shape-buckets": "on",
    "--cuda-graphs": "1", "--max-batch-size": "5", "--max-batch-tokens": "4096", "--max-queue-delay-ms": "1.5",
    "--max-queue-size": "7", "--max-queue-wait-ms": "0", "--queue-target-ms": "40", "--standing-wait-ms": "150",
    "--queue-interval-ms": "500", "--batch-overhead-tokens": "12", "--max-stream-inflight": "32",
    "--max-message-bytes": "1048576",
    "--grace-period-s": "3", "--shutdown-delay-s": "2.5", "--max-connection-age-s": "60",
    "--poll-interval-s": "0", "--pin": "demo=3,other=1", "--admin-host": "0.0.0.0", "--admin-port": "50070",
    "--admin-token": "s3cret", "--tls-cert": "/etc/tls/cert.pem", "--tls-key": "/etc/tls/key.pem",
    "--tls-client-ca": "/etc/tls/ca.pem", "--cache-bytes": "1234", "--cache-ttl-s": "30", "--workers": "4",
    "--reuse-port": "1", "--worker-index": "2", "--log-level": "debug",
}
# A bad value, what the message must say, for each way a value can be wrong.
BAD = [
    ("--device", "gpu", "'gpu' is not one of auto, cpu, cuda"),
    ("--precision", "bf16", "'bf16' is not one of auto, fp32, int8, fp16"),
    ("--log-level", "loud", "'loud' is not one of DEBUG, INFO, WARNING, ERROR, CRITICAL"),
    ("--grpc-port", "abc", "expected an integer, got 'abc'"),
    ("--grpc-port", "70000", "70000 is above the maximum 65535"),
    ("--max-queue-size", "0", "0 is below the minimum 1"),
    ("--grace-period-s", "-1", "-1 is below the minimum 0"),
    ("--max-queue-delay-ms", "nan", "expected a finite number, got 'nan'"),
    ("--ort-spin", "yes", "expected 0 or 1, got 'yes'"),
    ("--pin", "demo", "expected model=version[,model=version] with versions above 0, got 'demo'"),
    ("--tls-cert", "", "expected a path, got an empty string"),
]
BY_FLAG = {s.flag: s for s in SETTINGS}
PUBLIC = [s for s in SETTINGS if not s.hidden]


def field(config: ServerConfig, target: str) -> Any:
    return reduce(getattr, target.split("."), config)


def test_samples_cover_every_setting() -> None:
    assert set(SAMPLES) == set(BY_FLAG)
    for s in SETTINGS:
        assert s.env == "SCORING_" + s.flag[2:].replace("-", "_").upper()
        assert s.value(SAMPLES[s.flag]) != s.default_value(), s.flag


@pytest.mark.parametrize("flag", list(SAMPLES))
def test_every_setting_by_flag_and_by_env(flag: str) -> None:
    s, text = BY_FLAG[flag], SAMPLES[flag]
    by_flag = parse_args([flag, text], environ={})
    by_env = parse_args([], environ={s.env: text})
    assert getattr(by_flag, s.dest) == getattr(by_env, s.dest) == s.value(text)
    default = parse_args([], environ={})
    assert getattr(default, s.dest) == s.default_value()
    if s.target is not None:
        assert field(config_from_args(by_env), s.target) == s.value(text)
        assert config_from_args(by_flag) == config_from_args(by_env)


def test_all_settings_at_once_give_the_same_config_by_flag_and_by_env() -> None:
    argv = [part for flag, text in SAMPLES.items() for part in (flag, text)]
    environ = {BY_FLAG[flag].env: text for flag, text in SAMPLES.items()}
    by_flag, by_env = config_from_args(parse_args(argv, environ={})), config_from_args(parse_args([], environ))
    assert by_flag == by_env
    for s in SETTINGS:
        if s.target is not None:
            assert field(by_flag, s.target) == s.value(SAMPLES[s.flag]), s.flag
    assert by_flag.manager.pinned == {"demo": 3, "other": 1}
    assert by_flag.manager.runtime.spin is False and by_flag.manager.runtime.cuda_graphs is True


def test_no_setting_gives_the_config_defaults() -> None:
    # Only the repository and the cache bound differ from the dataclasses' own defaults.
    expected = ServerConfig(manager=ManagerConfig(repo=Path("model_repo")), cache_bytes=default_cache_bytes())
    assert config_from_args(parse_args([], environ={})) == expected


@pytest.mark.parametrize(("flag", "on_cli", "in_env"), [
    ("--grpc-port", "1234", "4321"), ("--device", "cuda", "cpu"), ("--ort-spin", "1", "0"),
    ("--max-queue-wait-ms", "5", "0"), ("--pin", "a=1", "b=2"), ("--log-level", "ERROR", "DEBUG"),
])
def test_flag_beats_env_beats_default(flag: str, on_cli: str, in_env: str) -> None:
    s = BY_FLAG[flag]
    assert getattr(parse_args([flag, on_cli], environ={s.env: in_env}), s.dest) == s.value(on_cli)
    assert getattr(parse_args([], environ={s.env: in_env}), s.dest) == s.value(in_env)
    assert getattr(parse_args([], environ={}), s.dest) == s.default_value()


def test_a_bad_env_value_is_ignored_when_the_flag_is_given() -> None:
    # The command line wins, so the environment's value is never used and need not be valid.
    assert parse_args(["--device", "cpu"], environ={"SCORING_DEVICE": "gpu"}).device == "cpu"


@pytest.mark.parametrize(("flag", "text", "why"), BAD)
def test_bad_values_fail_the_same_by_env_and_by_flag(flag: str, text: str, why: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    s = BY_FLAG[flag]
    with pytest.raises(SystemExit) as env_exit:
        parse_args([], environ={s.env: text})
    env_err = capsys.readouterr().err
    assert env_exit.value.code == 2
    assert f"environment variable {s.env} (for {flag}): {why}" in env_err

    with pytest.raises(SystemExit) as flag_exit:
        parse_args([flag, text], environ={})
    flag_err = capsys.readouterr().err
    assert flag_exit.value.code == 2
    assert f"argument {flag}: {why}" in flag_err


def _server_env(**scoring: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCORING_")}
    return {**env, **scoring, "PYTHONPATH": str(REPO_ROOT), "COLUMNS": "100"}


@pytest.mark.parametrize("workers", ["1", "2"])
def test_server_with_bad_env_exits_before_loading_a_model(workers: str,
                                                           small_model_factory: SmallModelFactory) -> None:
    repo = small_model_factory().parents[1]  # a real model: the server would load it if it started
    out = subprocess.run(
        [sys.executable, "-m", "server", "--model-repo", str(repo), "--grpc-port", "0", "--metrics-port", "0",
         "--admin-port", "0"],
        cwd=REPO_ROOT, env=_server_env(SCORING_DEVICE="gpu", SCORING_WORKERS=workers),
        capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert "environment variable SCORING_DEVICE (for --device): 'gpu' is not one of auto, cpu, cuda" in out.stderr
    # No log line at all: no worker, no port, no model was started.
    assert not [line for line in out.stderr.splitlines() if line.startswith("{")], out.stderr


def test_help_lists_every_setting_with_its_env_and_default() -> None:
    out = subprocess.run([sys.executable, "-m", "server", "--help"], cwd=REPO_ROOT, env=_server_env(),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    for s in SETTINGS:
        if s.hidden:
            assert s.flag not in text
        else:
            assert re.search(re.escape(s.flag) + r" .*?\[env " + s.env + r"; default [^\]]*\]", text), s.flag
    assert "[env SCORING_GRPC_PORT; default 50051]" in text
    assert "[env SCORING_MAX_CONNECTION_AGE_S; default 300.0]" in text
    assert "[env SCORING_PIN; default ]" in text and "[env SCORING_ORT_SPIN; default 1]" in text


def _readme_flag_table() -> str:
    section = (REPO_ROOT / "README.md").read_text(encoding="utf-8").split("\n## Configuration\n", 1)[1]
    rows = [line for line in section.splitlines() if line.startswith("| `--")]
    assert rows, "README's Configuration section has no flag table"
    return "\n".join(row.split(" | ")[0] for row in rows)  # the flag column


def test_readme_flag_table_names_every_setting() -> None:
    named = set(re.findall(r"`(--[a-z0-9-]+)`", _readme_flag_table()))
    assert {s.flag for s in PUBLIC} - named == set(), "settings missing from README's flag table"
    assert named - {s.flag for s in PUBLIC} == set(), "README's flag table names flags the server lacks"


def test_operations_doc_names_only_declared_flags_and_variables() -> None:
    text = (REPO_ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    assert set(re.findall(r"(--[a-z][a-z0-9-]+)", text)) <= {s.flag for s in PUBLIC}
    assert set(re.findall(r"\b(SCORING_[A-Z0-9_]+)", text)) <= {s.env for s in PUBLIC}
