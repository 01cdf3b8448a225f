"""Metrics as operators see them: a real Prometheus scrapes a real server; rules and dashboard check out."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from scoring.v1 import scoring_pb2, scoring_pb2_grpc
from tests.server_harness import REPO_ROOT, ServerProcess, free_port, run_server

RULES = REPO_ROOT / "dashboards" / "scoring-rules.yml"
DASHBOARD = REPO_ROOT / "dashboards" / "scoring-dashboard.json"
REQUIRE = os.environ.get("SCORING_REQUIRE_PROMETHEUS") == "1"  # set by `make test`


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if REQUIRE:
            pytest.fail(f"{name} is not installed; `make test` installs Debian's prometheus package")
        pytest.skip(f"{name} not installed (Debian package prometheus; `make test` installs it)")
    return path


def test_promtool_check_rules() -> None:
    out = subprocess.run([_tool("promtool"), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 11 rules found" in out.stdout


@pytest.fixture(scope="module")
def server(demo_repo: Path) -> Iterator[ServerProcess]:
    # A tiny queue so that a burst forces queue_full losses.
    with run_server(demo_repo, "--max-queue-size", "3", "--max-batch-size", "2") as srv:
        yield srv


class Prometheus:
    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"

    def query(self, expr: str) -> list[dict[str, object]]:
        qs = urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(f"{self.url}/api/v1/query?{qs}", timeout=5) as resp:
            body = json.loads(resp.read())
        assert body["status"] == "success", body
        result: list[dict[str, object]] = body["data"]["result"]
        return result

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        if not result:
            return None
        sample = result[0]["value"]
        assert isinstance(sample, list)
        return float(sample[1])

    def wait_for(self, expr: str, predicate: object, timeout: float = 30.0) -> float:
        assert callable(predicate)
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = self.value(expr)
            if last is not None and predicate(last):
                return last
            time.sleep(0.5)
        raise AssertionError(f"{expr} stayed at {last}")


@pytest.fixture(scope="module")
def prometheus(server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    binary = _tool("prometheus")
    work = tmp_path_factory.mktemp("prometheus")
    port = free_port()
    config = work / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"rule_files:\n  - {RULES}\n"
        "scrape_configs:\n  - job_name: scoring\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{server.metrics_port}']\n",
        encoding="utf-8",
    )
    proc = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={work / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    prom = Prometheus(port)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if prom.value('up{job="scoring"}') == 1.0:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("Prometheus never scraped the server")
            time.sleep(0.3)
        yield prom
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def _traffic(target: str, ok: int, burst: int) -> dict[grpc.StatusCode, int]:
    codes: dict[grpc.StatusCode, int] = {}
    async with grpc.aio.insecure_channel(target) as ch:
        stub = scoring_pb2_grpc.ScorerStub(ch)  # type: ignore[no-untyped-call]

        async def one(q: str) -> None:
            try:
                await stub.Score(scoring_pb2.ScoreRequest(query=q, title="标题" * 20), timeout=30)
                code = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as err:
                code = err.code()
            codes[code] = codes.get(code, 0) + 1

        for i in range(ok):  # sequential: never refused
            await one(f"查询{i}")
        await asyncio.gather(*(one(f"突发{i}") for i in range(burst)))
    return codes


def test_prometheus_sees_pv_and_lost_move(server: ServerProcess, prometheus: Prometheus) -> None:
    pv = 'model_pv_total{model="demo",version="1"}'
    lost = 'model_lost_total{model="demo",version="1",reason="queue_full"}'
    pv0 = prometheus.wait_for(pv, lambda v: v >= 0)
    lost0 = prometheus.wait_for(lost, lambda v: v >= 0)
    codes = asyncio.run(_traffic(server.target, ok=10, burst=40))
    refused = codes.get(grpc.StatusCode.RESOURCE_EXHAUSTED, 0)
    assert refused > 0, codes
    assert prometheus.wait_for(pv, lambda v: v >= pv0 + 50) == pv0 + 50
    assert prometheus.wait_for(lost, lambda v: v >= lost0 + refused) == lost0 + refused
    # The recording rules evaluate over the scraped series.
    prometheus.wait_for('scoring:model_lost:rate1m{reason="queue_full"}', lambda v: v > 0)
    prometheus.wait_for('scoring:model_pv:rate1m{model="demo"}', lambda v: v > 0)


def test_dashboard_queries_are_valid_and_name_real_metrics(server: ServerProcess, prometheus: Prometheus) -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [a["expr"] for a in dashboard["annotations"]["list"]]
    assert len(exprs) >= 10
    metric_names = {m["metric"]["__name__"] for m in prometheus.query('{job="scoring"}')}  # type: ignore[index]
    for expr in exprs:
        prometheus.query(expr.replace("$model", ".*"))  # raises unless Prometheus parses and runs it
    referenced = ["model_pv_total", "model_lost_total", "scoring_request_duration_seconds_bucket",
                  "scoring_batch_size_sum", "scoring_queue_depth", "head_trigger_total", "scoring_model_info",
                  "scoring_model_last_swap_timestamp_seconds", "scoring_cache_hits_total", "scoring_cache_entries",
                  "scoring_offered_load", "scoring_standing_queue"]
    for name in referenced:
        assert name in metric_names, f"{name} is on the dashboard but not exported"


def test_promtool_check_metrics_is_clean(server: ServerProcess) -> None:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read()
    out = subprocess.run([_tool("promtool"), "check", "metrics"], input=text, capture_output=True)
    assert out.returncode == 0 and not out.stdout.strip() and not out.stderr.strip(), out


def test_cardinality_budget_per_head(server: ServerProcess) -> None:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
    per_head = [line for line in text.splitlines()
                if line.startswith(("head_trigger_total{", "head_score_")) and 'srcid="757531"' in line]
    assert len(per_head) == 7, per_head  # the budget documented in README.md
