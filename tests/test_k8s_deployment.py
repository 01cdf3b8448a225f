"""The Deployment and its companions against the server they run: the image's entrypoint, every
flag and SCORING_* variable exists in `python -m server --help`, the probes are gRPC on the scoring
port, the admin port is never exposed, shutdown fits in the grace period, security context,
resources, spreading, the headless Service, and the publish Job's `tools.build_model` flags.
Kustomizations are rendered by `tests.k8s_render.RENDERER` (its name is in the test ids).
"""

from __future__ import annotations

import json
import re

from server.app import LIVENESS
from tests.helpers import REPO_ROOT
from tests.k8s_helpers import (
    BASE,
    EXTRAS,
    Flags,
    by_kind,
    container_ports,
    one,
    program_help,
    server_container,
    settings,
)
from tests.k8s_render import Manifest, load_documents, render

DOCKERFILE = REPO_ROOT / "Dockerfile"
APP_LABELS = {"app.kubernetes.io/name": "scoring"}


LOOPBACK = {"127.0.0.1", "::1", "localhost"}



def test_help_parser_reads_every_flag(flags: Flags) -> None:
    for flag, env in flags.env.items():
        assert env == "SCORING_" + flag[2:].replace("-", "_").upper()
    for flag in ("--model-repo", "--grpc-port", "--metrics-port", "--admin-host", "--admin-port",
                 "--grace-period-s", "--shutdown-delay-s", "--max-connection-age-s", "--poll-interval-s"):
        assert flag in flags.env, flag
    assert flags.default["--max-connection-age-s"] == "300.0"
    assert flags.default["--poll-interval-s"] == "5.0"


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


def test_publish_job_uses_real_build_flags() -> None:
    job = one(load_documents(EXTRAS / "publish-job.yaml"), "Job")
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["python", "-m", "tools.build_model"]
    help_text = program_help("tools.build_model")
    for arg in container["args"]:
        if arg.startswith("--"):
            assert re.search(rf"(^|[\s\[]){re.escape(arg)}\b", help_text), f"{arg} is not a tools.build_model flag"
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert "readOnly" not in mounts["/models"]
    claim = one(render(BASE), "PersistentVolumeClaim")["metadata"]["name"]
    assert job["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == claim
