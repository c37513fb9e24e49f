"""The eval path on a model that works: the real all-MiniLM-L6-v2 (sentence-transformers backend) embeds the
bundled labelled set through the normal backfill on local Ray (`evaluate_corpus`), and its nDCG@10 is far above
what a shuffled ranking scores on the same labels. Also: search, the eval command, --compare and --plot on that
table, an image row recorded as an error naming the backend, and a query from another backend refused.

Measured here (CPU, float32, 69 queries, 208 passages): nDCG@10 0.969, Recall@1 0.819, Recall@10 0.981,
MRR@10 0.986; the shuffled ranking of the same 208 ids: nDCG@10 0.027, Recall@10 0.057 (mean of 20 seeds); the
tiny random Qwen3-VL: nDCG@10 0.014. The thresholds below leave room for other CPUs' rounding, not for a broken
model or a broken eval.
"""

from __future__ import annotations

import json

import pytest

from pipelines.backends import load_embedder
from pipelines.backfill import run_backfill
from pipelines.cli import main as cli_main
from pipelines.config import Config, EmbedderConfig, ResourcesConfig, SourceConfig, TableConfig
from pipelines.eval import read_queries
from pipelines.eval_run import evaluate, evaluate_corpus
from pipelines.search import search
from pipelines.table import TableConfigMismatch, connect
from tests.minilm import PASSAGES, QUERIES, minilm_config

RESOURCES = ResourcesConfig(batch_rows=256, prepare_batch_rows=256)


@pytest.fixture(scope="module")
def report(tmp_path_factory, ray_session):
    """The labelled set embedded on the fly by the backfill into a table kept under `workdir`, evaluated."""
    workdir = tmp_path_factory.mktemp("eval-minilm")
    report = evaluate_corpus(PASSAGES, minilm_config(), QUERIES, workdir=workdir, resources=RESOURCES)
    report["workdir"] = str(workdir)
    return report


@pytest.fixture(scope="module")
def table(report) -> TableConfig:
    return TableConfig(uri=report["table"]["uri"])


def test_minilm_ranks_far_above_a_shuffled_ranking(report):
    metrics, random = report["metrics"], report["random"]
    assert report["backfill"]["embedded"] == 208 and report["backfill"]["errored"] == 0
    assert report["queries"] == 69 and report["table"]["rows"] == 208
    assert 0.01 < random["ndcg@10"] < 0.05  # 0.027: one to three relevant ids among 208
    assert metrics["ndcg@10"] > 0.9
    assert metrics["recall@10"] > 0.9 and metrics["mrr@10"] > 0.9
    assert metrics["ndcg@10"] > 10 * random["ndcg@10"]
    assert report["bytes_per_vector"] == 384 * 4 and report["dimension"] == 384
    assert report["embedder"]["backend"] == "sentence-transformers"
    assert report["latency_ms"]["p50"] > 0 and not report["missing_relevant"]


def test_each_query_has_its_ranking_and_metrics(report):
    first = report["per_query"][0]
    assert first["id"] == "q01" and len(first["ranking"]) == 10
    assert first["ranking"][0] == "astronomy-1"  # "why is the red planet red"
    assert set(first) >= {"recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10", "latency_ms"}


def test_search_through_the_table_finds_the_answer(table):
    rows = search(table, "what makes thunder so loud", top_k=3)
    assert rows[0]["id"] == "weather-1" and rows[0]["score"] > 0.4


def test_a_query_embedder_of_another_backend_is_refused(table, embedder):
    with pytest.raises(TableConfigMismatch, match="backend: table has 'sentence-transformers'"):
        search(table, "thunder", embedder=embedder)  # the tiny Qwen3-VL embedder


def test_evaluate_reuses_a_given_embedder_and_passes_search_options(table):
    minilm = load_embedder(minilm_config())
    queries = read_queries(QUERIES)[:5]
    only_weather = evaluate(table, queries, embedder=minilm, where="id LIKE 'weather-%'", label="weather")
    assert only_weather["label"] == "weather" and only_weather["search_options"] == {
        "where": "id LIKE 'weather-%'"
    }
    assert all(row.startswith("weather-") for q in only_weather["per_query"] for row in q["ranking"])
    assert only_weather["metrics"]["recall@10"] == 0.0  # none of the first five queries is about weather


def test_the_eval_command_prints_json_compare_and_plot(report, table, tmp_path, capsys):
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    assert (
        cli_main(["eval", str(QUERIES), "--table", table.uri, "--json", str(first), "--label", "minilm"]) == 0
    )
    printed = capsys.readouterr().out
    assert "ndcg@10" in printed and "random ndcg@10" in printed and "minilm" in printed
    run = json.loads(first.read_text())["runs"][0]
    assert run["metrics"]["ndcg@10"] == pytest.approx(report["metrics"]["ndcg@10"], abs=1e-6)
    worse = {**run, "label": "worse", "metrics": {k: v - 0.25 for k, v in run["metrics"].items()}}
    second.write_text(json.dumps({"runs": [worse]}))
    plot = tmp_path / "compare.png"
    assert cli_main(["eval", "--compare", str(first), str(second), "--plot", str(plot)]) == 0
    lines = capsys.readouterr().out.splitlines()
    ndcg = next(line for line in lines if line.startswith("ndcg@10"))
    assert ndcg.split()[-1] == "-0.2500" and "Δ worse" in lines[1]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000


def test_the_eval_command_refuses_embedder_options_with_a_table(table, capsys):
    assert cli_main(["eval", str(QUERIES), "--table", table.uri, "--pooling", "cls"]) == 2
    assert "apply to --corpus only" in capsys.readouterr().err


def test_the_search_command_works_on_a_sentence_transformers_table(table, capsys):
    assert cli_main(["search", "rings of ice around a planet", "--table", table.uri, "--top-k", "1"]) == 0
    assert "\tastronomy-5\t" in capsys.readouterr().out


def test_an_image_row_in_a_backfill_is_an_error_naming_the_backend(tmp_path, ray_session):
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 0, 0)).save(tmp_path / "red.png")
    rows = [{"id": "t", "text": "a red square"}, {"id": "i", "image": "red.png", "text": "a caption"}]
    (tmp_path / "mixed.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    config = Config(
        embedder=minilm_config(),
        sources=[SourceConfig(kind="jsonl", path=str(tmp_path / "mixed.jsonl"), id_column="id")],
        table=TableConfig(uri=str(tmp_path / "db")),
        resources=RESOURCES,
    )
    summary = run_backfill(config)
    assert (summary.embedded, summary.errored) == (1, 1)
    errors = connect(config.table).open_table("errors").to_arrow().to_pylist()
    assert errors[0]["id"] == "i" and errors[0]["stage"] == "prepare"
    assert errors[0]["reason"].startswith("unsupported_modality: the sentence-transformers backend")


def test_a_tiny_table_refuses_a_sentence_transformers_query_embedder(tmp_path, tiny_model_dir, ray_session):
    (tmp_path / "one.jsonl").write_text('{"id": "a", "text": "a red circle"}\n')
    config = Config(
        embedder=EmbedderConfig(model=str(tiny_model_dir), device="cpu", dtype="float32"),
        sources=[SourceConfig(kind="jsonl", path=str(tmp_path / "one.jsonl"), id_column="id")],
        table=TableConfig(uri=str(tmp_path / "db")),
        resources=RESOURCES,
    )
    run_backfill(config)
    with pytest.raises(TableConfigMismatch, match="backend: table has 'transformers', asked for 'sentence-"):
        search(config.table, "red", embedder=load_embedder(minilm_config()))
