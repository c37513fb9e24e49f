"""Sources are checked before any work: a missing path or a column that is not there fails at once, clearly."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.backfill import run_backfill
from pipelines.config import Config, SourceConfig, TableConfig
from pipelines.source_check import SourceError, check_source, check_sources
from tests.pipelines.corpus import write_corpus

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    """The same three columns (id, body, lang) as JSONL, CSV and Parquet."""
    root = tmp_path_factory.mktemp("tables")
    rows = [{"id": f"r{i}", "body": f"text {i}", "lang": "en"} for i in range(3)]
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "rows.csv").write_text("id,body,lang\n" + "".join(f"{r['id']},{r['body']},en\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), root / "rows.parquet")
    return root


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet"])
def test_a_text_column_that_is_not_there_is_named_with_the_file_and_its_columns(tables, kind):
    path = str(tables / f"rows.{kind}")
    with pytest.raises(SourceError) as caught:
        check_source(SourceConfig(kind=kind, path=path, name="docs", text_column="bdy"))
    message = str(caught.value)
    assert message.startswith(f"source 'docs': {path} has no column 'bdy' (text_column); the columns in its ")
    assert message.endswith("are 'id', 'body', 'lang'")
    check_source(
        SourceConfig(kind=kind, path=path, text_column="body", id_column="id", keep_columns=["lang"])
    )


def test_id_and_kept_columns_are_checked_too(tables):
    path = str(tables / "rows.csv")
    source = SourceConfig(
        kind="csv", path=path, text_column="body", id_column="key", keep_columns=["lang", "yr"]
    )
    with pytest.raises(SourceError, match=r"has no column 'key' \(id_column\), 'yr' \(keep_columns\)"):
        check_source(source)


def test_a_table_with_neither_a_text_nor_an_image_column_needs_them_named(tables):
    with pytest.raises(SourceError, match="has neither a 'text' nor an 'image' column .* name yours with"):
        check_source(SourceConfig(kind="jsonl", path=str(tables / "rows.jsonl")))


def test_missing_paths_empty_globs_and_folders_without_files_of_the_kind_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_source(SourceConfig(kind="jsonl", path=str(tmp_path / "nope.jsonl")))
    with pytest.raises(FileNotFoundError, match="no files match"):
        check_source(SourceConfig(kind="csv", path=str(tmp_path / "*.csv")))
    (tmp_path / "notes.txt").write_text("not a table")
    (tmp_path / "_hidden.parquet").write_bytes(b"skipped, as Ray Data skips it")
    with pytest.raises(SourceError, match=r"no \.parquet files under"):
        check_source(SourceConfig(kind="parquet", path=str(tmp_path)))
    with pytest.raises(SourceError, match=r"no \.jpg, \.jpeg, .* files under"):
        check_source(SourceConfig(kind="images", path=str(tmp_path)))


def test_every_valid_source_of_the_test_corpus_passes(tmp_path):
    check_sources(write_corpus(tmp_path).sources)  # bad lines, bad files and repeats are the rows' business


def test_rows_that_hold_only_bad_lines_give_nothing_to_judge_by(tmp_path):
    (tmp_path / "bad.jsonl").write_text("{not json\n[1, 2]\n")
    (tmp_path / "empty.csv").write_text("")
    check_source(SourceConfig(kind="jsonl", path=str(tmp_path / "bad.jsonl"), text_column="body"))
    check_source(SourceConfig(kind="csv", path=str(tmp_path / "empty.csv"), text_column="body"))


def test_a_compressed_csv_is_read_through_its_codec(tmp_path):
    with pa.output_stream(str(tmp_path / "rows.csv.gz"), compression="gzip") as out:
        out.write(b"key,body\nk1,a text\n")
    check_source(SourceConfig(kind="csv", path=str(tmp_path / "rows.csv.gz"), text_column="body"))
    with pytest.raises(SourceError, match="has no column 'text'"):
        check_source(SourceConfig(kind="csv", path=str(tmp_path / "rows.csv.gz"), text_column="text"))


def test_object_store_uris_are_checked_where_pyarrow_can_and_never_refused_where_it_cannot(tables, tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        check_source(SourceConfig(kind="jsonl", path=f"file://{tmp_path}/nope.jsonl"))
    with pytest.raises(SourceError, match="has no column 'bdy' \\(text_column\\)"):
        check_source(SourceConfig(kind="parquet", path=f"file://{tables}/rows.parquet", text_column="bdy"))
    check_source(SourceConfig(kind="parquet", path=f"file://{tables}/rows.parquet", text_column="body"))
    check_source(SourceConfig(kind="jsonl", path=f"file://{tables}", text_column="bdy"))  # a folder: exists
    check_source(SourceConfig(kind="jsonl", path="hf://datasets/someone/corpus/rows.jsonl"))  # Ray Data's


def test_a_missing_source_creates_no_table(tmp_path):
    config = Config(
        sources=[SourceConfig(kind="jsonl", path=str(tmp_path / "nope.jsonl"))],
        table=TableConfig(uri=str(tmp_path / "db")),
    )
    with pytest.raises(FileNotFoundError, match="nope.jsonl does not exist"):
        run_backfill(config)
    assert not (tmp_path / "db").exists()


def test_the_command_refuses_a_column_typo_in_seconds_without_starting_ray_or_touching_the_table(
    tables, tmp_path
):
    job = {
        "embedder": {"model": "tiny"},
        "sources": [
            {"kind": "jsonl", "path": str(tables / "rows.jsonl"), "text_column": "body"},
            {"kind": "csv", "path": str(tables / "rows.csv"), "name": "csv", "text_column": "txt"},
        ],
        "table": {"uri": str(tmp_path / "db")},
    }
    (tmp_path / "job.json").write_text(json.dumps(job))  # JSON is YAML
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {
        "VLM_EMBED_HOME": str(tmp_path / "home")
    }
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.backfill", "--config", str(tmp_path / "job.json")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    seconds = time.monotonic() - start
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (
        f"backfill: error: source 'csv': {tables / 'rows.csv'} has no column 'txt' (text_column); "
        "the columns in its header are 'id', 'body', 'lang'"
    )
    assert not (tmp_path / "db").exists() and not (tmp_path / "home").exists()  # no table, no model built
    assert seconds < 30, f"refused after {seconds:.1f} s"
