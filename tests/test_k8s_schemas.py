"""deploy/k8s and its overlays against the Kubernetes schemas.

Built-in kinds are validated against the Kubernetes JSON schemas that `kubernetes-validate` ships
(strict variants: an unknown or misspelt field fails), for the oldest and the newest Kubernetes
version the manifests target. The Prometheus Operator kinds are validated against small schemas of
the fields used here (their rules are checked with `promtool` in test_k8s_monitoring.py).
Kustomizations are rendered by `tests.k8s_render.RENDERER` (kubectl where found, else the in-repo
renderer; its name is in the test ids).
"""

from __future__ import annotations

import copy
from typing import Any

import jsonschema
import kubernetes_validate
import pytest

from tests.k8s_helpers import BASE, EXTRAS, object_key, one
from tests.k8s_render import Manifest, load_documents, render

# The oldest Kubernetes the manifests target (native sidecar containers are GA from 1.33) and the
# newest whose schemas the pinned kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.33.0", "1.37.0")



_DURATION = {"type": "string",
             "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_METADATA = {
    "type": "object", "required": ["name"], "additionalProperties": False,
    "properties": {"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
                   "namespace": {"type": "string"}, "labels": _STRING_MAP, "annotations": _STRING_MAP},
}
_LABEL_SELECTOR = {"type": "object", "additionalProperties": False,
                   "properties": {"matchLabels": _STRING_MAP, "matchExpressions": {"type": "array"}}}


def _crd(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
            "properties": {"apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": kind},
                           "metadata": _METADATA, "spec": spec}}


# The fields of the Prometheus Operator's v1 CRDs that the manifests use (names and types as in the
# operator's CRDs); anything else is refused so that a typo cannot pass unnoticed.
CRD_SCHEMAS: dict[str, dict[str, Any]] = {
    "PodMonitor": _crd("PodMonitor", {
        "type": "object", "required": ["selector", "podMetricsEndpoints"], "additionalProperties": False,
        "properties": {
            "jobLabel": {"type": "string"},
            "selector": _LABEL_SELECTOR,
            "namespaceSelector": {"type": "object", "additionalProperties": False, "properties": {
                "any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}}},
            "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["port"], "additionalProperties": False,
                "properties": {"port": {"type": "string"}, "path": {"type": "string", "pattern": "^/"},
                               "scheme": {"enum": ["http", "https"]}, "interval": _DURATION,
                               "scrapeTimeout": _DURATION, "honorLabels": {"type": "boolean"}}}},
        }}),
    "PrometheusRule": _crd("PrometheusRule", {
        "type": "object", "required": ["groups"], "additionalProperties": False,
        "properties": {"groups": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["name", "rules"], "additionalProperties": False,
            "properties": {
                "name": {"type": "string", "minLength": 1},
                "interval": _DURATION,
                "rules": {"type": "array", "items": {
                    "type": "object", "required": ["expr"], "additionalProperties": False,
                    "oneOf": [{"required": ["record"]}, {"required": ["alert"]}],
                    "properties": {"record": {"type": "string"}, "alert": {"type": "string"},
                                   "expr": {"type": ["string", "integer"]}, "for": _DURATION,
                                   "keep_firing_for": _DURATION, "labels": _STRING_MAP,
                                   "annotations": _STRING_MAP}}},
            }}}}}),
}


def validate(doc: Manifest) -> None:
    if doc["apiVersion"].startswith("monitoring.coreos.com/"):
        jsonschema.validate(doc, CRD_SCHEMAS[doc["kind"]])
        return
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            where = ".".join(str(p) for p in err.path)
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} against Kubernetes {version}: {where}: {err.message}")


def test_every_object_validates(built: list[Manifest]) -> None:
    assert built
    names = [object_key(d) for d in built]
    assert len(names) == len(set(names)), "duplicate objects"
    for doc in built:
        validate(doc)


def test_extras_validate() -> None:
    for doc in load_documents(EXTRAS / "publish-job.yaml"):
        validate(doc)


def test_crd_schemas_refuse_typos() -> None:
    monitor = one(render(BASE), "PodMonitor")
    bad = copy.deepcopy(monitor)
    bad["spec"]["podMetricsEndpoints"][0]["interva1"] = "15s"
    with pytest.raises(jsonschema.ValidationError):
        validate(bad)
    rule = copy.deepcopy(one(render(BASE), "PrometheusRule"))
    rule["spec"]["groups"][0]["rules"][0]["alert"] = "BothRecordAndAlert"
    with pytest.raises(jsonschema.ValidationError):
        validate(rule)


def test_strict_schemas_refuse_typos() -> None:
    deployment = copy.deepcopy(one(render(BASE), "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"grpc": {"port": 50051}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)
