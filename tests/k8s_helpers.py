"""Shared by the deploy/k8s tests (test_k8s_*.py): where the manifests are, finding objects, the
`built` fixture (every kustomization, rendered by `tests.k8s_render.RENDERER`, whose name is in the
test ids), and the server's own description of itself (`python -m server --help`) with the
effective flag values of a container.

The fixtures are plain pytest fixtures; a test module makes them visible by naming them, e.g.
`built = k8s.built` (pytest finds fixtures by module attribute).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT
from tests.k8s_render import RENDERER, Manifest, render

BASE = REPO_ROOT / "deploy" / "k8s"
OVERLAYS = REPO_ROOT / "deploy" / "k8s-overlays"
OVERLAY_DIRS = sorted(p.parent for p in OVERLAYS.glob("*/kustomization.yaml"))
KUSTOMIZATIONS = [BASE, *OVERLAY_DIRS]
EXTRAS = BASE / "extras"
RULES = REPO_ROOT / "dashboards" / "scoring-rules.yml"
SERVER_IMAGE = "scoring"


def object_key(doc: Manifest) -> tuple[str, str]:
    return doc["kind"], doc["metadata"]["name"]


def by_kind(docs: list[Manifest], kind: str) -> list[Manifest]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[Manifest], kind: str) -> Manifest:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module", params=KUSTOMIZATIONS,
                ids=lambda p: f"{RENDERER.name}:{p.relative_to(REPO_ROOT).as_posix()}")
def built(request: pytest.FixtureRequest) -> list[Manifest]:
    root: Path = request.param
    return render(root)


# --- the server's own description of itself ---------------------------------------------------------


class Flags:
    """`python -m server --help`: flag -> (SCORING_* variable, default as printed)."""

    def __init__(self, help_text: str) -> None:
        self.env: dict[str, str] = {}
        self.default: dict[str, str] = {}
        section = help_text.split("\noptions:\n", 1)[1]
        blocks: list[str] = []
        for line in section.splitlines():
            if re.match(r"^  -", line):
                blocks.append(line)
            elif blocks:
                blocks[-1] += " " + line.strip()
        for block in blocks:
            flag = re.match(r"^\s+(?:-\w, )?(--[a-z0-9-]+)", block)
            assert flag is not None, block
            found = re.search(r"\[env (SCORING_[A-Z0-9_]+); default (.*?)\]$", " ".join(block.split()))
            if found is None:
                assert flag.group(1) == "--help", f"no [env ...] in the help of {flag.group(1)}"
                continue
            self.env[flag.group(1)] = found.group(1)
            self.default[flag.group(1)] = found.group(2)
        self.by_env = {v: k for k, v in self.env.items()}


def program_help(module: str) -> str:
    # Without SCORING_* variables: the defaults printed must be the code's, not this shell's.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCORING_")}
    out = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO_ROOT, capture_output=True, text=True,
                         env={**env, "PYTHONPATH": str(REPO_ROOT), "COLUMNS": "100"}, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.fixture(scope="module")
def flags() -> Flags:
    return Flags(program_help("server"))


def server_container(docs: list[Manifest]) -> Manifest:
    deployment = one(docs, "Deployment")
    containers: list[Manifest] = [c for c in deployment["spec"]["template"]["spec"]["containers"]
                                   if c["image"].split(":")[0] == SERVER_IMAGE]
    assert len(containers) == 1, "one scoring container per pod"
    return containers[0]


def settings(container: Manifest, flags: Flags) -> dict[str, str]:
    """Every server flag's effective value in this container: command line, then environment, then default."""
    assert "command" not in container, "the image's ENTRYPOINT (python -m server) must stay"
    values = dict(flags.default)
    from_env = {e["name"]: e.get("value") for e in container.get("env", [])}
    for name, value in from_env.items():
        if name.startswith("SCORING_"):
            assert name in flags.by_env, f"{name} is not a variable of python -m server"
            assert value is not None, f"{name}: set a literal value"
            values[flags.by_env[name]] = str(value)
    args = [str(a) for a in container.get("args", [])]
    i = 0
    while i < len(args):
        token = args[i]
        assert token.startswith("--"), f"unexpected argument {token!r}"
        flag, eq, value = token.partition("=")
        if not eq:
            i += 1
            value = args[i]
        assert flag in flags.env, f"{flag} is not a flag of python -m server"
        assert flags.env[flag] not in from_env, f"{flag} is set twice: in args and as {flags.env[flag]}"
        values[flag] = value
        i += 1
    return values


def container_ports(container: Manifest) -> dict[str, int]:
    return {p["name"]: int(p["containerPort"]) for p in container.get("ports", [])}
