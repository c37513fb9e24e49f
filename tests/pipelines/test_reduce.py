"""vlm-embed reduce: PCA and Matryoshka tables, float16 and int8 storage, and searches that project their queries
the way the table's vectors were projected."""

import json

import numpy as np
import pyarrow as pa
import pytest

from pipelines.cli import main
from pipelines.config import TableConfig
from pipelines.reduce import reduce_table
from pipelines.search import search
from pipelines.storage import bytes_per_vector
from pipelines.table import METADATA_KEY, connect
from tests.pipelines.sink_rows import write_rows

WORDS = ["red", "blue", "green", "circle", "square", "star", "sky", "sea", "fox", "cat", "bread", "stone"]
TEXTS = {f"t{i:02d}": f"a {WORDS[i % 12]} {WORDS[(i * 5 + 3) % 12]} number {i}" for i in range(40)}


@pytest.fixture(scope="module")
def source(tmp_path_factory, embedder):
    """40 texts written by the backfill's sink (full-text index included), and their vectors."""
    vectors = embedder.embed_batch(list(TEXTS.values()))
    n = len(TEXTS)
    config = TableConfig(uri=str(tmp_path_factory.mktemp("reduce") / "db"))
    write_rows(
        config,
        embedder.config,
        vectors,
        {
            "id": list(TEXTS),
            "text": list(TEXTS.values()),
            "image_uri": [None] * n,
            "kept": [json.dumps({"n": i}) for i in range(n)],
            "modality": ["text"] * n,
        },
        kept_types={"n": "int64"},
    )
    return config, vectors


def stored(config: TableConfig, name: str):
    table = connect(config).open_table(name)
    rows = table.to_arrow().sort_by("id")
    return table, rows, json.loads(table.schema.metadata[METADATA_KEY])


def test_pca_keeps_the_top_principal_axes_and_stores_the_projection_beside_the_table(source):
    config, vectors = source
    recorded = reduce_table(config, "pca8", 8, sample=len(TEXTS))
    table, rows, metadata = stored(config, "pca8")
    assert metadata == recorded and table.schema.field("vector").type == pa.list_(pa.float32(), 8)
    assert rows["id"].to_pylist() == sorted(TEXTS) and rows["n"].to_pylist() == list(range(40))
    reduction = metadata["reduction"]
    assert (reduction["method"], reduction["dimensions"], reduction["input_dimension"]) == ("pca", 8, 64)
    assert (
        metadata["embedder"]
        == json.loads(connect(config).open_table("vectors").schema.metadata[METADATA_KEY])["embedder"]
    )
    # the projection, read back as LanceDB stores it, against an eigen-decomposition of the covariance
    projection = connect(config).open_table("pca8__projection").to_arrow()
    mean = np.asarray(projection["mean"][0].as_py(), np.float32)
    axes = np.asarray(projection["components"][0].as_py(), np.float32).reshape(8, 64)
    np.testing.assert_allclose(mean, vectors.mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(axes @ axes.T, np.eye(8), atol=1e-5)
    eigenvalues, eigenvectors = np.linalg.eigh(np.cov(vectors.T.astype(np.float64)))
    top = eigenvectors[:, ::-1][:, :8]
    np.testing.assert_allclose(np.abs(axes @ top), np.eye(8), atol=1e-3)  # the same axes, up to sign
    assert reduction["explained_variance"] == pytest.approx(eigenvalues[::-1][:8].sum() / eigenvalues.sum())
    # every row is its vector, centred, projected and normalised again (the table's vectors are normalised)
    projected = (vectors - mean) @ axes.T
    projected /= np.linalg.norm(projected, axis=1, keepdims=True)
    np.testing.assert_allclose(np.stack(rows["vector"].to_numpy(zero_copy_only=False)), projected, atol=1e-5)


def test_a_pca_table_is_searched_with_its_query_projected_the_same_way(source, embedder, capsys):
    config, _ = source
    reduced = TableConfig(uri=config.uri, name="pca8")
    for row_id in ("t03", "t17", "t31"):
        rows = search(reduced, TEXTS[row_id], top_k=2, embedder=embedder)
        assert rows[0]["id"] == row_id and rows[0]["score"] == pytest.approx(1.0, abs=1e-5)
    hybrid = search(reduced, TEXTS["t17"], mode="hybrid", top_k=3, embedder=embedder)
    assert hybrid[0]["id"] == "t17"  # first in both legs
    argv = [
        "search",
        TEXTS["t05"],
        "--table",
        config.uri,
        "--name",
        "pca8",
        "--top-k",
        "1",
        "--device",
        "cpu",
    ]
    assert main(argv) == 0
    assert capsys.readouterr().out.split("\t")[2] == "t05"


def test_float16_and_int8_tables_store_exactly_that_many_bytes_and_still_find_each_row(source, embedder):
    config, vectors = source
    for storage in ("float16", "int8"):
        reduce_table(config, f"pca16_{storage}", 16, storage=storage, sample=len(TEXTS))
        table, rows, metadata = stored(config, f"pca16_{storage}")
        column = rows["vector"].combine_chunks()
        assert table.schema.field("vector").type == pa.list_(pa.from_numpy_dtype(np.dtype(storage)), 16)
        assert (
            column.values.nbytes
            == len(TEXTS) * bytes_per_vector(storage, 16)
            == len(TEXTS) * 16 * (2 if storage == "float16" else 1)
        )
        assert metadata["storage"]["type"] == storage
        for row_id in ("t02", "t21"):
            rows_found = search(
                TableConfig(uri=config.uri, name=f"pca16_{storage}"),
                TEXTS[row_id],
                top_k=2,
                embedder=embedder,
            )
            assert rows_found[0]["id"] == row_id and rows_found[0]["score"] > 0.99
        if storage == "int8":
            scale = np.asarray(metadata["storage"]["scale"], np.float32)
            codes = np.stack(column.to_numpy(zero_copy_only=False)).astype(np.float32)
            assert np.abs(codes).max() <= 127 and scale.shape == (16,)
            reference = reduce_table(config, "pca16_check", 16, sample=len(TEXTS))  # same sample, float32
            assert reference["reduction"]["explained_variance"] == pytest.approx(
                metadata["reduction"]["explained_variance"]
            )
            full = np.stack(stored(config, "pca16_check")[1]["vector"].to_numpy(zero_copy_only=False))
            assert np.abs(codes * scale - full).max() <= scale.max() / 2 + 1e-6  # within half a step


def test_an_int8_table_searches_hybrid_with_lancedbs_rrf(source, embedder):
    config, _ = source
    table = TableConfig(uri=config.uri, name="pca16_int8")
    query = "a fox"
    by_vector = [r["id"] for r in search(table, query, top_k=5, embedder=embedder)]
    by_text = [r["id"] for r in search(table, query, mode="text", top_k=5)]
    expected: dict[str, float] = {}
    for ranking in (by_vector, by_text):
        for rank, row_id in enumerate(ranking, start=1):
            expected[row_id] = expected.get(row_id, 0.0) + 1 / (rank + 60)
    rows = search(table, query, mode="hybrid", top_k=5, embedder=embedder)
    assert [r["score"] for r in rows] == pytest.approx(sorted(expected.values(), reverse=True)[:5])
    assert all(r["score"] == pytest.approx(expected[r["id"]]) for r in rows)
    everything = [r["id"] for r in search(table, query, top_k=40, embedder=embedder)]
    filtered = [r["id"] for r in search(table, query, top_k=5, where="n < 10", embedder=embedder)]
    assert filtered == [i for i in everything if int(i[1:]) < 10][:5]


def test_matryoshka_records_the_smaller_dimension_so_queries_are_truncated_the_same_way(source, embedder):
    config, vectors = source
    reduce_table(config, "m16", 16, method="matryoshka", storage="float16")
    table, rows, metadata = stored(config, "m16")
    assert metadata["embedder"]["dimensions"] == 16 and metadata["dimension"] == 16
    truncated = vectors[:, :16] / np.linalg.norm(vectors[:, :16], axis=1, keepdims=True)
    np.testing.assert_allclose(np.stack(rows["vector"].to_numpy(zero_copy_only=False)), truncated, atol=1e-3)
    rows_found = search(TableConfig(uri=config.uri, name="m16"), TEXTS["t09"], top_k=1)
    assert rows_found[0]["id"] == "t09" and rows_found[0]["score"] == pytest.approx(1.0, abs=2e-3)


def test_an_existing_name_is_refused_and_nothing_is_overwritten(source, capsys):
    config, _ = source
    before = connect(config).open_table("pca8").version
    with pytest.raises(FileExistsError, match="table 'pca8' already exists"):
        reduce_table(config, "pca8", 4)
    assert connect(config).open_table("pca8").version == before
    argv = ["reduce", "--table", config.uri, "--dimensions", "4", "--output-table", "vectors"]
    assert main(argv) == 2
    assert "reduce: error: table 'vectors' already exists" in capsys.readouterr().err
    assert main(["reduce", "--table", config.uri, "--dimensions", "999"]) == 2
    assert "dimensions must be between 1 and the table's vector size 64" in capsys.readouterr().err


def test_the_command_writes_a_table_and_says_what_it_costs(source, capsys):
    config, _ = source
    argv = ["reduce", "--table", config.uri, "--dimensions", "12", "--storage", "int8", "--sample", "30"]
    assert main(argv) == 0
    out = capsys.readouterr()
    assert (
        "reduce: wrote table 'vectors_pca12_int8': pca, 12 dimensions, int8, 12 bytes per vector" in out.out
    )
    assert "reduce: 40/40 rows" in out.err
    assert stored(config, "vectors_pca12_int8")[2]["reduction"]["sample_rows"] == 30
