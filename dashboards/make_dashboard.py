"""Writes dashboards/scoring-dashboard.json (Grafana). Edit the panels here, then run:

    python dashboards/make_dashboard.py
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DS = {"type": "prometheus", "uid": "${datasource}"}


def panel(pid: int, title: str, exprs: list[tuple[str, str]], x: int, y: int, unit: str = "short",
          w: int = 12, h: int = 8, kind: str = "timeseries") -> dict[str, Any]:
    return {
        "id": pid, "type": kind, "title": title, "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [{"refId": chr(65 + i), "expr": e, "legendFormat": legend, "datasource": DS}
                    for i, (e, legend) in enumerate(exprs)],
    }


PANELS = [
    panel(1, "model_pv (requests/s)", [("sum by (model, version) (rate(model_pv_total{model=~\"$model\"}[1m]))",
                                        "{{model}} v{{version}}")], 0, 0, "reqps"),
    panel(2, "lost (requests/s) by reason",
          [("sum by (model, reason) (rate(model_lost_total{model=~\"$model\"}[1m]))", "{{model}} {{reason}}")],
          12, 0, "reqps"),
    panel(3, "lost ratio by reason",
          [("sum by (model, reason) (rate(model_lost_total{model=~\"$model\"}[5m])) / on (model) group_left "
            "sum by (model) (rate(model_pv_total{model=~\"$model\"}[5m]))", "{{model}} {{reason}}")],
          0, 8, "percentunit"),
    panel(4, "latency p50 / p99 (end to end, server side)",
          [("histogram_quantile(0.5, sum by (model, le) (rate(scoring_request_duration_seconds_bucket"
            "{model=~\"$model\"}[5m])))", "p50 {{model}}"),
           ("histogram_quantile(0.99, sum by (model, le) (rate(scoring_request_duration_seconds_bucket"
            "{model=~\"$model\"}[5m])))", "p99 {{model}}"),
           ("histogram_quantile(0.99, sum by (model, le) (rate(scoring_queue_wait_seconds_bucket"
            "{model=~\"$model\"}[5m])))", "queue wait p99 {{model}}")],
          12, 8, "s"),
    panel(5, "batch size (mean) and padding ratio (mean)",
          [("sum by (model) (rate(scoring_batch_size_sum{model=~\"$model\"}[5m])) / "
            "sum by (model) (rate(scoring_batch_size_count{model=~\"$model\"}[5m]))", "batch size {{model}}"),
           ("sum by (model) (rate(scoring_batch_padding_ratio_sum{model=~\"$model\"}[5m])) / "
            "sum by (model) (rate(scoring_batch_padding_ratio_count{model=~\"$model\"}[5m]))",
            "padding {{model}}")],
          0, 16),
    panel(6, "queue depth", [("sum by (model, version) (scoring_queue_depth{model=~\"$model\"})",
                              "{{model}} v{{version}}")], 12, 16),
    panel(7, "top 10 head trigger rates (triggers/s)",
          [("topk(10, sum by (model, srcid) (rate(head_trigger_total{model=~\"$model\"}[5m])))",
            "{{model}} {{srcid}}")], 0, 24, "reqps"),
    panel(8, "serving versions", [("scoring_model_info{model=~\"$model\"}",
                                   "{{model}} v{{version}} {{state}} {{precision}} {{execution_provider}}")],
          12, 24, kind="table"),
    panel(9, "result cache: hit ratio and coalesced share",
          [("sum by (model) (rate(scoring_cache_hits_total{model=~\"$model\"}[5m])) / (sum by (model) "
            "(rate(scoring_cache_hits_total{model=~\"$model\"}[5m])) + sum by (model) "
            "(rate(scoring_cache_misses_total{model=~\"$model\"}[5m])))", "hit ratio {{model}}"),
           ("sum by (model) (rate(scoring_cache_coalesced_total{model=~\"$model\"}[5m])) / sum by (model) "
            "(rate(model_pv_total{model=~\"$model\"}[5m]))", "coalesced share {{model}}")],
          0, 32, "percentunit"),
    panel(10, "result cache: entries, bytes, evictions/s",
          [("sum(scoring_cache_entries)", "entries"), ("sum(scoring_cache_bytes)", "bytes"),
           ("sum(rate(scoring_cache_evictions_total[5m]))", "evictions/s")], 12, 32),
    panel(11, "engine utilisation (busy share of its lanes)",
          [("sum by (model) (rate(scoring_inference_duration_seconds_sum{model=~\"$model\"}[5m])) / "
            "max by (model) (scoring_engine_lanes{model=~\"$model\"})", "{{model}}")], 0, 40, "percentunit"),
    panel(12, "offered load (share of full-batch capacity) and standing queue (1 = overload, refusing)",
          [("max by (model, version) (scoring_offered_load{model=~\"$model\"})", "offered {{model}} v{{version}}"),
           ("max by (model, version) (scoring_standing_queue{model=~\"$model\"})",
            "standing queue {{model}} v{{version}}")], 12, 40, "percentunit"),
]

DASHBOARD = {
    "uid": "scoring-service",
    "title": "Scoring service: model_pv / lost",
    "tags": ["scoring"],
    "timezone": "browser",
    "schemaVersion": 39,
    "version": 1,
    "refresh": "30s",
    "time": {"from": "now-3h", "to": "now"},
    "templating": {"list": [
        {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus"},
        {"name": "model", "type": "query", "datasource": DS, "query": "label_values(model_pv_total, model)",
         "includeAll": True, "multi": True, "current": {"text": "All", "value": "$__all"}, "refresh": 2},
    ]},
    "annotations": {"list": [{
        "name": "version changes", "datasource": DS, "enable": True, "iconColor": "orange",
        "expr": "changes(scoring_model_last_swap_timestamp_seconds{model=~\"$model\"}[2m]) > 0",
        "titleFormat": "{{model}}: serving version changed", "step": "60s",
    }]},
    "panels": PANELS,
}


def main() -> None:
    out = Path(__file__).with_name("scoring-dashboard.json")
    out.write_text(json.dumps(DASHBOARD, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
