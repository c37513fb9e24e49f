"""Kept columns are typed when read: one struct for the whole run, and a value that does not fit its type makes
an error row of its own row only, recorded at the read and never lost."""

import json

import numpy as np
import pyarrow as pa
import pytest

from pipelines.config import EmbedderConfig, SourceConfig, TableConfig
from pipelines.kept import kept_types
from pipelines.prepared_arrow import PASS_COLUMNS, output_schema
from pipelines.readers import row_schema
from pipelines.sink import BackfillSink
from pipelines.work_units import plan_units, read_unit

DIM = 4


def read(sources, kept):
    """Every block of every source's units, read with the run's kept columns."""
    units = plan_units(sources, unit_bytes=2**20, unit_files=10)
    return [block for n, u in enumerate(units) for block in read_unit(u, n, sources[u.source], kept)]


def test_the_runs_kept_columns_are_every_sources_each_with_one_type():
    year = SourceConfig(kind="jsonl", path="a.jsonl", keep_columns=["year"], keep_types={"year": "int64"})
    url = SourceConfig(kind="csv", path="b.csv", keep_columns=["url"])
    assert kept_types([year, url]) == {"year": "int64", "url": "string"}
    with pytest.raises(ValueError, match="kept column 'year' is int64 in one source and string in another"):
        kept_types([year, SourceConfig(kind="csv", path="b.csv", keep_columns=["year"])])


def test_every_source_of_a_run_reads_blocks_of_one_schema_with_null_where_it_lacks_a_kept_column(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"id": "j1", "text": "one", "year": "2001"}) + "\n")
    (tmp_path / "b.csv").write_text("id,text,url\nc1,two,http://example.org/2\n")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "p.png").write_bytes(b"not decoded at read")
    sources = [
        SourceConfig(
            kind="jsonl",
            path=str(tmp_path / "a.jsonl"),
            id_column="id",
            keep_columns=["year"],
            keep_types={"year": "int64"},
        ),
        SourceConfig(kind="csv", path=str(tmp_path / "b.csv"), id_column="id", keep_columns=["url"]),
        SourceConfig(kind="images", path=str(tmp_path / "photos")),
    ]
    kept = kept_types(sources)
    blocks = read(sources, kept)
    assert len(blocks) == 3 and all(block.schema == row_schema(kept) for block in blocks)
    rows = {r["id"]: r for block in blocks for r in block.to_pylist()}
    assert rows["j1"]["kept"] == {"year": 2001, "url": None}  # the text '2001' parsed as declared
    assert rows["c1"]["kept"] == {"year": None, "url": "http://example.org/2"}
    assert rows["p.png"]["kept"] == {"year": None, "url": None}


def test_a_kept_value_that_does_not_fit_is_an_error_row_from_the_read_to_the_errors_table(tmp_path):
    lines = [
        {"id": "c", "text": "third", "year": "MMII"},
        {"id": "d", "text": "fourth", "year": "3"},
        {"id": "e", "text": "fifth", "year": 2005},
    ]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    source = SourceConfig(
        kind="jsonl",
        path=str(tmp_path / "a.jsonl"),
        id_column="id",
        keep_columns=["year"],
        keep_types={"year": "int64"},
    )
    (block,) = read([source], kept_types([source]))
    rows = {r["id"]: r for r in block.to_pylist()}
    assert (rows["c"]["status"], rows["c"]["stage"]) == ("error", "read")
    assert rows["c"]["reason"] == "kept_column: 'year' value 'MMII' does not fit the column's int64"
    assert [rows[i]["status"] for i in "de"] == ["todo", "todo"]  # the others of its block are unharmed
    assert rows["d"]["kept"] == {"year": 3} and rows["e"]["kept"] == {"year": 2005}

    # the rows as the embed stage hands them on: the todo rows embedded
    status = ["ok" if s == "todo" else s for s in block["status"].to_pylist()]
    out = block.select(list(PASS_COLUMNS))
    out = out.set_column(out.schema.get_field_index("status"), "status", pa.array(status, pa.string()))
    out = out.append_column("modality", pa.array(["text"] * out.num_rows, pa.string()))
    vectors = np.eye(out.num_rows, DIM, dtype=np.float32).reshape(-1)
    out = out.append_column("vector", pa.FixedSizeListArray.from_arrays(pa.array(vectors), DIM))
    out = out.cast(output_schema(DIM, block.schema.field("kept").type))
    sink = BackfillSink(TableConfig(uri=str(tmp_path / "db")), EmbedderConfig(), DIM, {"year": "int64"})
    sink.open()
    sink.write(out)
    counts = sink.close()
    assert (counts.read, counts.embedded, counts.errored) == (3, 2, 1)
    (error,) = sink.errors.to_arrow().to_pylist()
    assert error["id"] == "c" and error["stage"] == "read" and "'year' value 'MMII'" in error["reason"]
    assert {r["id"]: r["year"] for r in sink.vectors.to_arrow().to_pylist()} == {"d": 3, "e": 2005}
