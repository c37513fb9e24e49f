"""The sink commits bounded chunks, writes every id once into exactly one table, and repairs a crash."""

import numpy as np
import pyarrow as pa
import pytest

from pipelines.config import EmbedderConfig, TableConfig
from pipelines.kept import kept_column, kept_type
from pipelines.prepared_arrow import output_schema
from pipelines.sink import BackfillSink, table_ids
from pipelines.table import TableConfigMismatch, recorded_embedder_config
from tests.pipelines.table_versions import rows_added_per_version

DIM = 8


def batch(rows: list[dict], keep: dict[str, str] | None = None) -> pa.Table:
    """Pipeline output rows: dicts with id and status (ok/error/done), optional text, kept (the values as read,
    typed with `keep` as the readers type them), stage, reason."""
    rng = np.random.default_rng(len(rows))
    schema = output_schema(DIM, kept_type(keep))
    columns = {name: [] for name in schema.names}
    for row in rows:
        status = row["status"]
        for name in columns:
            if name == "vector":
                columns[name].append(rng.standard_normal(DIM).astype(np.float32).tolist())
            else:
                default = {"source": "src", "modality": "text", "text": f"text of {row['id']}"}.get(name)
                columns[name].append(row.get(name, default))
        if status == "error":
            columns["stage"][-1] = row.get("stage", "prepare")
            columns["reason"][-1] = row.get("reason", "empty_text: text is empty")
    columns["kept"], bad = kept_column(columns["kept"], keep or {})
    assert not bad, bad
    return pa.table(columns, schema=schema)


def ok(*ids, **extra):
    return [{"id": i, "status": "ok", **extra} for i in ids]


def err(*ids, **extra):
    return [{"id": i, "status": "error", **extra} for i in ids]


def done(*ids):
    return [{"id": i, "status": "done"} for i in ids]


def make_sink(tmp_path, keep=None, **table):
    config = TableConfig(uri=str(tmp_path / "db"), commit_rows=table.pop("commit_rows", 4), **table)
    sink = BackfillSink(config, EmbedderConfig(pooling="max"), DIM, keep)
    return sink, sink.open()


def test_rows_are_committed_in_bounded_chunks_and_counted(tmp_path):
    sink, already = make_sink(tmp_path, commit_rows=4)
    assert already == set()
    sink.write(batch(ok("a", "b") + err("x")))
    assert sink.vectors is None  # 3 buffered rows: nothing committed yet
    sink.write(batch(ok("c", "d", "e")))
    assert sink.vectors.count_rows() == 4 and sink.counts.commits == 1 and sink.pending_rows == 2
    counts = sink.close()
    assert (counts.read, counts.embedded, counts.errored, counts.skipped) == (6, 5, 1, 0)
    assert table_ids(sink.errors) == {"x"}
    assert recorded_embedder_config(sink.vectors).pooling == "max"


def test_no_commit_holds_more_than_commit_rows_and_fewer_than_that_wait_uncommitted(tmp_path):
    sink, _ = make_sink(tmp_path, commit_rows=4)
    for start in (0, 30):  # pipeline batches much larger than a commit, vectors and errors mixed
        rows = [{"id": f"row-{start + i}", "status": "error" if i % 3 == 0 else "ok"} for i in range(30)]
        sink.write(batch(rows))
        committed = (sink.vectors.count_rows() if sink.vectors else 0) + sink.errors.count_rows()
        assert sink.pending_rows < 4 and committed == start + 30 - sink.pending_rows
    sink.close()
    for name in ("vectors", "errors"):
        added = rows_added_per_version(sink.db, name)
        assert max(added) <= 4, f"{name}: a version added {max(added)} rows"
    assert table_ids(sink.vectors) | table_ids(sink.errors) == {f"row-{i}" for i in range(60)}


def test_a_repeated_id_is_written_once_and_counted_as_skipped(tmp_path):
    sink, _ = make_sink(tmp_path)
    sink.write(batch(ok("a", "a") + err("b")))
    sink.write(batch(ok("b") + err("a")))
    counts = sink.close()
    assert (counts.read, counts.embedded, counts.errored, counts.duplicates) == (5, 1, 1, 3)
    assert table_ids(sink.vectors) == {"a"} and table_ids(sink.errors) == {"b"}


def test_a_rerun_skips_ids_in_either_table_unless_errors_are_retried(tmp_path):
    sink, _ = make_sink(tmp_path)
    sink.write(batch(ok("a", "b") + err("x", "y")))
    sink.close()
    rerun, already = make_sink(tmp_path)
    assert already == {"a", "b", "x", "y"}
    rerun.write(batch(done("a", "b", "x", "y") + ok("c")))
    counts = rerun.close()
    assert (counts.read, counts.already_done, counts.embedded) == (5, 4, 1)

    retry, already = make_sink(tmp_path, retry_errors=True)
    assert already == {"a", "b", "c"}
    retry.write(batch(done("a", "b", "c") + ok("x") + err("y", reason="image_decode: still broken")))
    retry.close()
    assert table_ids(retry.vectors) == {"a", "b", "c", "x"}
    errors = retry.errors.to_arrow().to_pylist()
    assert [(e["id"], e["reason"]) for e in errors] == [("y", "image_decode: still broken")]


def test_an_id_left_in_both_tables_by_a_crash_is_repaired_at_the_next_start(tmp_path):
    sink, _ = make_sink(tmp_path)
    sink.write(batch(ok("a") + err("b")))
    sink.close()
    # what a crash between a retried row's vector commit and its error deletion leaves behind
    sink.vectors.add(batch(ok("b")).select(["id", "modality", "text", "image_uri", "vector"]))
    assert table_ids(sink.vectors) & table_ids(sink.errors) == {"b"}
    repaired, already = make_sink(tmp_path)
    assert already == {"a", "b"}
    assert table_ids(repaired.errors) == set() and table_ids(repaired.vectors) == {"a", "b"}


def test_kept_columns_get_their_declared_types(tmp_path):
    """The readers type the kept values (a value that does not fit is an error row from the read on:
    `test_kept.py`); the sink writes them in the table's columns as they come."""
    keep = {"lang": "string", "year": "int64"}
    sink, _ = make_sink(tmp_path, keep=keep)
    sink.write(
        batch(ok("a", kept={"lang": "en", "year": 2001}) + ok("b", kept={"lang": 7, "year": None}), keep)
    )
    sink.close()
    assert sink.vectors.schema.field("year").type == pa.int64()
    rows = {r["id"]: r for r in sink.vectors.to_arrow().to_pylist()}
    assert rows["a"]["lang"] == "en" and rows["b"]["lang"] == "7" and rows["b"]["year"] is None

    again, _ = make_sink(tmp_path, keep=keep)
    again.write(batch(ok("d", kept={"lang": "fr", "year": "3"}), keep))
    again.close()
    assert {r["id"]: r["year"] for r in again.vectors.to_arrow().to_pylist()}["d"] == 3  # text parsed
    with pytest.raises(TableConfigMismatch, match="'year' is int64 in the table, string in the config"):
        make_sink(tmp_path, keep={"lang": "string", "year": "string"})


def test_a_different_embedder_configuration_is_refused_and_overwrite_starts_again(tmp_path):
    sink, _ = make_sink(tmp_path)
    sink.write(batch(ok("a") + err("b")))
    sink.close()
    other = BackfillSink(TableConfig(uri=str(tmp_path / "db")), EmbedderConfig(pooling="mean"), DIM)
    with pytest.raises(TableConfigMismatch, match="pooling: table has 'max', asked for 'mean'"):
        other.open()
    with pytest.raises(TableConfigMismatch, match=r"no column\(s\) \['lang'\]"):
        make_sink(tmp_path, keep={"lang": "string"})
    fresh = BackfillSink(TableConfig(uri=str(tmp_path / "db"), mode="overwrite"), EmbedderConfig(), DIM)
    assert fresh.open() == set()
    fresh.close()
    assert fresh.vectors.count_rows() == 0 and recorded_embedder_config(fresh.vectors).pooling is None


def test_indexes_are_built_after_the_run_above_the_size_threshold(tmp_path):
    sink, _ = make_sink(tmp_path, commit_rows=150, vector_index_min_rows=300)
    sink.write(batch(ok(*[f"row-{i}" for i in range(299)])))
    sink.close()
    assert sink.indexes == ["text"]  # below the threshold: full-text only
    bigger, _ = make_sink(tmp_path, commit_rows=150, vector_index_min_rows=300)
    bigger.write(batch(ok(*[f"fresh-{i}" for i in range(40)])))
    bigger.close()
    assert bigger.indexes == ["text", "vector"]
    by_text = bigger.vectors.search("fresh", query_type="fts").limit(5).to_list()
    assert by_text and all(r["text"].startswith("text of fresh-") for r in by_text)
