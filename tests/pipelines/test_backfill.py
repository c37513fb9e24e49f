"""The backfill end to end on a real local Ray and a real LanceDB: parity, bad input, resume, crash, refusal."""

import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipelines.backfill import run_backfill
from pipelines.cli import main as cli_main
from pipelines.config import Config, EmbedderConfig, ResourcesConfig, SourceConfig, TableConfig
from pipelines.search import search
from pipelines.table import TableConfigMismatch, connect
from tests.pipelines.corpus import write_corpus

ROOT = Path(__file__).resolve().parents[2]


def job(tiny_model_dir, uri, sources, **table) -> Config:
    return Config(
        embedder=EmbedderConfig(model=str(tiny_model_dir), device="cpu", dtype="float32"),
        sources=sources,
        table=TableConfig(uri=str(uri), commit_rows=table.pop("commit_rows", 10_000), **table),
        resources=ResourcesConfig(batch_rows=8, prepare_batch_rows=8),
    )


def tables(uri):
    db = connect(TableConfig(uri=str(uri)))
    return db.open_table("vectors"), db.open_table("errors")


def assert_exactly_once(uri, expected_ids):
    vectors, errors = tables(uri)
    vector_ids = vectors.search().select(["id"]).limit(None).to_arrow()["id"].to_pylist()
    error_ids = errors.search().select(["id"]).limit(None).to_arrow()["id"].to_pylist()
    assert len(vector_ids) == len(set(vector_ids)), "an id is twice in the vectors table"
    assert len(error_ids) == len(set(error_ids)), "an id is twice in the errors table"
    assert not set(vector_ids) & set(error_ids), "an id is in both tables"
    assert set(vector_ids) | set(error_ids) == set(expected_ids)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def first_run(corpus, tiny_model_dir, tmp_path_factory, ray_session):
    uri = tmp_path_factory.mktemp("lancedb")
    config = job(tiny_model_dir, uri, corpus.sources)
    return config, run_backfill(config)


def test_every_row_is_embedded_or_recorded_and_the_counts_add_up(first_run, corpus):
    config, summary = first_run
    assert summary.adds_up and summary.read == corpus.read
    assert (summary.embedded, summary.errored) == (len(corpus.good), len(corpus.bad))
    assert (summary.duplicates, summary.already_done) == (corpus.duplicates, 0)
    assert summary.vectors_in_table == len(corpus.good) and summary.errors_in_table == len(corpus.bad)
    assert "text" in summary.indexes  # full-text index; the vector index waits for 100,000 rows
    assert_exactly_once(config.table.uri, corpus.ids)


def test_each_bad_row_is_in_the_errors_table_with_its_stage_and_reason(first_run, corpus):
    config, _ = first_run
    _, errors = tables(config.table.uri)
    recorded = {row["id"]: row for row in errors.to_arrow().to_pylist()}
    assert {i: (row["stage"], row["reason"].split(":")[0]) for i, row in recorded.items()} == corpus.bad
    assert "400,000,000 pixels" in recorded["huge.png"]["reason"]  # refused from the header, never decoded
    assert recorded["t-bytes"]["source"] == "texts" and recorded["p-corrupt"]["source"] == "blobs"


def test_the_stored_vectors_equal_embed_batch_on_the_same_items(first_run, corpus, embedder):
    config, _ = first_run
    vectors, _ = tables(config.table.uri)
    stored = {row["id"]: row for row in vectors.to_arrow().to_pylist()}
    ids = sorted(corpus.good)
    expected = embedder.embed_batch([corpus.good[i] for i in ids])
    np.testing.assert_allclose(np.stack([stored[i]["vector"] for i in ids]), expected, atol=1e-5)
    assert stored["t3"]["lang"] == "3" and stored["t1"]["lang"] == "en"  # kept columns are strings by default
    assert stored["sub/b.JPG"]["modality"] == "image" and stored["p1"]["modality"] == "text+image"


def test_an_exact_text_query_finds_its_own_row_first(first_run, embedder):
    config, _ = first_run
    rows = search(config.table, "der zweite Text", top_k=3, embedder=embedder)
    assert rows[0]["id"] == "t2" and rows[0]["score"] == pytest.approx(1.0, abs=1e-5)


def test_a_different_embedder_configuration_is_refused(first_run, ray_session, tmp_path, capsys):
    config, _ = first_run
    other = config.model_copy(update={"embedder": config.embedder.model_copy(update={"pooling": "last"})})
    with pytest.raises(TableConfigMismatch, match="pooling: table has 'mean', asked for 'last'"):
        run_backfill(other)
    (tmp_path / "job.yaml").write_text(config.to_yaml())
    assert cli_main(["backfill", "--config", str(tmp_path / "job.yaml"), "--pooling", "last"]) == 2
    assert (
        "backfill: error: table 'vectors' was embedded with a different configuration"
        in capsys.readouterr().err
    )


def test_a_rerun_skips_what_is_done_and_retries_errors_on_request(first_run, corpus, ray_session):
    config, _ = first_run
    retry = config.model_copy(update={"table": config.table.model_copy(update={"retry_errors": True})})
    summary = run_backfill(retry)
    assert summary.adds_up and summary.read == corpus.read
    assert (summary.already_done, summary.embedded, summary.errored) == (len(corpus.good), 0, len(corpus.bad))
    assert_exactly_once(config.table.uri, corpus.ids)


def test_a_rerun_with_nothing_left_to_do_loads_no_model_and_says_so(
    tmp_path, tiny_model_dir, ray_session, caplog
):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"id": f"d{i}", "text": f"text {i}"}) + "\n" for i in range(6)))
    config = job(model, tmp_path / "db", [SourceConfig(kind="jsonl", path=str(source), id_column="id")])
    assert run_backfill(config).embedded == 6
    for path in model.iterdir():  # the weights and the tokenizer: only the vector size is read from now on
        if path.name != "config.json":
            path.unlink()
    with caplog.at_level(logging.INFO, logger="pipelines.backfill"):
        summary = run_backfill(config)
    assert (summary.read, summary.already_done, summary.embedded, summary.errored) == (6, 6, 0, 0)
    assert "nothing left to do: all 6 rows were already in the tables" in caplog.text


def test_the_command_prints_our_progress_and_summary_and_leaves_rays_output_in_its_log_files(quick_start):
    """`vlm-embed backfill` as the README quick start runs it (tests/quick_start.py), on a new local Ray whose
    files are under its RAY_TMPDIR."""
    done = quick_start.steps[0]
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.startswith("backfill: read 24 = embedded 24 + skipped 0")
    ours = re.compile(
        r"(committed group \d+ of \d+: \d+ vectors, \d+ error rows \(\d+ vectors, \d+ errors in this run; "
        r"\d+ more group\(s\) under way\)"
        r"|read \d+ unit\(s\) ahead of the window, to fill the stages' last batches"
        r"|\d+ unit\(s\) waited \d+\.\d s in all for the read-ahead window \(the stages after the reads "
        r"were the slower part\)"
        r"|\d+ embedding worker\(s\) loaded the model \d+ time\(s\) for \d+ group\(s\)"
        r"|the first embedding worker was ready [\d.]+ s into the run \(process [\d.]+ s, actor [\d.]+ s, "
        r"model loaded [\d.]+ s, warmed up [\d.]+ s\), the last [\d.]+ s"
        r"(; the first batch was embedded at [\d.]+ s)?)$"
    )
    assert [line for line in done.stderr.splitlines() if not ours.match(line)] == []
    (logs,) = quick_start.ray_tmp.glob("ray/session_2*/logs")
    assert "constructor arguments" in (logs / "vlm-embed-driver.err").read_text()  # Ray's, kept there
    assert "Started a local Ray instance" not in done.stderr and list(logs.glob("ray-data/*.log"))


def test_the_reads_and_the_claims_run_as_one_ray_data_operator(quick_start):
    """mark_done has the reads' cap and resources, so Ray Data fuses it into the read tasks: a task reads a
    unit, claims and looks up its rows, and hands on one block (not a block each way through the object
    store between two operators)."""
    (logs,) = quick_start.ray_tmp.glob("ray/session_2*/logs")
    text = "\n".join(path.read_text() for path in logs.glob("ray-data/*.log"))
    plans = [line for line in text.splitlines() if "Execution plan of Dataset" in line]
    assert plans and all("TaskPoolMapOperator[ReadUnits->MapBatches(mark_done)]" in line for line in plans)


def test_the_driver_reads_the_vector_size_without_importing_torch(tiny_model_dir, embedder):
    code = (
        "import sys; from pipelines.config import EmbedderConfig; from pipelines.loading import embedding_dimension; "
        f"print(embedding_dimension(EmbedderConfig(model={str(tiny_model_dir)!r})), 'torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == [str(embedder.get_embedding_dimension()), "False"], done.stderr
