"""Search in vector, text (full-text) and hybrid mode over a table the backfill's sink wrote, its full-text index
included; and retrieve_context, the RAG entry point, over the same table."""

import json

import pyarrow as pa
import pytest

from pipelines.cli import main
from pipelines.config import EmbedderConfig, TableConfig
from pipelines.search import retrieve_context, search
from pipelines.table_query import SearchModeError
from tests.conftest import make_image
from tests.pipelines.sink_rows import write_rows

TEXTS = {
    "t-fox": "the quick brown fox jumps over the lazy dog",
    "t-fox-2": "a fox hunts in the snow at dawn",
    "t-cat": "a cat sleeps on a warm windowsill",
    "t-sea": "waves crash on the rocky shore of the sea",
    "t-sky": "the night sky is full of stars",
    "t-bread": "fresh bread cools on a wooden table",
}
RRF_K = 60  # LanceDB's RRFReranker default


@pytest.fixture(scope="module")
def table(tmp_path_factory, embedder):
    """Texts, an image and a pair with a kept `year` column, written by the backfill's sink (which builds the
    full-text index on `text`)."""
    folder = tmp_path_factory.mktemp("modes")
    image = folder / "stripes.png"
    make_image(11, (64, 64)).save(image)
    items = {
        **TEXTS,
        "i-stripes": {"image": str(image)},
        "p-fox": {"text": "a fox in stripes", "image": str(image)},
    }
    vectors = embedder.embed_batch(list(items.values()))
    n = len(items)
    config = TableConfig(uri=str(folder / "db"))
    write_rows(
        config,
        embedder.config,
        vectors,
        {
            "id": list(items),
            "text": [v if isinstance(v, str) else v.get("text") for v in items.values()],
            "image_uri": [None if isinstance(v, str) else v["image"] for v in items.values()],
            "kept": [json.dumps({"year": 2000 + i}) for i in range(n)],
            "modality": ["text"] * len(TEXTS) + ["image", "text+image"],
        },
        kept_types={"year": "int64"},
    )
    return config, image


def test_text_mode_finds_the_rows_holding_the_words_and_loads_no_model(table, tmp_path):
    config, _ = table
    rows = search(config, "fox", mode="text", top_k=5)
    assert {row["id"] for row in rows} == {"t-fox", "t-fox-2", "p-fox"}
    assert all(row["score"] > 0 for row in rows) and rows == sorted(rows, key=lambda r: -r["score"])
    only_pairs = search(config, "fox", mode="text", where="modality = 'text+image'")
    assert [row["id"] for row in only_pairs] == ["p-fox"]
    # a table recorded with a model that does not exist: text mode never loads it
    from pipelines.table import connect, vectors_schema

    other = TableConfig(uri=str(tmp_path / "db"))
    recorded = EmbedderConfig(model=str(tmp_path / "no-such-model"))
    created = connect(other).create_table(other.name, schema=vectors_schema(recorded, 4))
    created.add(
        pa.table(
            {
                "id": ["x"],
                "modality": ["text"],
                "text": ["a fox"],
                "image_uri": [None],
                "vector": pa.array([[1.0, 0, 0, 0]], pa.list_(pa.float32(), 4)),
            },
            schema=created.schema,
        )
    )
    from lancedb.index import FTS

    created.create_index("text", config=FTS())
    assert [row["id"] for row in search(other, "fox", mode="text")] == ["x"]


def test_hybrid_mode_is_the_reciprocal_rank_fusion_of_the_vector_and_text_results(table, embedder):
    config, _ = table
    query, k = "a fox in the snow", 4
    by_vector = [row["id"] for row in search(config, query, top_k=k, embedder=embedder)]
    by_text = [row["id"] for row in search(config, query, mode="text", top_k=k)]
    expected: dict[str, float] = {}
    for ranking in (by_vector, by_text):
        for rank, row_id in enumerate(ranking, start=1):
            expected[row_id] = expected.get(row_id, 0.0) + 1 / (rank + RRF_K)
    rows = search(config, query, mode="hybrid", top_k=k, embedder=embedder)
    assert len(rows) == k
    assert {row["id"]: row["score"] for row in rows} == pytest.approx(
        {i: expected[i] for i in [r["id"] for r in rows]}
    )
    assert [row["score"] for row in rows] == pytest.approx(sorted(expected.values(), reverse=True)[:k])
    cosine = {row["id"]: row["score"] for row in search(config, query, top_k=10, embedder=embedder)}
    for row in rows:  # the cosine of rows the vector leg found rides along
        assert row["vector_score"] is None or row["vector_score"] == pytest.approx(
            cosine[row["id"]], abs=1e-5
        )


def test_a_pair_query_searches_hybrid_and_an_image_alone_is_refused_in_text_and_hybrid(table, embedder):
    config, image = table
    rows = search(config, "stripes", str(image), mode="hybrid", top_k=3, embedder=embedder)
    assert rows[0]["id"] in {"p-fox", "i-stripes"}
    with pytest.raises(
        SearchModeError, match="mode 'text' is a full-text search and cannot search with an image"
    ):
        search(config, "stripes", str(image), mode="text")
    with pytest.raises(
        SearchModeError, match="mode 'hybrid' needs a query text .* an image query needs mode 'vector'"
    ):
        search(config, image=str(image), mode="hybrid")
    with pytest.raises(SearchModeError, match="mode must be one of vector, text, hybrid"):
        search(config, "x", mode="semantic")


def test_text_and_hybrid_modes_name_a_missing_full_text_index(tmp_path, embedder):
    from pipelines.table import connect, vectors_schema

    config = TableConfig(uri=str(tmp_path / "db"))
    dim = embedder.get_embedding_dimension()
    created = connect(config).create_table(config.name, schema=vectors_schema(embedder.config, dim))
    created.add(
        pa.table(
            {
                "id": ["x"],
                "modality": ["text"],
                "text": ["a fox"],
                "image_uri": [None],
                "vector": pa.array([embedder.embed_text("a fox")], pa.list_(pa.float32(), dim)),
            },
            schema=created.schema,
        )
    )
    for mode in ("text", "hybrid"):
        with pytest.raises(SearchModeError, match=f"no full-text index on 'text', which mode '{mode}' needs"):
            search(config, "fox", mode=mode, embedder=embedder)
    assert search(config, "a fox", embedder=embedder)[0]["id"] == "x"


def test_the_command_takes_a_mode_and_refuses_an_image_in_text_mode(table, capsys):
    config, image = table
    argv = ["search", "fox", "--table", config.uri, "--top-k", "3", "--device", "cpu"]
    assert main([*argv, "--mode", "text"]) == 0
    lines = [line.split("\t") for line in capsys.readouterr().out.strip().splitlines()]
    assert {line[2] for line in lines} == {"t-fox", "t-fox-2", "p-fox"}
    assert main([*argv, "--mode", "hybrid"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 3
    assert main([*argv, "--mode", "text", "--image", str(image)]) == 2
    assert "search: error: mode 'text' is a full-text search" in capsys.readouterr().err


def test_retrieve_context_returns_the_rows_with_their_kept_columns(table, embedder):
    config, image = table
    rows = retrieve_context("a cat sleeps on a warm windowsill", top_k=2, table=config, embedder=embedder)
    assert len(rows) == 2 and rows[0]["id"] == "t-cat" and rows[0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert set(rows[0]) == {"score", "id", "text", "image_uri", "modality", "year"}
    assert rows[0]["text"] == TEXTS["t-cat"] and rows[0]["modality"] == "text" and rows[0]["year"] == 2002
    pictured = retrieve_context({"image": str(image)}, top_k=1, table=config.uri, embedder=embedder)
    assert pictured[0]["id"] == "i-stripes" and pictured[0]["image_uri"] == str(image)
    filtered = retrieve_context(
        "fox", top_k=5, filter="year > 2006", mode="hybrid", table=config, embedder=embedder
    )
    assert [row["id"] for row in filtered] == ["p-fox"]
    with pytest.raises(ValueError, match="a query item has only 'text' and 'image'"):
        retrieve_context({"txt": "a fox"}, table=config)


def test_retrieve_context_is_exported_lazily_from_the_package():
    import pipelines

    assert pipelines.retrieve_context is retrieve_context
