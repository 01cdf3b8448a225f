"""Monitoring and autoscaling: the PrometheusRule carries dashboards/scoring-rules.yml unchanged and
`promtool check rules` accepts it, the PodMonitor scrapes the metrics port as the job the rules
select, and the HPA's metric is one the server exports (through prometheus-adapter).
Kustomizations are rendered by `tests.k8s_render.RENDERER` (its name is in the test ids).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from server.metrics import Metrics
from tests.k8s_helpers import BASE, EXTRAS, RULES, one, server_container
from tests.k8s_render import Manifest, render

REQUIRE_PROMETHEUS = os.environ.get("SCORING_REQUIRE_PROMETHEUS") == "1"  # set by `make test`



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
    rules.write_text(yaml.safe_dump({"groups": one(render(BASE), "PrometheusRule")["spec"]["groups"]}))
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
