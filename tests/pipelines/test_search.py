"""Search embeds the query with the table's recorded configuration and finds a row's own content first."""

import pytest

from pipelines.cli import main
from pipelines.config import EmbedderConfig, TableConfig
from pipelines.search import search
from pipelines.table import TableConfigMismatch
from tests.conftest import make_image
from tests.pipelines.sink_rows import write_rows

TEXTS = {"t-red": "a red circle on white", "t-blue": "a blue square on white", "t-sky": "the sky at night"}


@pytest.fixture(scope="module")
def table(tmp_path_factory, embedder):
    """A small table written through the backfill's sink with the embedder's own vectors."""
    folder = tmp_path_factory.mktemp("search")
    image = folder / "stripes.png"
    make_image(11, (64, 64)).save(image)
    items = {
        **TEXTS,
        "i-stripes": {"image": str(image)},
        "p-stripes": {"text": "stripes", "image": str(image)},
    }
    vectors = embedder.embed_batch(list(items.values()))
    config = TableConfig(uri=str(folder / "db"))
    write_rows(
        config,
        embedder.config,
        vectors,
        {
            "id": list(items),
            "text": [v if isinstance(v, str) else v.get("text") for v in items.values()],
            "image_uri": [None if isinstance(v, str) else v["image"] for v in items.values()],
            "kept": [None] * len(items),
            "modality": ["text"] * 3 + ["image", "text+image"],
        },
    )
    return config, image


def test_an_exact_text_finds_its_own_row_first(table):
    config, _ = table
    for row_id, text in TEXTS.items():
        rows = search(config, text, top_k=2)
        assert rows[0]["id"] == row_id and rows[0]["score"] == pytest.approx(1.0, abs=1e-5)
        assert rows[0]["score"] > rows[1]["score"] and rows[0]["text"] == text


def test_an_image_query_and_a_pair_query_find_their_rows(table, embedder):
    config, image = table
    assert search(config, image=str(image), top_k=1, embedder=embedder)[0]["id"] == "i-stripes"
    assert search(config, "stripes", str(image), top_k=1, embedder=embedder)[0]["id"] == "p-stripes"
    only_images = search(config, "stripes", top_k=5, where="modality = 'image'", embedder=embedder)
    assert [r["id"] for r in only_images] == ["i-stripes"]


def test_a_query_embedder_with_another_configuration_is_refused(table, tiny_model_dir):
    from pipelines.embedder import Embedder

    config, _ = table
    other = Embedder.from_config(EmbedderConfig(model=str(tiny_model_dir), pooling="last", device="cpu"))
    with pytest.raises(TableConfigMismatch, match="pooling: table has 'mean', asked for 'last'"):
        search(config, "anything", embedder=other)


def test_the_command_prints_rank_score_id_and_text(table, capsys):
    config, _ = table
    assert main(["search", "the sky at night", "--table", config.uri, "--top-k", "2", "--device", "cpu"]) == 0
    first, second = capsys.readouterr().out.strip().splitlines()
    rank, score, row_id, text = first.split("\t")
    assert (rank, row_id, text) == ("1", "t-sky", "the sky at night") and float(score) == pytest.approx(
        1, abs=1e-4
    )
    assert second.startswith("2\t")


def test_the_command_reports_a_missing_table_or_an_empty_query_clearly(tmp_path, capsys):
    assert main(["search", "x", "--table", str(tmp_path / "nothing-here")]) == 2
    assert "search: error: no table 'vectors' at" in capsys.readouterr().err
    assert main(["search", "--table", str(tmp_path)]) == 2
    assert "nothing to search for" in capsys.readouterr().err


@pytest.fixture(scope="module")
def embedding_table(tmp_path_factory, tiny_embedding_dir):
    """A qwen3-vl-embedding table (documents embedded with the document instruction) and its embedder."""
    from pipelines.embedder import Embedder

    embedder = Embedder.load(str(tiny_embedding_dir), device="cpu", dtype="float32")
    assert embedder.config.recipe == "qwen3-vl-embedding"  # picked by recipe: auto from the name
    texts = list(TEXTS.values())
    vectors = embedder.embed_batch(texts)
    n = len(texts)
    config = TableConfig(uri=str(tmp_path_factory.mktemp("embedding-search") / "db"))
    write_rows(
        config,
        embedder.config,
        vectors,
        {
            "id": list(TEXTS),
            "text": texts,
            "image_uri": [None] * n,
            "kept": [None] * n,
            "modality": ["text"] * n,
        },
    )
    return config, embedder


def test_search_embeds_the_query_with_the_official_query_instruction(embedding_table, tiny_embedding_dir):
    """The score of each row is the official query vector against the official document vector."""
    from tests.pipelines import official

    config, embedder = embedding_table
    reference = official.embedding_reference(tiny_embedding_dir)
    query = "the sky at night"
    conversations = [official.embedding_conversation(query, None, official.QUERY_INSTRUCTION)]
    conversations += [official.embedding_conversation(text) for text in TEXTS.values()]
    vectors = reference(conversations)
    expected = dict(zip(TEXTS, vectors[1:] @ vectors[0], strict=True))
    rows = search(config, query, top_k=3, embedder=embedder)
    assert {row["id"]: pytest.approx(float(expected[row["id"]]), abs=1e-5) for row in rows} == {
        row["id"]: row["score"] for row in rows
    }
    assert rows[0]["score"] < 0.9999  # a query is not embedded like the document with the same text


@pytest.fixture(scope="module")
def reranker(tiny_reranker_dir):
    from pipelines.reranker import Reranker

    return Reranker.load(str(tiny_reranker_dir), device="cpu", dtype="float32")


def test_search_with_a_reranker_orders_the_candidates_by_its_score(table, reranker):
    config, image = table
    plain = search(config, "a red circle", top_k=5)
    rows = search(config, "a red circle", top_k=3, reranker=reranker, rerank_candidates=5)
    documents = [
        {k: v for k, v in (("text", row["text"]), ("image", row["image_uri"])) if v is not None}
        for row in plain
    ]
    expected = dict(
        zip([row["id"] for row in plain], reranker.score({"text": "a red circle"}, documents), strict=True)
    )
    assert [row["id"] for row in rows] == sorted(expected, key=lambda i: -expected[i])[:3]
    assert [row["rerank_score"] for row in rows] == pytest.approx(
        [expected[row["id"]] for row in rows], abs=1e-6
    )
    cosine = {row["id"]: row["score"] for row in plain}
    assert all(row["score"] == pytest.approx(cosine[row["id"]]) for row in rows)  # the cosine score is kept


def test_the_command_reranks_with_rerank_and_prints_both_scores(table, tiny_reranker_dir, capsys):
    config, _ = table
    argv = ["search", "the sky at night", "--table", config.uri, "--top-k", "2", "--device", "cpu"]
    assert main([*argv, "--rerank", str(tiny_reranker_dir), "--rerank-candidates", "4"]) == 0
    lines = [line.split("\t") for line in capsys.readouterr().out.strip().splitlines()]
    assert len(lines) == 2 and all(len(line) == 5 for line in lines)
    assert float(lines[0][1]) >= float(lines[1][1])  # rank, rerank score, cosine, id, text
    assert main([*argv, "--rerank", str(tiny_reranker_dir), "--rerank-candidates", "0"]) == 2


def test_a_bad_filter_is_refused_before_any_model_is_loaded(tmp_path):
    from pipelines.filters import FilterError
    from pipelines.table import connect, vectors_schema

    config = TableConfig(uri=str(tmp_path / "db"))
    recorded = EmbedderConfig(model=str(tmp_path / "no-such-model"))  # loading it would fail
    connect(config).create_table(config.name, schema=vectors_schema(recorded, 4))
    with pytest.raises(FilterError, match="more than one SQL statement"):
        search(config, "anything", where="modality = 'image'; DROP TABLE vectors")
