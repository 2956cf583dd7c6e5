"""deploy/observability: the Phoenix script parses, and the Grafana dashboard is well formed
(the metric names it queries are checked against a live scrape in test_metrics.py)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

OBSERVABILITY = Path(__file__).resolve().parents[3] / "deploy" / "observability"


def test_phoenix_script_is_valid_bash_and_points_the_server_at_phoenix() -> None:
    script = OBSERVABILITY / "phoenix.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "--otlp-traces-endpoint" in text and "arize-phoenix==" in text
    assert script.stat().st_mode & 0o111, "not executable"


def test_dashboard_is_importable_json_with_prometheus_queries() -> None:
    dashboard = json.loads((OBSERVABILITY / "grafana-dashboard.json").read_text())
    inputs = {i["name"] for i in dashboard["__inputs"]}
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        assert panel["datasource"]["uid"].strip("${}") in inputs
        assert panel["targets"]
        for target in panel["targets"]:
            expr = target["expr"]
            assert re.search(r"\bpagedserve_[a-z_]+", expr), expr
            assert 'model_name=~"$model"' in expr, expr
            assert expr.count("(") == expr.count(")"), expr
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert variables == {"model"}
