"""Work units: deterministic, every input row in exactly one unit, whatever the unit size; read without Ray."""

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.config import SourceConfig
from pipelines.work_units import plan_units, read_unit, waves
from tests.conftest import make_image
from tests.s3_server import s3_server  # noqa: F401 (a fixture)


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


def image_folder(root, folders: int, per_folder: int = 500):
    for folder in range(folders):  # names only: nothing is decoded when planning
        (root / f"f{folder:02d}").mkdir(parents=True)
        for name in range(per_folder):
            (root / f"f{folder:02d}" / f"{name:03d}.png").touch()
    return SourceConfig(kind="images", path=str(root))


def planning_peak(source, place) -> int:
    import tracemalloc

    plan_units([source], unit_bytes=1, unit_files=500, listings=place)  # the lazy imports, before measuring
    tracemalloc.start()
    plan_units([source], unit_bytes=1, unit_files=500, listings=place)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def test_an_image_folders_units_hold_no_rows_their_listing_is_a_file_beside_the_table(tmp_path):
    import hashlib
    import pickle

    from pipelines.image_listing import ListingPlace

    source = image_folder(tmp_path / "photos", folders=16)
    place = ListingPlace(str(tmp_path / "db"), "vectors")
    units = plan_units([source], unit_bytes=1, unit_files=500, listings=place)
    assert [u.rows for u in units] == [500] * 16 and units[0].listing == place.path(0)
    assert (tmp_path / "db" / "_listings" / "vectors-0.parquet").exists()
    assert len(pickle.dumps(units)) < 300 * len(units)  # no unit carries its rows
    ids = [r["id"] for r in lines_of(units, source)]
    assert ids == [f"f{f:02d}/{n:03d}.png" for f in range(16) for n in range(500)]
    first = ids[:500]  # the key's digest is the chunk's ids as a JSON list, as when the driver held the rows
    assert units[0].key.endswith("|0-500|" + hashlib.sha256(json.dumps(first).encode()).hexdigest()[:16])


def test_planning_an_image_folder_takes_the_same_memory_for_four_times_the_images(tmp_path):
    from pipelines.image_listing import ListingPlace

    small = planning_peak(image_folder(tmp_path / "small", 4), ListingPlace(str(tmp_path / "a"), "v"))
    big = planning_peak(image_folder(tmp_path / "big", 16), ListingPlace(str(tmp_path / "b"), "v"))
    assert big < 1.3 * small, f"2,000 images: {small / 2**20:.2f} MiB, 8,000: {big / 2**20:.2f} MiB"


def test_an_image_folder_on_object_storage_is_walked_folder_by_folder_and_listed_beside_the_table(s3_server):  # noqa: F811
    from pipelines.image_listing import ListingPlace

    for key in ["b.png", "a.PNG", "sub/c.png", "sub/deeper/d.png", "z/e.png", "notes.txt", "sub/x.json"]:
        s3_server.put(f"photos/{key}", b"not decoded when planning")
    options = s3_server.storage_options
    source = SourceConfig(kind="images", path=s3_server.uri("photos"), storage_options=options)
    place = ListingPlace(s3_server.uri("db"), "vectors", tuple(sorted(options.items())))
    units = plan_units([source], unit_bytes=1, unit_files=2, listings=place)
    assert s3_server.keys("db/") == ["db/_listings/vectors-0.parquet"]
    rows = lines_of(units, source)
    assert [r["id"] for r in rows] == ["a.PNG", "b.png", "sub/c.png", "sub/deeper/d.png", "z/e.png"]
    assert [u.rows for u in units] == [2, 2, 1] and rows[2]["image_uri"] == s3_server.uri("photos/sub/c.png")
