"""deploy/k8s and its overlays, checked offline: schemas, and agreement with the server they run.

- Built-in kinds are validated against the Kubernetes JSON schemas that `kubernetes-validate` ships
  (strict variants: an unknown or misspelt field fails), for the oldest and the newest Kubernetes
  version the manifests target. The Prometheus Operator kinds are validated against small schemas of
  the fields used here, and the rules they carry with `promtool check rules`.
- Overlays are built by a small kustomize (`build`: resources, configMapGenerator, JSON 6902 patches,
  `$patch: delete`) so that no binary is needed; where `kubectl` is installed its own `kubectl
  kustomize` must give the same objects.
- Against the server: every flag and SCORING_* variable exists in `python -m server --help`, the
  probes are gRPC on the scoring port, the admin port is never exposed, shutdown fits in the grace
  period, the PrometheusRule carries dashboards/scoring-rules.yml unchanged, the HPA's metric is one
  the server exports, and the object-store sidecar's sync script publishes only complete versions.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from model_format.repository import check_version
from server.app import LIVENESS
from server.metrics import Metrics
from tests.helpers import REPO_ROOT, SmallModelFactory

Manifest = dict[str, Any]

BASE = REPO_ROOT / "deploy" / "k8s"
OVERLAYS = REPO_ROOT / "deploy" / "k8s-overlays"
OVERLAY_DIRS = sorted(p.parent for p in OVERLAYS.glob("*/kustomization.yaml"))
KUSTOMIZATIONS = [BASE, *OVERLAY_DIRS]
EXTRAS = BASE / "extras"
RULES = REPO_ROOT / "dashboards" / "scoring-rules.yml"
DOCKERFILE = REPO_ROOT / "Dockerfile"
SYNC_SCRIPT = OVERLAYS / "object-store" / "sync.sh"
REQUIRE_PROMETHEUS = os.environ.get("SCORING_REQUIRE_PROMETHEUS") == "1"  # set by `make test`

# The oldest Kubernetes the manifests target (native sidecar containers are GA from 1.33) and the
# newest whose schemas the pinned kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.33.0", "1.37.0")
SERVER_IMAGE = "scoring"
APP_LABELS = {"app.kubernetes.io/name": "scoring"}
LOOPBACK = {"127.0.0.1", "::1", "localhost"}


# --- loading and building -----------------------------------------------------------------------------


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


def _key(doc: Manifest) -> tuple[str, str]:
    return doc["kind"], doc["metadata"]["name"]


def by_kind(docs: list[Manifest], kind: str) -> list[Manifest]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[Manifest], kind: str) -> Manifest:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module", params=KUSTOMIZATIONS, ids=lambda p: p.relative_to(REPO_ROOT).as_posix())
def built(request: pytest.FixtureRequest) -> list[Manifest]:
    root: Path = request.param
    return build(root)


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


def _help(module: str) -> str:
    # Without SCORING_* variables: the defaults printed must be the code's, not this shell's.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCORING_")}
    out = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO_ROOT, capture_output=True, text=True,
                         env={**env, "PYTHONPATH": str(REPO_ROOT), "COLUMNS": "100"}, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.fixture(scope="module")
def flags() -> Flags:
    return Flags(_help("server"))


def test_help_parser_reads_every_flag(flags: Flags) -> None:
    for flag, env in flags.env.items():
        assert env == "SCORING_" + flag[2:].replace("-", "_").upper()
    for flag in ("--model-repo", "--grpc-port", "--metrics-port", "--admin-host", "--admin-port",
                 "--grace-period-s", "--shutdown-delay-s", "--max-connection-age-s", "--poll-interval-s"):
        assert flag in flags.env, flag
    assert flags.default["--max-connection-age-s"] == "300.0"
    assert flags.default["--poll-interval-s"] == "5.0"


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


# --- schemas ------------------------------------------------------------------------------------------

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
    names = [_key(d) for d in built]
    assert len(names) == len(set(names)), "duplicate objects"
    for doc in built:
        validate(doc)


def test_extras_validate() -> None:
    for doc in load_documents(EXTRAS / "publish-job.yaml"):
        validate(doc)


def test_crd_schemas_refuse_typos() -> None:
    monitor = one(build(BASE), "PodMonitor")
    bad = copy.deepcopy(monitor)
    bad["spec"]["podMetricsEndpoints"][0]["interva1"] = "15s"
    with pytest.raises(jsonschema.ValidationError):
        validate(bad)
    rule = copy.deepcopy(one(build(BASE), "PrometheusRule"))
    rule["spec"]["groups"][0]["rules"][0]["alert"] = "BothRecordAndAlert"
    with pytest.raises(jsonschema.ValidationError):
        validate(rule)


def test_strict_schemas_refuse_typos() -> None:
    deployment = copy.deepcopy(one(build(BASE), "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"grpc": {"port": 50051}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


def test_base_lists_every_manifest() -> None:
    listed = set(yaml.safe_load((BASE / "kustomization.yaml").read_text(encoding="utf-8"))["resources"])
    present = {p.name for p in BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


@pytest.mark.parametrize("root", OVERLAY_DIRS, ids=lambda p: p.name)
def test_kubectl_kustomize_agrees(root: Path) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: overlays are checked with this test's own kustomize only")
    out = subprocess.run([kubectl, "kustomize", str(root)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    theirs = {_key(d): d for d in yaml.safe_load_all(out.stdout) if d}
    ours = {_key(d): d for d in build(root)}
    assert theirs == ours


# --- the Deployment against the server ------------------------------------------------------------------


def test_image_and_entrypoint(built: list[Manifest]) -> None:
    container = server_container(built)
    dockerfile = DOCKERFILE.read_text(encoding="utf-8")
    entrypoint = re.search(r"^ENTRYPOINT (\[.*\])$", dockerfile, re.M)
    assert entrypoint is not None and json.loads(entrypoint.group(1)) == ["python", "-m", "server"]
    exposed = {int(p) for line in re.findall(r"^EXPOSE (.*)$", dockerfile, re.M) for p in line.split()}
    assert set(container_ports(container).values()) <= exposed
    user = re.findall(r"^USER (\d+)$", dockerfile, re.M)
    pod_security = one(built, "Deployment")["spec"]["template"]["spec"]["securityContext"]
    assert user and int(user[-1]) == pod_security["runAsUser"] == container["securityContext"]["runAsUser"]
    assert container["image"] in ("scoring:latest", "scoring:cpu")


def test_flags_exist_and_model_repo_is_mounted_read_only(built: list[Manifest], flags: Flags) -> None:
    container = server_container(built)
    values = settings(container, flags)
    assert values["--model-repo"] == "/models"
    assert values["--workers"] == "1", "one process per pod: scale with replicas"
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/models"].get("readOnly") is True
    volumes = {v["name"]: v for v in one(built, "Deployment")["spec"]["template"]["spec"]["volumes"]}
    models = volumes[mounts["/models"]["name"]]
    if "persistentVolumeClaim" in models:
        assert models["persistentVolumeClaim"].get("readOnly") is True
        claim = next(c for c in by_kind(built, "PersistentVolumeClaim")
                     if c["metadata"]["name"] == models["persistentVolumeClaim"]["claimName"])
        assert "ReadWriteMany" in claim["spec"]["accessModes"]
    else:
        assert "emptyDir" in models
        sync = one(built, "Deployment")["spec"]["template"]["spec"]["initContainers"]
        assert any(m["name"] == mounts["/models"]["name"] for c in sync for m in c["volumeMounts"])


def test_ports_and_probes(built: list[Manifest], flags: Flags) -> None:
    container = server_container(built)
    values = settings(container, flags)
    ports = container_ports(container)
    assert ports == {"grpc": int(values["--grpc-port"]), "metrics": int(values["--metrics-port"])}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        spec = container[probe]
        assert set(spec) & {"grpc", "exec", "httpGet", "tcpSocket"} == {"grpc"}, f"{probe} must be a gRPC probe"
        assert spec["grpc"]["port"] == ports["grpc"], f"{probe} must ask the scoring port"
        want = (LIVENESS,) if probe == "livenessProbe" else ("", "scoring.v1.Scorer")
        assert spec["grpc"].get("service", "") in want, f"{probe} must ask health service {want}"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, "allow minutes for load and warm-up"


def test_admin_port_is_loopback_and_never_exposed(built: list[Manifest], flags: Flags) -> None:
    container = server_container(built)
    values = settings(container, flags)
    admin_port = int(values["--admin-port"])
    if admin_port:
        assert values["--admin-host"] in LOOPBACK
    assert admin_port not in container_ports(container).values()
    exposed_names = set(container_ports(container))
    for service in by_kind(built, "Service"):
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            assert target != admin_port and port["port"] != admin_port
            assert target in exposed_names or target in container_ports(container).values()
    for monitor in by_kind(built, "PodMonitor"):
        assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} == {"metrics"}


def test_shutdown_fits_the_grace_period(built: list[Manifest], flags: Flags) -> None:
    values = settings(server_container(built), flags)
    delay, grace = float(values["--shutdown-delay-s"]), float(values["--grace-period-s"])
    assert delay > 0, "stay NOT_SERVING a few seconds so endpoints drain before calls are refused"
    termination = one(built, "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert termination >= delay + grace + 10, "room for draining the batch queues after the gRPC grace"
    assert float(values["--max-connection-age-s"]) <= 600, "connections must age out so clients rebalance"


def test_security_context(built: list[Manifest]) -> None:
    spec = one(built, "Deployment")["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["automountServiceAccountToken"] is False
    for container in spec["containers"] + spec.get("initContainers", []):
        sc = container["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 10001, container["name"]
        assert sc["readOnlyRootFilesystem"] is True, container["name"]
        assert sc["allowPrivilegeEscalation"] is False, container["name"]
        assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"], container["name"]
        assert container["resources"]["requests"] and container["resources"]["limits"], container["name"]
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert "/tmp" in mounts, f"{container['name']}: a writable /tmp on a read-only root"


def test_resources_and_gpu(built: list[Manifest], flags: Flags) -> None:
    container = server_container(built)
    resources = container["resources"]
    for r in ("cpu", "memory"):
        assert resources["requests"][r] == resources["limits"][r], "Guaranteed QoS"
    values = settings(container, flags)
    threads = int(values["--intra-op-threads"])
    assert 0 < threads <= int(resources["limits"]["cpu"]), "ORT would size its pool by the node's cores"
    int(values["--cache-bytes"])  # explicit: the default follows the node's memory, not the limit
    assert {e["name"] for e in container["env"]} >= {"SCORING_CACHE_BYTES", "SCORING_INTRA_OP_THREADS"}
    gpu = resources["limits"].get("nvidia.com/gpu")
    if container["image"] == "scoring:latest":
        assert gpu == "1" and values["--device"] == "cuda"
    else:
        assert gpu is None and values["--device"] == "cpu"


def test_spread_and_disruption_budget(built: list[Manifest]) -> None:
    deployment = one(built, "Deployment")
    spec = deployment["spec"]
    assert "replicas" not in spec, "the HPA owns the replica count"
    pod_labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"] == APP_LABELS and APP_LABELS.items() <= pod_labels.items()
    pod = spec["template"]["spec"]
    assert {c["topologyKey"] for c in pod["topologySpreadConstraints"]} == {
        "topology.kubernetes.io/zone", "kubernetes.io/hostname"}
    for c in pod["topologySpreadConstraints"]:
        assert c["labelSelector"]["matchLabels"] == APP_LABELS
    anti = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["podAffinityTerm"]["labelSelector"]["matchLabels"] == APP_LABELS
    pdb = one(built, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == APP_LABELS
    assert pdb["spec"]["maxUnavailable"] == 1
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_headless_service_for_client_side_balancing(built: list[Manifest]) -> None:
    service = one(built, "Service")
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == APP_LABELS
    [port] = service["spec"]["ports"]
    assert port["name"] == "grpc" and port["port"] == 50051
    container = server_container(built)
    target = container_ports(container)[port["targetPort"]]
    assert target == container["readinessProbe"]["grpc"]["port"], "clients and probes reach the same port"


# --- monitoring and autoscaling ---------------------------------------------------------------------------


def _series_names() -> set[str]:
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    return {fam.name + s for fam in Metrics().registry.collect() for s in suffixes.get(fam.type, [""])}


def test_prometheus_rule_is_the_dashboards_rules_file(built: list[Manifest]) -> None:
    rule = one(built, "PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]


def test_promtool_checks_the_embedded_rules(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        if REQUIRE_PROMETHEUS:
            pytest.fail("promtool is not installed; `make test` installs Debian's prometheus package")
        pytest.skip("promtool not installed (Debian package prometheus; `make test` installs it)")
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump({"groups": one(build(BASE), "PrometheusRule")["spec"]["groups"]}))
    out = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_pod_monitor_scrapes_the_metrics_port_as_job_scoring(built: list[Manifest]) -> None:
    monitor = one(built, "PodMonitor")
    pod_labels = one(built, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert monitor["spec"]["podMetricsEndpoints"] == [
        {"port": "metrics", "path": "/metrics", "scheme": "http", "interval": "15s", "scrapeTimeout": "10s"}]
    # The rules select the job by name; the job label comes from this pod label.
    job = pod_labels[monitor["spec"]["jobLabel"]]
    jobs_in_rules = set(re.findall(r'job="([^"]+)"', RULES.read_text(encoding="utf-8")))
    assert jobs_in_rules == {job}


def test_hpa_scales_on_a_metric_the_server_exports(built: list[Manifest]) -> None:
    hpa = one(built, "HorizontalPodAutoscaler")
    deployment = one(built, "Deployment")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert hpa["spec"]["minReplicas"] >= 2
    kinds = [m["type"] for m in hpa["spec"]["metrics"]]
    assert kinds == ["Pods", "Resource"], "the service's own metric first, CPU as the fallback"
    assert hpa["spec"]["metrics"][1]["resource"]["name"] == "cpu"
    assert server_container(built)["resources"]["requests"]["cpu"], "CPU utilization needs a CPU request"
    adapter = yaml.safe_load((EXTRAS / "prometheus-adapter-values.yaml").read_text(encoding="utf-8"))
    served = {}
    for rule in adapter["rules"]["custom"]:
        series = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)\{", rule["seriesQuery"])
        assert series is not None, rule["seriesQuery"]
        assert series.group(1) in _series_names(), f"the server exports no {series.group(1)}"
        assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
        assert re.fullmatch(rule["name"]["matches"], series.group(1))
        served[rule["name"]["as"]] = rule
    for metric in hpa["spec"]["metrics"]:
        if metric["type"] == "Pods":
            assert metric["pods"]["metric"]["name"] in served, "prometheus-adapter must serve the HPA's metric"


def test_publish_job_uses_real_build_flags() -> None:
    job = one(load_documents(EXTRAS / "publish-job.yaml"), "Job")
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["python", "-m", "tools.build_model"]
    help_text = _help("tools.build_model")
    for arg in container["args"]:
        if arg.startswith("--"):
            assert re.search(rf"(^|[\s\[]){re.escape(arg)}\b", help_text), f"{arg} is not a tools.build_model flag"
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert "readOnly" not in mounts["/models"]
    claim = one(build(BASE), "PersistentVolumeClaim")["metadata"]["name"]
    assert job["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == claim


# --- the object-store sidecar's sync script ----------------------------------------------------------------

FAKE_RCLONE = '''#!{python}
"""rclone's `lsf --dirs-only` and `sync --checksum` on local folders, for the sync script's test."""
import os, shutil, sys
flags = {{a for a in sys.argv[1:] if a.startswith("--")}}
args = [a for a in sys.argv[1:] if not a.startswith("--")]
if args[0] == "lsf" and flags == {{"--dirs-only"}}:
    for name in sorted(os.listdir(args[1])):
        if os.path.isdir(os.path.join(args[1], name)):
            print(name + "/")
elif args[0] == "sync" and flags == {{"--checksum"}}:
    src, dst = args[1], args[2]
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(dst):
        if not os.path.exists(os.path.join(src, name)):
            os.remove(os.path.join(dst, name))
    for name in os.listdir(src):
        shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
else:
    sys.exit("fake rclone: unsupported " + " ".join(sys.argv[1:]))
'''


@pytest.fixture()
def sync_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    rclone = bin_dir / "rclone"
    rclone.write_text(FAKE_RCLONE.format(python=sys.executable))
    rclone.chmod(0o755)
    yield {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "MODEL_SOURCE": str(tmp_path / "remote"),
           "MODEL_REPO": str(tmp_path / "local"), "READY_FILE": str(tmp_path / "ready"), "SYNC_ONCE": "1"}


def _run_sync(env: dict[str, str], **extra: str) -> str:
    out = subprocess.run(["sh", str(SYNC_SCRIPT)], env={**env, **extra}, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_sync_script_is_the_configmap() -> None:
    config_map = one(build(OVERLAYS / "object-store"), "ConfigMap")
    assert config_map["data"]["sync.sh"] == SYNC_SCRIPT.read_text(encoding="utf-8")
    sidecar = one(build(OVERLAYS / "object-store"), "Deployment")["spec"]["template"]["spec"]["initContainers"][0]
    assert sidecar["restartPolicy"] == "Always", "a native sidecar, started before the server"
    env = {e["name"]: e["value"] for e in sidecar["env"]}
    assert sidecar["startupProbe"]["exec"]["command"] == ["test", "-f", env["READY_FILE"]]
    assert env["MODEL_REPO"] == "/models"


def test_sync_script_publishes_only_complete_versions(sync_env: dict[str, str],
                                                      small_model_factory: SmallModelFactory) -> None:
    remote, local = Path(sync_env["MODEL_SOURCE"]) / "tiny", Path(sync_env["MODEL_REPO"]) / "tiny"
    for version in (1, 2, 3):
        shutil.copytree(small_model_factory(version=version), remote / str(version))
    (remote / "2" / "manifest.json").unlink()  # still uploading: no manifest yet
    tokenizer = remote / "3" / "tokenizer.json"
    good = tokenizer.read_bytes()
    tokenizer.write_bytes(good[:-1])  # one file short of what the manifest says
    (remote / ".staging-upload").mkdir()  # not a version

    log = _run_sync(sync_env)
    assert Path(sync_env["READY_FILE"]).exists()
    assert "published tiny/1" in log
    assert sorted(p.name for p in local.iterdir()) == [".staging-sync-2", ".staging-sync-3", "1"]
    assert check_version(local / "1", "tiny", 1).complete

    tokenizer.write_bytes(good)  # the upload finished
    log = _run_sync(sync_env, KEEP_VERSIONS="1")
    assert "published tiny/3" in log and "removed tiny/1" in log
    assert sorted(p.name for p in local.iterdir()) == ["3"]  # 2 is out of the window: its staging goes too
    status = check_version(local / "3", "tiny", 3)
    assert status.complete, status.error
    assert (hashlib.sha256((local / "3" / "tokenizer.json").read_bytes()).hexdigest()
            == hashlib.sha256(good).hexdigest())

    shutil.rmtree(remote / "3")  # a bad release withdrawn from the bucket: pods fall back to 1
    log = _run_sync(sync_env, KEEP_VERSIONS="2")
    assert "removed tiny/3" in log and "published tiny/1" in log
    assert sorted(p.name for p in local.iterdir()) == [".staging-sync-2", "1"]
    assert check_version(local / "1", "tiny", 1).complete
    log = _run_sync(sync_env, KEEP_VERSIONS="2")  # steady state: nothing copied, nothing removed
    assert "published" not in log and "removed" not in log
