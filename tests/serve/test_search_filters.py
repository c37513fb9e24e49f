"""A /search filter is exactly one condition on the table's columns, or a 422 naming `filter`: LanceDB alone
would keep its first expression and silently drop the rest."""

from __future__ import annotations

import pytest

from tests.serve.test_search import search, write_table


@pytest.fixture
def table(table_uri, embedder):
    return write_table(table_uri, embedder)


@pytest.mark.parametrize(
    ("where", "words"),
    [
        ("modality = 'image'; DROP TABLE vectors", "more than one SQL statement"),
        ("1=1; DELETE FROM vectors", "more than one SQL statement"),
        ("modality = 'image' garbage", "'garbage' after its condition"),
        ("modality = 'image' -- the rest", "comment"),
        ("lang", "not a condition"),
        ("nope = 1", "names column 'nope'"),
        ("lang = ", "not valid SQL"),
    ],
)
def test_a_filter_that_is_not_one_condition_is_422_naming_the_filter(client, table, where, words):
    response = search(client, text="a red circle", top_k=5, filter=where)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == ("filter", "invalid_filter")
    assert words in error["message"] and where in error["message"]


def test_a_good_filter_still_filters_and_the_table_is_untouched(client, table):
    bad = search(client, text="a red circle", filter="modality = 'image'; DROP TABLE vectors")
    assert bad.status_code == 422
    images = search(client, text="a red circle", top_k=10, filter="modality = 'image'")
    assert images.status_code == 200, images.text
    assert [row["id"] for row in images.json()["data"]] == ["i-1"]
    everything = search(client, text="a red circle", top_k=10)
    assert len(everything.json()["data"]) == 5
