"""The kustomizations themselves: the base lists every manifest, and the real `kubectl kustomize`
renders every overlay to the same objects as the in-repo renderer (tests/k8s_render.py), so the
other k8s tests check the same objects whichever renderer they ran with.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.k8s_helpers import BASE, OVERLAY_DIRS, object_key
from tests.k8s_render import build, find_kubectl, kubectl_build


def test_base_lists_every_manifest() -> None:
    listed = set(yaml.safe_load((BASE / "kustomization.yaml").read_text(encoding="utf-8"))["resources"])
    present = {p.name for p in BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


@pytest.mark.parametrize("root", OVERLAY_DIRS, ids=lambda p: p.name)
def test_kubectl_kustomize_agrees(root: Path) -> None:
    kubectl = find_kubectl()
    if kubectl is None:
        pytest.skip("kubectl not found: every k8s test renders with the in-repo kustomize only")
    theirs = {object_key(d): d for d in kubectl_build(kubectl, root)}
    ours = {object_key(d): d for d in build(root)}
    assert theirs == ours
