"""Search filters are exactly one boolean expression over the table's columns, or refused before LanceDB reads
them (LanceDB itself keeps the first expression of a string and silently drops the rest)."""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.cli import main
from pipelines.config import TableConfig
from pipelines.filters import FilterError, check_filter
from pipelines.table import connect, search_table, vectors_schema

COLUMNS = ["id", "modality", "text", "image_uri", "vector", "Year", "my col", "tags"]

GOOD = [
    "modality = 'image'",
    "modality = 'a;b' AND text LIKE '%--%'",  # ; and -- inside strings are text
    "text LIKE 'a%' AND NOT (Year > 3 OR Year IS NULL)",
    "year IN (1, 2, 3)",  # unquoted names match regardless of case, as in LanceDB
    "Year BETWEEN 1 AND 3",
    "`my col` = 'x'",
    "\"my col\" = 'x'",
    "array_has_any(tags, ['a'])",
    "regexp_like(text, 'a.*')",
    "CAST(Year AS BIGINT) >= 2",
    "text ILIKE 'A%' OR text NOT LIKE 'b%'",
    "Year IS NOT NULL",
    "TRUE",
    "modality = 'it''s'",
]


@pytest.mark.parametrize("where", GOOD)
def test_one_condition_over_the_columns_is_passed_on_as_written(where):
    assert check_filter(where, COLUMNS) == where


BAD = [
    # (the filter, words of the message)
    ("modality = 'image'; DROP TABLE vectors", "more than one SQL statement"),
    ("1=1; SELECT * FROM vectors", "more than one SQL statement"),
    ("modality = 'image';", "more than one SQL statement"),
    ("modality = 'image' garbage", "'garbage' after its condition"),
    ("modality = 'image' AS x", "'x' after its condition"),
    ("modality = 'image' -- and the rest", "comment"),
    ("modality = 'image' /* hidden */ OR TRUE", "comment"),
    ("modality = 'text' OR", "not valid SQL"),
    ("modality = 'unterminated", "not valid SQL"),
    ("modality", r"not a condition \(it is the column modality\)"),
    ("1", r"not a condition \(it is a number\)"),
    ("'image'", r"not a condition \(it is a string\)"),
    ("Year + 1", "not a condition"),
    ("(SELECT 1) = 1", "subquery"),
    ("id IN (SELECT id FROM errors)", "subquery"),
    ("no_such_column = 1", "names column 'no_such_column', which the table does not have"),
    ('modality = "image"', "names column 'image'.*single quotes"),
    ('"YEAR" = 1', "names column 'YEAR'"),  # a quoted name is exact
    ("other.modality = 'x'", "names column 'other'"),
    ("", "empty"),
    ("   ", "empty"),
]


@pytest.mark.parametrize(("where", "words"), BAD, ids=[case[0] or "(empty)" for case in BAD])
def test_anything_else_is_refused_with_a_message_naming_the_filter(where, words):
    with pytest.raises(FilterError, match=words) as caught:
        check_filter(where, COLUMNS)
    assert str(caught.value).startswith("filter")
    assert isinstance(caught.value, ValueError)  # callers that catch ValueError keep working


@pytest.fixture
def table(tmp_path):
    """A real LanceDB table: 2 texts and 2 images."""
    db = connect(TableConfig(uri=str(tmp_path / "db")))
    rng = np.random.default_rng(0)
    return db.create_table(
        "vectors",
        pa.table(
            {
                "id": ["t1", "t2", "i1", "i2"],
                "modality": ["text", "text", "image", "image"],
                "text": ["a", "b", None, None],
                "image_uri": [None, None, "1.png", "2.png"],
                "vector": pa.FixedSizeListArray.from_arrays(pa.array(rng.random(16, np.float32)), 4),
            }
        ),
    )


def test_search_refuses_what_lancedb_would_silently_cut_short(table):
    query = np.ones(4, np.float32)
    assert sorted(r["id"] for r in search_table(table, query, 10, "modality = 'image'")) == ["i1", "i2"]
    for where in ("modality = 'image'; DROP TABLE vectors", "modality = 'image' garbage", "1=1; anything"):
        with pytest.raises(FilterError):
            search_table(table, query, 10, where)
    assert table.count_rows() == 4


def test_the_search_command_refuses_a_bad_where_with_exit_2_and_names_the_filter(tmp_path, embedder, capsys):
    config = TableConfig(uri=str(tmp_path / "db"))
    dimension = embedder.get_embedding_dimension()
    created = connect(config).create_table(
        config.name, schema=vectors_schema(embedder.config, dimension), mode="overwrite"
    )
    created.add(
        [{"id": "a", "modality": "text", "text": "a", "image_uri": None, "vector": [0.5] * dimension}]
    )
    args = ["search", "x", "--table", config.uri, "--device", "cpu", "--where"]
    assert main([*args, "modality = 'text'"]) == 0
    capsys.readouterr()
    assert main([*args, "modality = 'text'; DROP TABLE vectors"]) == 2
    err = capsys.readouterr().err
    assert "search: error: filter " in err and "more than one SQL statement" in err


SQL_WORDS = [
    "modality",
    "Year",
    "`my col`",
    "'image'",
    "=",
    "<>",
    "AND",
    "OR",
    "NOT",
    "(",
    ")",
    ";",
    "--",
    "/*",
    "*/",
    "IN",
    "LIKE",
    "IS",
    "NULL",
    "1",
    "'",
    '"',
    "SELECT",
    "DROP",
    "TABLE",
    ",",
    "garbage",
    "TRUE",
]


@settings(max_examples=300, deadline=None, database=None)
@given(
    st.text(max_size=60)
    | st.lists(st.sampled_from(SQL_WORDS), max_size=10).map(" ".join)
    | st.sampled_from(GOOD).flatmap(lambda good: st.sampled_from(SQL_WORDS).map(lambda w: f"{good} {w}"))
)
def test_any_string_is_passed_on_unchanged_or_refused_with_a_filter_error(where):
    try:
        checked = check_filter(where, COLUMNS)
    except FilterError as exc:
        assert str(exc).startswith("filter")
        return
    # a ';' may only be text inside a string literal ('a;b', with '' for a quote), never between statements
    assert checked == where and ";" not in re.sub(r"'(?:[^']|'')*'", "", where)
