"""A two-node cluster on 127.0.0.1 (cluster/local.sh, token auth): a backfill submitted with `ray job submit`,
the Serve app deployed with `serve deploy`, and our metrics on the nodes' Prometheus endpoints.

One cluster serves the whole module (starting it costs a minute here); each test asks for what it needs.
"""

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from pipelines.sample import sample_image_paths, sample_pairs, sample_texts

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
LOCAL = ROOT / "cluster" / "local.sh"
SAMPLE_ROWS = len(sample_texts()) + len(sample_pairs()) + len(sample_image_paths())
BAD_ROWS = 2


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def free_base_port() -> int:
    """A base port whose whole block (see cluster/local.sh) and the HTTP port after it are free here."""
    for base in range(23000, 29000, 97):
        block = [base, base + 1, base + 2, *range(base + 10, base + 27), base + 20000, base + 20200]
        if all(_free(p) for p in block):
            return base
    pytest.fail("no free port block for the local cluster")


class Cluster:
    def __init__(self, port: int, env: dict[str, str], client: dict[str, str]):
        self.port, self.env, self.client = port, env, client
        self.http_port = port + 26

    def metrics_ports(self) -> list[int]:
        return [self.port + 10 + 10 * node + 5 for node in range(2)]  # --metrics-export-port of node 0 and 1

    def run(self, *args, timeout=600, **kwargs):
        return subprocess.run(
            [str(a) for a in args], env=self.client, capture_output=True, text=True, timeout=timeout, **kwargs
        )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    port = free_base_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env |= {
        "PATH": f"{BIN}:{env.get('PATH', '')}",
        "VLM_EMBED_CLUSTER_DIR": f"/tmp/vc{os.getpid()}",
        "VLM_EMBED_CLUSTER_PORT": str(port),
        "VLM_EMBED_CLUSTER_CPUS": "2",
        # every process reports its metrics to its node's exporter each second (default 10 s): the scrape
        # tests see them sooner; the nodes and the jobs they start inherit it
        "RAY_metrics_report_interval_ms": "1000",
    }
    try:
        up = subprocess.run([str(LOCAL), "up", "1"], env=env, capture_output=True, text=True, timeout=600)
        assert up.returncode == 0, up.stderr
        client = dict(env)
        for line in up.stdout.splitlines():
            key, _, value = line.removeprefix("export ").partition("=")
            client[key] = value
        yield Cluster(port, env, client)
    finally:
        down = subprocess.run([str(LOCAL), "down"], env=env, capture_output=True, text=True, timeout=120)
        assert down.returncode == 0, down.stderr


@pytest.fixture(scope="module")
def job_config(tmp_path_factory):
    """The sample job into a table here, plus a source with bad rows (an empty text, a missing image)."""
    directory = tmp_path_factory.mktemp("job")
    (directory / "bad.jsonl").write_text(
        json.dumps({"id": "bad-empty", "text": "   "})
        + "\n"
        + json.dumps({"id": "bad-missing", "image": "nope.png"})
        + "\n"
    )
    job = yaml.safe_load((ROOT / "pipelines" / "sample_data" / "backfill.yaml").read_text())
    job["table"]["uri"] = str(directory / "lancedb")
    job["sources"].append(
        {"kind": "jsonl", "path": str(directory / "bad.jsonl"), "name": "bad", "id_column": "id"}
    )
    (directory / "job.yaml").write_text(yaml.safe_dump(job))
    return directory / "job.yaml", job


@pytest.fixture(scope="module")
def submitted_job(cluster, job_config):
    path, _ = job_config
    return cluster.run(
        BIN / "ray", "job", "submit", "--working-dir", ".", "--",
        "python", "-m", "pipelines.backfill", "--config", path, cwd=ROOT,
    )  # fmt: skip


@pytest.fixture(scope="module")
def deployed_app(cluster, job_config, submitted_job, tmp_path_factory):
    """serve/config.yaml, pointed at the job's table and this cluster's HTTP port, deployed with `serve deploy`."""
    _, job = job_config
    serve_config = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    serve_config["http_options"]["port"] = cluster.http_port
    serve_config["proxy_location"] = "HeadOnly"  # both nodes are 127.0.0.1: one proxy per port
    serve_config["applications"][0]["args"]["config"]["table"]["uri"] = job["table"]["uri"]
    path = tmp_path_factory.mktemp("serve") / "serve.yaml"
    path.write_text(yaml.safe_dump(serve_config))
    deploy = cluster.run(
        BIN / "serve", "deploy", path, "--address", cluster.client["RAY_API_SERVER_ADDRESS"], cwd=ROOT
    )
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    base = f"http://127.0.0.1:{cluster.http_port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            with urllib.request.urlopen(f"{base}/healthz", timeout=10) as response:
                if response.status == 200:
                    return base
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        assert time.monotonic() < deadline, "the Serve app did not become healthy within 300 s"
        time.sleep(2)


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def test_the_job_api_refuses_clients_without_the_token(cluster):
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"http://127.0.0.1:{cluster.port + 1}/api/version", timeout=10)
    assert refused.value.code == 401
    status = subprocess.run(
        [str(LOCAL), "status"], env=cluster.env, capture_output=True, text=True, timeout=60
    )
    assert status.stdout.count(" node_") == 2, status.stdout


def test_a_backfill_submitted_to_a_two_node_cluster_embeds_every_row_once(submitted_job, job_config):
    assert submitted_job.returncode == 0, submitted_job.stdout[-4000:] + submitted_job.stderr[-2000:]
    read = SAMPLE_ROWS + BAD_ROWS
    assert f"backfill: read {read} = embedded {SAMPLE_ROWS} + skipped 0" in submitted_job.stdout
    import lancedb

    db = lancedb.connect(job_config[1]["table"]["uri"])
    assert db.open_table("vectors").count_rows() == SAMPLE_ROWS
    errors = db.open_table("errors").to_arrow().to_pylist()
    assert sorted((e["id"], e["stage"]) for e in errors) == [
        ("bad-empty", "prepare"),
        ("bad-missing", "prepare"),
    ]


def test_the_serve_app_deployed_on_the_cluster_embeds_and_searches_the_backfilled_table(deployed_app):
    text = sample_texts()[0]["text"]
    embedded = post(f"{deployed_app}/v1/embeddings", {"input": [text, "another text"]})
    assert [d["index"] for d in embedded["data"]] == [0, 1] and len(embedded["data"][0]["embedding"]) == 64
    hits = post(f"{deployed_app}/search", {"text": text, "top_k": 3})["data"]
    assert hits[0]["id"] == sample_texts()[0]["id"] and hits[0]["score"] > 0.9999


def scrape(ports: list[int]) -> str:
    texts = []
    for port in ports:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
                texts.append(response.read().decode())
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            continue
    return "\n".join(texts)


def series_value(metrics: str, name: str, **labels: str) -> float:
    """The sum of the samples of a series whose labels include `labels`."""
    total = 0.0
    for line in metrics.splitlines():
        match = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})?\s+(\S+)$", line)
        if match and all(f'{k}="{v}"' in (match.group(1) or "") for k, v in labels.items()):
            total += float(match.group(2))
    return total


RECORD_EVERY_METRIC = """
import inspect, time
import ray
from pipelines import metrics

SAMPLE = {"str": "synthetic", "int": 2, "float": 0.05}  # labels no real row carries

@ray.remote
class Recorder:  # detached, to outlive this driver: a gauge is exported only while its process lives

    def record(self):
        for recorder in (metrics.PipelineMetrics(), metrics.ServeMetrics()):
            for name, method in inspect.getmembers(recorder, inspect.ismethod):
                if not name.startswith("_"):
                    params = inspect.signature(method).parameters.values()
                    method(*[SAMPLE[p.annotation] for p in params if p.default is p.empty])

ray.init(namespace="tests")
recorder = Recorder.options(name="metrics-recorder", lifetime="detached", get_if_exists=True).remote()
ray.get(recorder.record.remote())
time.sleep(1)
"""


def exported_families(metrics: str) -> dict[str, set[str]]:
    """{series name: the label names it carries} of the `ray_vlm_embed_*` series in a scrape."""
    families: dict[str, set[str]] = {}
    for line in metrics.splitlines():
        match = re.match(r"^(ray_vlm_embed_\w+)(?:\{([^}]*)\})?\s", line)
        if match:
            labels = re.findall(r'(\w+)="', match.group(2) or "")
            families.setdefault(match.group(1), set()).update(labels)
    return families


def test_every_series_the_grafana_dashboard_queries_is_exported_with_its_labels(cluster):
    from tests.cluster.test_dashboard import exported_series, label_names, metric_names, queries

    recorded = cluster.run(sys.executable, "-c", RECORD_EVERY_METRIC, cwd=ROOT, timeout=300)
    assert recorded.returncode == 0, recorded.stderr[-3000:]
    used = {name for expr in queries() for name in metric_names(expr)}
    deadline = time.monotonic() + 90
    while True:
        families = exported_families(scrape(cluster.metrics_ports()))
        missing = used - set(families)
        if not missing:
            break
        assert time.monotonic() < deadline, f"the dashboard queries series Ray does not export: {missing}"
        time.sleep(1)
    for name in used:
        query_labels = set().union(*(label_names(e) for e in queries() if name in metric_names(e)))
        assert query_labels <= families[name] | {"le"}, (name, query_labels, families[name])
    assert set(families) == set(exported_series()), "metrics.py and the exported series disagree"


def test_our_metrics_reach_the_prometheus_endpoints_of_the_nodes(cluster, submitted_job, deployed_app):
    for _ in range(3):
        post(f"{deployed_app}/v1/embeddings", {"input": "a request for the metrics"})
    # The job's actors are gone; what they reported before exiting stays on their node's endpoint, but the
    # last second of it may not have been reported, so the backfill's series are only required to be there.
    expected = {
        ("ray_vlm_embed_items_embedded_total", ("modality", "text")): 1,
        ("ray_vlm_embed_items_embedded_total", ("modality", "image")): 1,
        ("ray_vlm_embed_items_embedded_total", ("modality", "text+image")): 1,
        ("ray_vlm_embed_images_embedded_total", None): 1,
        ("ray_vlm_embed_errors_total", ("stage", "prepare")): 1,
        ("ray_vlm_embed_serve_requests_total", ("endpoint", "/v1/embeddings")): 3,
    }
    present = [
        "ray_vlm_embed_tokens_embedded_total",
        "ray_vlm_embed_batch_latency_seconds_count",
        "ray_vlm_embed_batch_size_count",
        "ray_vlm_embed_serve_request_latency_seconds_count",
        "ray_vlm_embed_serve_batch_size_count",
        "ray_vlm_embed_serve_batch_latency_seconds_count",
    ]
    deadline = time.monotonic() + 90
    while True:
        metrics = scrape(cluster.metrics_ports())
        values = {key: series_value(metrics, key[0], **dict([key[1]] if key[1] else [])) for key in expected}
        missing = [name for name in present if series_value(metrics, name) <= 0]
        if not re.search(r"^ray_vlm_embed_serve_queue_depth\{", metrics, flags=re.M):
            missing.append("ray_vlm_embed_serve_queue_depth")  # a gauge: there once a replica has set it
        if all(values[key] >= want for key, want in expected.items()) and not missing:
            break
        assert time.monotonic() < deadline, f"after 90 s: {values} (want {expected}); missing {missing}"
        time.sleep(1)
