"""What smaller vectors cost, measured with the real all-MiniLM-L6-v2 on the bundled labelled set: `vlm-embed
reduce` tables at 384 (full), 256 and 128 dimensions by PCA and Matryoshka truncation, each stored as float32,
float16 and int8, evaluated by `pipelines.eval_run.evaluate` (nDCG@10, recall, bytes per vector), and the three
search modes compared on the full table.

The bounds, stated before they were measured: float16 loses at most 0.01 nDCG@10 (and recall@10) against float32
at the same size, int8 at most 0.05; every table stays far above a shuffled ranking. PCA is fitted on the 208
passages, so it cannot keep 256 axes (refused, tested); Matryoshka truncation can. The test prints the cost
table; the figures measured here are in README (Smaller vectors, hybrid search and RAG context).
"""

from __future__ import annotations

import pyarrow as pa
import pytest

from pipelines.backends import load_embedder
from pipelines.config import TableConfig
from pipelines.eval import read_queries
from pipelines.eval_run import evaluate
from pipelines.reduce import reduce_table
from pipelines.storage import bytes_per_vector
from pipelines.table import connect, vectors_schema
from tests.minilm import PASSAGES, QUERIES, minilm_config

FLOAT16_BOUND = 0.01
INT8_BOUND = 0.05
STORAGES = ("float32", "float16", "int8")
REDUCTIONS = [("none", 384), ("matryoshka", 256), ("matryoshka", 128), ("pca", 128)]
# 12 tables of 208 rows, each searched by 69 queries: minutes on a loaded 2-core machine
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]


@pytest.fixture(scope="module")
def minilm():
    return load_embedder(minilm_config())


@pytest.fixture(scope="module")
def database(tmp_path_factory, minilm) -> TableConfig:
    """The labelled set's passages embedded by MiniLM into a vectors table with its full-text index, as the
    backfill writes one (schema, metadata, index), and every reduced table beside it."""
    import json

    passages = [json.loads(line) for line in PASSAGES.read_text().splitlines() if line.strip()]
    vectors = minilm.embed_batch([p["text"] for p in passages])
    config = TableConfig(uri=str(tmp_path_factory.mktemp("costs") / "db"))
    schema = vectors_schema(minilm.config, vectors.shape[1])
    table = connect(config).create_table(config.name, schema=schema)
    table.add(
        pa.table(
            {
                "id": [p["id"] for p in passages],
                "modality": ["text"] * len(passages),
                "text": [p["text"] for p in passages],
                "image_uri": [None] * len(passages),
                "vector": pa.array(list(vectors), pa.list_(pa.float32(), vectors.shape[1])),
            },
            schema=schema,
        )
    )
    from lancedb.index import FTS

    table.create_index("text", config=FTS())
    for method, dimensions in REDUCTIONS:
        for storage in STORAGES:
            if (method, storage) != ("none", "float32"):
                reduce_table(
                    config, name(method, dimensions, storage), dimensions, method=method, storage=storage
                )
    return config


def name(method: str, dimensions: int, storage: str) -> str:
    return "vectors" if (method, storage) == ("none", "float32") else f"{method}{dimensions}_{storage}"


@pytest.fixture(scope="module")
def costs(database, minilm) -> dict[tuple[str, int, str], dict]:
    queries = read_queries(QUERIES)
    # a Matryoshka table records its dimension: its queries come from an embedder at that dimension
    embedders = {
        (method, dimensions): load_embedder(minilm_config(dimensions=dimensions))
        if method == "matryoshka"
        else minilm
        for method, dimensions in REDUCTIONS
    }
    reports = {}
    for method, dimensions in REDUCTIONS:
        for storage in STORAGES:
            table = TableConfig(uri=database.uri, name=name(method, dimensions, storage))
            reports[method, dimensions, storage] = evaluate(
                table, queries, embedder=embedders[method, dimensions]
            )
    print("\nmethod      dims  storage  bytes  ndcg@10  recall@10  recall@1")
    for (method, dimensions, storage), report in reports.items():
        m = report["metrics"]
        print(
            f"{method:<10} {dimensions:>5}  {storage:<7} {report['bytes_per_vector']:>6}  {m['ndcg@10']:.4f}"
            f"   {m['recall@10']:.4f}    {m['recall@1']:.4f}"
        )
    return reports


def test_each_table_reports_its_exact_bytes_per_vector_dimension_and_storage(costs):
    for (method, dimensions, storage), report in costs.items():
        assert report["bytes_per_vector"] == bytes_per_vector(storage, dimensions)
        assert report["bytes_per_vector"] == dimensions * {"float32": 4, "float16": 2, "int8": 1}[storage]
        assert report["vector_dimension"] == dimensions and report["storage"] == storage
        assert report["reduction"] == (method if (method, storage) != ("none", "float32") else None)


def test_float16_loses_almost_nothing_and_int8_little_at_every_size(costs):
    for method, dimensions in REDUCTIONS:
        full = costs[method, dimensions, "float32"]["metrics"]
        for storage, bound in (("float16", FLOAT16_BOUND), ("int8", INT8_BOUND)):
            smaller = costs[method, dimensions, storage]["metrics"]
            for metric in ("ndcg@10", "recall@10"):
                assert smaller[metric] >= full[metric] - bound, (method, dimensions, storage, metric)


def test_every_reduced_table_stays_far_above_a_shuffled_ranking(costs):
    full = costs["none", 384, "float32"]
    assert full["metrics"]["ndcg@10"] > 0.75
    for report in costs.values():
        assert report["metrics"]["ndcg@10"] > 10 * report["random"]["ndcg@10"]


def test_pca_cannot_keep_more_axes_than_the_sample_has_vectors(database):
    with pytest.raises(ValueError, match="cannot fit 256 PCA dimensions on 208 sampled vectors of size 384"):
        reduce_table(database, "pca256", 256)


def test_eval_compares_the_vector_text_and_hybrid_modes(database, minilm):
    queries = read_queries(QUERIES)
    modes = {
        mode: evaluate(database, queries, mode=mode, embedder=minilm) for mode in ("vector", "text", "hybrid")
    }
    print({mode: round(report["metrics"]["ndcg@10"], 4) for mode, report in modes.items()})
    assert {report["mode"] for report in modes.values()} == {"vector", "text", "hybrid"}
    assert modes["text"]["metrics"]["ndcg@10"] > 10 * modes["text"]["random"]["ndcg@10"]
    assert modes["hybrid"]["metrics"]["ndcg@10"] > modes["text"]["metrics"]["ndcg@10"]
    rankings = {mode: [q["ranking"] for q in report["per_query"]] for mode, report in modes.items()}
    assert rankings["hybrid"] != rankings["vector"] and rankings["hybrid"] != rankings["text"]
