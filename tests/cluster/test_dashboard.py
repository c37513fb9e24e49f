"""The Grafana dashboard queries exactly the metrics pipelines/metrics.py defines, under the names Ray exports.

Ray exports a metric `vlm_embed_x` as `ray_vlm_embed_x`: a counter as `..._total`, a histogram as
`..._bucket`/`..._sum`/`..._count`, a gauge as itself. The static tests read metrics.py's source; the slow test
records every metric in a real local Ray and reads its Prometheus endpoint.
"""

from __future__ import annotations

import ast
import inspect
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

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


SCRAPE = textwrap.dedent(
    """
    import inspect, json, sys, time, urllib.request
    import ray
    from pipelines import metrics

    port = int(sys.argv[1])
    temp_dir = sys.argv[3]
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False,
             configure_logging=False, _metrics_export_port=port, _temp_dir=temp_dir,
             _system_config={"metrics_report_interval_ms": 500})
    SAMPLE = {"str": "text", "int": 2, "float": 0.05}

    @ray.remote
    def record():
        for cls in (metrics.PipelineMetrics, metrics.ServeMetrics):
            recorder = cls()
            for name, method in inspect.getmembers(recorder, inspect.ismethod):
                if not name.startswith("_"):
                    params = inspect.signature(method).parameters.values()
                    method(*[SAMPLE[p.annotation] for p in params if p.default is p.empty])
        time.sleep(1.5)

    ray.get(record.remote())
    deadline, families = time.time() + 120, {}
    while time.time() < deadline:
        try:  # the metrics agent may still be starting
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        except OSError:
            time.sleep(0.5)
            continue
        families = {}
        for line in body.splitlines():
            if line.startswith("ray_vlm_embed_"):
                name, _, rest = line.partition("{")
                labels = [pair.split("=")[0] for pair in rest.rsplit("}", 1)[0].split('",') if pair]
                families.setdefault(name, set()).update(label.strip() for label in labels)
        if len({n.rsplit("_", 1)[0] for n in families}) >= int(sys.argv[2]):
            break
        time.sleep(0.5)
    ray.shutdown()
    print(json.dumps({name: sorted(labels) for name, labels in families.items()}))
    """
)


@pytest.mark.slow
def test_ray_exports_the_series_the_dashboard_queries():
    """Record every metric once in a fresh local Ray and read Ray's Prometheus endpoint."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    temp_dir = tempfile.mkdtemp(prefix="rdash", dir="/tmp")  # short: Ray's socket paths have a length limit
    try:
        result = subprocess.run(
            [sys.executable, "-c", SCRAPE, str(port), str(len(defined_metrics())), temp_dir],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=300,
        )
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert result.returncode == 0, result.stderr[-3000:]
    scraped = json.loads(result.stdout.strip().splitlines()[-1])
    used = {name for expr in queries() for name in metric_names(expr)}
    missing = used - set(scraped)
    assert not missing, (
        f"the dashboard queries series Ray does not export: {missing}; Ray has {sorted(scraped)}"
    )
    series = exported_series()
    for name in used:
        query_labels = set().union(*(label_names(e) for e in queries() if name in metric_names(e)))
        assert query_labels <= set(scraped[name]) | {"le"}, (name, query_labels, scraped[name])
    assert set(scraped) == set(series), "metrics.py and the exported series disagree"


def test_recorders_take_only_arguments_the_scrape_test_can_fill():
    """The slow test calls every recorder method with sample values chosen by annotation."""
    from pipelines import metrics

    for cls in (metrics.PipelineMetrics, metrics.ServeMetrics):
        for name, method in inspect.getmembers(cls(), inspect.ismethod):
            if not name.startswith("_"):
                for param in inspect.signature(method).parameters.values():
                    assert param.default is not param.empty or param.annotation in ("str", "int", "float"), (
                        f"{cls.__name__}.{name}({param.name}: {param.annotation})"
                    )
