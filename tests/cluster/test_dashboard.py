"""The Grafana dashboard queries exactly the metrics pipelines/metrics.py defines, under the names Ray exports.

Ray exports a metric `vlm_embed_x` as `ray_vlm_embed_x`: a counter as `..._total`, a histogram as
`..._bucket`/`..._sum`/`..._count`, a gauge as itself. These tests read metrics.py's source; the cluster test
(test_two_node_backfill.py) records every metric on a real cluster and reads its Prometheus endpoints.
"""

from __future__ import annotations

import ast
import inspect
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "cluster" / "dashboards" / "vlm-embed.json"
METRICS_SOURCE = ROOT / "pipelines" / "metrics.py"
KIND_OF_FACTORY = {"_counter": "counter", "_histogram": "histogram", "_gauge": "gauge"}
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
# Labels Ray adds to every application metric (seen on its Prometheus endpoint).
RAY_LABELS = {"SessionName", "NodeAddress", "WorkerId", "Component", "Version"}
PROMQL_KEYWORDS = {
    *("and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring"),
    *("group_left", "group_right", "inf", "nan"),
}


def defined_metrics() -> dict[str, tuple[str, tuple[str, ...]]]:
    """{name: (kind, tag keys)} for every metric metrics.py creates (read from its source, no Ray)."""
    metrics = {}
    for node in ast.walk(ast.parse(METRICS_SOURCE.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) in KIND_OF_FACTORY:
            kind = KIND_OF_FACTORY[node.func.id]
            name = ast.literal_eval(node.args[0])
            tags = ()
            tag_arg = {"counter": 2, "histogram": 3, "gauge": 2}[kind]
            if len(node.args) > tag_arg:
                tags = tuple(ast.literal_eval(node.args[tag_arg]))
            assert metrics.get(name, (kind, tags)) == (kind, tags), f"{name} is defined twice, differently"
            metrics[name] = (kind, tags)
    return metrics


def exported_series() -> dict[str, tuple[str, set[str]]]:
    """{series name on Ray's Prometheus endpoint: (metric name, labels it may carry)}."""
    series = {}
    for name, (kind, tags) in defined_metrics().items():
        for suffix in SUFFIXES[kind]:
            labels = RAY_LABELS | set(tags) | ({"le"} if suffix == "_bucket" else set())
            series[f"ray_{name}{suffix}"] = (name, labels)
    return series


def metric_names(expr: str) -> list[str]:
    """The metric names a PromQL expression selects (not functions, keywords, labels or variables)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = []
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        before, after = text[: match.start()], text[match.end() :].lstrip()
        if after.startswith("(") or match.group().lower() in PROMQL_KEYWORDS:
            continue
        if before.endswith("$") or (before and before[-1].isdigit()):
            continue
        names.append(match.group())
    return names


def label_names(expr: str) -> set[str]:
    """Labels named in matchers and in by/without/on/ignoring clauses."""
    labels = set()
    for matchers in re.findall(r"\{([^}]*)\}", expr):
        labels |= set(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", matchers))
    for group in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
        labels |= {label.strip() for label in group.split(",") if label.strip()}
    return labels


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels() -> list[dict]:
    found = []
    for panel in dashboard()["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def queries() -> list[str]:
    return [t["expr"] for p in panels() for t in p.get("targets", [])]


def test_metric_name_extraction_sees_every_selected_metric():
    expr = (
        'sum by (le) (rate(ray_vlm_embed_batch_size_bucket{SessionName=~"$SessionName"}[$__rate_interval]))'
        " / on(instance) group_left ray_node_gpus_utilization offset 5m > bool 0.5"
    )
    assert metric_names(expr) == ["ray_vlm_embed_batch_size_bucket", "ray_node_gpus_utilization"]
    assert label_names(expr) == {"le", "SessionName", "instance"}


def test_metrics_module_defines_the_metrics_the_issue_asks_for():
    names = set(defined_metrics())
    assert len(names) >= 10, names
    for part in (
        "items",
        "tokens",
        "images",
        "errors",
        "batch_latency",
        "batch_size",
        "serve_request",
        "queue",
    ):
        assert any(part in name for name in names), part


def test_dashboard_queries_name_only_metrics_the_project_defines():
    series = exported_series()
    assert queries()
    for expr in queries():
        used = metric_names(expr)
        assert used, f"query selects no metric: {expr}"
        unknown = [name for name in used if name not in series]
        assert not unknown, f"{unknown} in {expr!r}: not exported from pipelines/metrics.py"


def test_every_metric_is_on_the_dashboard():
    used = {series for expr in queries() for series in metric_names(expr)}
    shown = {exported_series()[s][0] for s in used}
    assert shown == set(defined_metrics())


def test_dashboard_queries_only_labels_the_metrics_carry():
    series = exported_series()
    for expr in queries():
        allowed = set().union(*(series[name][1] for name in metric_names(expr)))
        assert label_names(expr) <= allowed, f"{label_names(expr) - allowed} in {expr!r}"


def test_dashboard_is_importable_grafana_json():
    board = dashboard()
    assert board["uid"] and board["title"] and isinstance(board["schemaVersion"], int)
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    ids = [p["id"] for p in panels()]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels():
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]), panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for expr in (t["expr"] for t in panel["targets"]):
            assert expr.count("(") == expr.count(")"), expr
            assert 'SessionName=~"$SessionName"' in expr, f"query ignores the session filter: {expr}"


def test_recorders_take_only_arguments_the_scrape_test_can_fill():
    """The cluster test calls every recorder method with sample values chosen by annotation."""
    from pipelines import metrics

    for cls in (metrics.PipelineMetrics, metrics.ServeMetrics):
        for name, method in inspect.getmembers(cls(), inspect.ismethod):
            if not name.startswith("_"):
                for param in inspect.signature(method).parameters.values():
                    assert param.default is not param.empty or param.annotation in ("str", "int", "float"), (
                        f"{cls.__name__}.{name}({param.name}: {param.annotation})"
                    )
