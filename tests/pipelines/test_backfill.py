"""The backfill end to end on a real local Ray and a real LanceDB: parity, bad input, resume, crash, refusal."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipelines.backfill import kept_columns, run_backfill
from pipelines.cli import main as cli_main
from pipelines.config import Config, EmbedderConfig, ResourcesConfig, SourceConfig, TableConfig
from pipelines.search import search
from pipelines.sink import table_ids
from pipelines.table import TableConfigMismatch, connect
from tests.pipelines.corpus import write_corpus

ROOT = Path(__file__).resolve().parents[2]


def job(tiny_model_dir, uri, sources, **table) -> Config:
    return Config(
        embedder=EmbedderConfig(model=str(tiny_model_dir), device="cpu", dtype="float32"),
        sources=sources,
        table=TableConfig(uri=str(uri), commit_rows=table.pop("commit_rows", 5), **table),
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
    assert "400000000 pixels" in recorded["huge.png"]["reason"]  # refused from the header, never decoded
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


CRASHING_DRIVER = """
import sys, ray
from pipelines.backfill import kept_columns, run_backfill
from pipelines.cli import main as cli_main
from pipelines.config import Config
ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=sys.argv[2])
run_backfill(Config.from_yaml(sys.argv[1]))
"""


def test_a_job_killed_mid_run_and_rerun_ends_with_every_id_exactly_once(
    tmp_path, tiny_model_dir, ray_session
):
    rows = [{"id": f"doc-{i:04d}", "text": f"document number {i} " + "word " * (i % 40)} for i in range(1200)]
    rows[7]["text"] = "   "  # a bad row, so both tables are written to
    rows.append(dict(rows[3]))  # a repeated row
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = job(
        tiny_model_dir,
        tmp_path / "db",
        [SourceConfig(kind="jsonl", path=str(source), id_column="id")],
        commit_rows=8,
    )
    config_file = tmp_path / "job.yaml"
    config_file.write_text(config.to_yaml())
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PYTHONPATH": str(ROOT)}
    temp_dir = f"/tmp/rk{os.getpid()}"
    driver = subprocess.Popen(
        [sys.executable, "-c", CRASHING_DRIVER, str(config_file), temp_dir],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and driver.poll() is None:
            try:
                if tables(config.table.uri)[0].count_rows() > 0:
                    break
            except (FileNotFoundError, ValueError):
                pass
            time.sleep(0.2)
        assert driver.poll() is None, "the job ended before it could be killed"
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)  # the Ray processes the killed driver had started
        shutil.rmtree(temp_dir, ignore_errors=True)
    vectors, errors = tables(config.table.uri)
    committed = vectors.count_rows() + errors.count_rows()
    assert 0 < committed < len(rows) - 1, "the kill should land mid-run"

    summary = run_backfill(config)
    assert summary.adds_up and summary.read == len(rows)
    assert summary.already_done == committed and summary.duplicates == 1
    assert summary.embedded + summary.errored == len(rows) - 1 - committed
    assert_exactly_once(config.table.uri, {r["id"] for r in rows})
    assert "doc-0007" in table_ids(tables(config.table.uri)[1])


def test_a_column_kept_by_two_sources_must_have_one_type(tmp_path):
    sources = [
        SourceConfig(kind="jsonl", path="a.jsonl", keep_columns=["year"], keep_types={"year": "int64"}),
        SourceConfig(kind="csv", path="b.csv", keep_columns=["year", "url"]),
    ]
    with pytest.raises(ValueError, match="kept column 'year' is int64 in one source and string in another"):
        kept_columns(Config(sources=sources))
    assert kept_columns(Config(sources=sources[1:])) == {"year": "string", "url": "string"}
