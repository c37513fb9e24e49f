"""Work units: deterministic, every input row in exactly one unit, whatever the unit size; read without Ray."""

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.config import SourceConfig
from pipelines.work_units import plan_units, read_unit, waves
from tests.conftest import make_image


def lines_of(units, source):
    return [
        row
        for n, unit in enumerate(units)
        for block in read_unit(unit, n, source)
        for row in block.to_pylist()
    ]


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_jsonl_byte_ranges_hold_every_line_once_for_any_range_size(tmp_path, seed):
    rnd = random.Random(seed)
    rows = [{"id": f"r{i}", "text": "x" * rnd.randint(0, 300) + "é"} for i in range(200)]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + ("\n" * rnd.randint(1, 2)) for r in rows))
    source = SourceConfig(kind="jsonl", path=str(path), id_column="id")
    unit_bytes = rnd.randint(1, 5000)
    units = plan_units([source], unit_bytes=unit_bytes, unit_files=10)
    assert len(units) == -(-path.stat().st_size // unit_bytes), f"seed {seed}, unit_bytes {unit_bytes}"
    read = lines_of(units, source)
    assert [r["id"] for r in read] == [r["id"] for r in rows], f"seed {seed}, unit_bytes {unit_bytes}"
    assert all(r["status"] == "todo" for r in read)
    assert plan_units([source], unit_bytes=unit_bytes, unit_files=10) == units  # deterministic


def test_a_bad_line_in_a_later_range_is_an_error_row_naming_its_range(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"id": "a", "text": "one"}\n' * 50 + "{not json\n")
    source = SourceConfig(kind="jsonl", path=str(path), id_column="id")
    units = plan_units([source], unit_bytes=256, unit_files=10)
    bad = [r for r in lines_of(units, source) if r["status"] == "error"]
    assert len(bad) == 1 and bad[0]["reason"].startswith("invalid_json: ")
    assert "the range from byte" in bad[0]["reason"]


def test_parquet_row_groups_csv_files_and_image_chunks_are_units(tmp_path):
    table = pa.table({"id": [f"p{i}" for i in range(25)], "text": [f"t{i}" for i in range(25)]})
    pq.write_table(table, tmp_path / "rows.parquet", row_group_size=10)
    (tmp_path / "rows.csv").write_text("id,text\n" + "".join(f"c{i},text {i}\n" for i in range(7)))
    images = tmp_path / "images"
    images.mkdir()
    for i in range(5):
        make_image(i).save(images / f"{i}.png")
    sources = [
        SourceConfig(kind="parquet", path=str(tmp_path / "rows.parquet"), id_column="id"),
        SourceConfig(kind="csv", path=str(tmp_path / "rows.csv"), id_column="id"),
        SourceConfig(kind="images", path=str(images)),
    ]
    units = plan_units(sources, unit_bytes=8, unit_files=2)
    assert [(u.kind, u.rows) for u in units] == [
        ("row_group", 10),
        ("row_group", 10),
        ("row_group", 5),
        ("file", units[3].rows),
        ("images", 2),
        ("images", 2),
        ("images", 1),
    ]
    ids = [
        r["id"]
        for n, u in enumerate(units)
        for b in read_unit(u, n, sources[u.source])
        for r in b.to_pylist()
    ]
    assert ids == [f"p{i}" for i in range(25)] + [f"c{i}" for i in range(7)] + [f"{i}.png" for i in range(5)]
    assert len({u.key for u in units}) == len(units)


def test_rows_carry_their_unit_and_row_number_and_groups_hold_about_commit_rows(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(40)))
    source = SourceConfig(kind="jsonl", path=str(path))
    units = plan_units([source], unit_bytes=100, unit_files=1)
    origins = [r["origin"] for r in lines_of(units, source)]
    assert origins[0] == "0:0" and len(set(origins)) == 40
    groups = waves(list(enumerate(units)), rows=12)
    assert [pair for group in groups for pair in group] == list(enumerate(units))
    assert all(sum(u.rows for _, u in group) <= 12 or len(group) == 1 for group in groups)
