"""Readers turn every source into the same rows, with stable ids, and every unreadable line into an error row."""

import pytest
from pydantic import ValidationError

from pipelines.config import SourceConfig
from pipelines.readers import build_row, content_id, expand_paths, list_images
from pipelines.work_units import plan_units, read_unit
from tests.pipelines.corpus import documented_content_id, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def rows(corpus):
    """Every source read unit by unit (what each of the backfill's read tasks does), as {name: [row dicts]}."""
    units = plan_units(corpus.sources, unit_bytes=2**20, unit_files=2)
    read: dict[str, list] = {source.name: [] for source in corpus.sources}
    for number, unit in enumerate(units):
        source = corpus.sources[unit.source]
        read[source.name] += [r for block in read_unit(unit, number, source) for r in block.to_pylist()]
    return read


def test_content_ids_are_the_documented_hash_and_stable():
    assert content_id("a text", "img/a.png") == documented_content_id("a text", "img/a.png")
    assert content_id("a text", None) == content_id("a text", None)
    assert len({content_id("a text", None), content_id("a text", "a.png"), content_id(None, "a.png")}) == 3


def test_an_image_folder_is_listed_recursively_with_relative_paths_as_ids(corpus):
    images = corpus.sources[0]
    listed = {row["id"]: row for row in list_images(images)}
    assert set(listed) == {"a.png", "sub/b.JPG", "truncated.png", "notes.png", "empty.png", "huge.png"}
    assert listed["sub/b.JPG"]["image_uri"].endswith("images/sub/b.JPG")
    assert all(row["status"] == "todo" and row["source"] == "images" for row in listed.values())


def test_jsonl_rows_keep_their_ids_columns_and_kept_values(rows):
    texts = {row["id"]: row for row in rows["texts"]}
    assert texts["t2"]["text"] == "der zweite Text" and texts["t2"]["status"] == "todo"
    assert texts["t3"]["kept"] == {"lang": "3"}  # typed when read: a string column unless declared
    assert [row["id"] for row in rows["texts"]].count("t1") == 2  # repeats are the sink's business


def test_bad_lines_become_error_rows_at_the_read_stage(rows, corpus):
    texts = {row["id"]: row for row in rows["texts"]}
    bad_utf8 = texts["t-bytes"]
    assert (bad_utf8["status"], bad_utf8["stage"]) == ("error", "read")
    assert bad_utf8["reason"].startswith("invalid_utf8: ") and "texts.jsonl:10" in bad_utf8["reason"]
    assert "byte 0xe9" in bad_utf8["reason"]
    (not_json,) = [row for row in rows["texts"] if row["reason"] and "invalid_json" in row["reason"]]
    assert corpus.bad[not_json["id"]] == ("read", "invalid_json")
    csv_rows = {row["id"]: row for row in rows["csv"]}
    assert csv_rows["c-bytes"]["reason"].startswith("invalid_utf8: ")
    assert csv_rows["c-empty"]["text"] is None and csv_rows["c-empty"]["status"] == "todo"
    assert csv_rows["c1"]["text"] == "a csv text, with a comma"


def test_pair_rows_get_content_ids_and_image_paths_relative_to_their_file(rows, corpus):
    pairs = rows["pairs"]
    assert len(pairs) == 4
    first = documented_content_id("a caption for the pair", "pair.png")
    assert [row["id"] for row in pairs].count(first) == 2
    assert pairs[0]["image_uri"] == str(corpus.sources[2].path).replace("pairs.jsonl", "pair.png")
    image_only = [row for row in pairs if row["text"] is None]
    assert image_only[0]["id"] == documented_content_id(None, "pair.png")


def test_parquet_rows_carry_image_bytes_inline(rows, corpus):
    blobs = {row["id"]: row for row in rows["blobs"]}
    assert blobs["p1"]["image_bytes"] == corpus.good["p1"]["image"]
    assert blobs["p1"]["text"] == "inline image bytes" and blobs["p1"]["image_uri"] is None


def test_every_input_row_is_read_once(rows, corpus):
    ids = [row["id"] for source_rows in rows.values() for row in source_rows]
    assert len(ids) == corpus.read
    assert set(ids) == corpus.ids


def test_a_column_of_the_wrong_type_is_an_error_row():
    source = SourceConfig(kind="jsonl", path="x.jsonl", text_column="body")
    row = build_row(source, {"body": 42}, "", "x.jsonl:1")
    assert row["status"] == "error" and row["stage"] == "read"
    assert row["reason"] == "invalid_row: x.jsonl:1: column 'body' holds a int, not a text"


def test_a_missing_source_is_a_configuration_error_before_anything_runs(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        expand_paths(SourceConfig(kind="jsonl", path=str(tmp_path / "nope.jsonl")))
    with pytest.raises(FileNotFoundError, match="no files match"):
        expand_paths(SourceConfig(kind="csv", path=str(tmp_path / "*.csv")))
    (tmp_path / "a.csv").write_text("text\nx\n")
    (tmp_path / "b.csv").write_text("text\ny\n")
    assert len(expand_paths(SourceConfig(kind="csv", path=str(tmp_path / "*.csv")))) == 2


def test_source_columns_are_checked_when_the_config_is_read():
    with pytest.raises(ValidationError, match="an images source has no columns"):
        SourceConfig(kind="images", path="photos", id_column="id")
    with pytest.raises(ValidationError, match="may not name the table's own columns"):
        SourceConfig(kind="jsonl", path="x.jsonl", keep_columns=["vector"])
    with pytest.raises(ValidationError, match="keep_types names columns that are not in keep_columns"):
        SourceConfig(kind="jsonl", path="x.jsonl", keep_types={"year": "int64"})


def test_a_malformed_json_line_is_reported_with_its_line_and_column(tmp_path):
    import io

    from pipelines.readers import _jsonl_rows

    path = str(tmp_path / "x.jsonl")
    lines = '{"text": "fine"}\n{"text": "a\tb"}\n{"text": "unterminated\n{not json\n'
    rows = list(_jsonl_rows(SourceConfig(kind="jsonl", path=path), io.StringIO(lines), path))
    reasons = [row["reason"] for row in rows[1:]]
    assert reasons == [
        f"invalid_json: {path}:2: not valid JSON: invalid control character at line 2, column 12",
        f"invalid_json: {path}:3: not valid JSON: unterminated string starting at line 3, column 10",
        f"invalid_json: {path}:4: not valid JSON: expecting property name enclosed in double quotes "
        "at line 4, column 2",
    ]
