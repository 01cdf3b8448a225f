"""Session fixtures: the demo model repository and a cache of tiny model versions.

`demo_repo` is the repository root holding `demo/1` (92 heads, fp32 and int8). It is, in order:
  1. `$SCORING_TEST_MODEL_REPO`, when set (it must hold a complete `demo/1`);
  2. `<repo>/model_repo`, when `model_repo/demo/1` is a complete version (e.g. after `make serve`);
  3. otherwise built once per session into a temporary folder (about 10 s).
A reused repository is never written to; tests that damage a version work on copies of tiny models.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from model_format.repository import check_version
from tests.helpers import REPO_ROOT, SmallModelFactory, build_small_model

# Fixtures shared by the split test modules: registered here so every module gets them by name.
from tests.k8s_helpers import built, flags  # noqa: F401
from tests.model_format_helpers import (  # noqa: F401
    demo_features,
    demo_version,
    tiny,
    tiny_features,
    tiny_graph,
    tiny_manifest,
    tiny_session,
)

DEMO_MODEL, DEMO_VERSION = "demo", 1
ENV_MODEL_REPO = "SCORING_TEST_MODEL_REPO"


def _demo_is_complete(root: Path) -> tuple[bool, str | None]:
    status = check_version(root / DEMO_MODEL / str(DEMO_VERSION), DEMO_MODEL, DEMO_VERSION)
    return status.complete, status.error


@pytest.fixture(scope="session")
def demo_repo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Root of a model repository with a complete `demo/1`; see the module docstring."""
    env = os.environ.get(ENV_MODEL_REPO)
    if env:
        root = Path(env).resolve()
        complete, error = _demo_is_complete(root)
        if not complete:
            pytest.fail(f"{ENV_MODEL_REPO}={env} has no complete {DEMO_MODEL}/{DEMO_VERSION}: {error}")
        yield root
        return
    in_repo = REPO_ROOT / "model_repo"
    if (in_repo / DEMO_MODEL / str(DEMO_VERSION) / "manifest.json").is_file() and _demo_is_complete(in_repo)[0]:
        yield in_repo
        return
    from tools.build_model.__main__ import main

    root = tmp_path_factory.mktemp("demo_repo")
    rc = main(["--demo", "--out", str(root), "--precision", "int8"])
    assert rc == 0, f"building the demo model failed with exit status {rc}"
    yield root
    shutil.rmtree(root, ignore_errors=True)  # 400 MB; pytest would keep it for three sessions


@pytest.fixture(scope="session")
def small_model_factory(tmp_path_factory: pytest.TempPathFactory) -> SmallModelFactory:
    """`factory(**kwargs) -> version dir`: `tests.helpers.build_small_model` with the same keyword
    arguments (num_heads, srcids, seed, precisions, head_seed, num_layers, max_seq_len, model,
    version), each distinct combination built once per session into its own repository root
    (`path.parents[1]`). The versions are shared: never modify one, copy it first.
    """
    cache: dict[str, Path] = {}

    def factory(**kwargs: Any) -> Path:
        key = repr(sorted((k, tuple(v) if isinstance(v, Sequence) and not isinstance(v, str) else v)
                          for k, v in kwargs.items()))
        if key not in cache:
            root = tmp_path_factory.mktemp("small_repo")
            cache[key] = build_small_model(root, **kwargs)
        return cache[key]

    return factory
