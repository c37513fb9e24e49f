"""The table upkeep after a backfill (run in a Ray worker, not the driver): compaction bounds the fragments,
and the vector and full-text indexes cover the rows of the first run and of an incremental run after it."""

import json
import re

import pytest

from pipelines.backfill import run_backfill
from pipelines.config import Config, EmbedderConfig, ResourcesConfig, SourceConfig, TableConfig
from pipelines.table import connect

FIRST, LATER = 320, 60  # rows; PQ training wants 256 vectors


def write_texts(path, prefix, count):
    """`count` texts, each with a word found nowhere else (`<prefix>word<n>`) to find it by full-text search."""
    lines = [
        json.dumps({"id": f"{prefix}{n}", "text": f"the {prefix}word{n} of row {n}"}) for n in range(count)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def job(tiny_model_dir, uri, paths) -> Config:
    sources = [SourceConfig(kind="jsonl", path=str(p), id_column="id") for p in paths]
    return Config(
        embedder=EmbedderConfig(model=str(tiny_model_dir), backend="stand-in"),
        sources=sources,
        # a few small commits (a unit per ~2 KB of JSONL), so that there are fragments to compact
        table=TableConfig(uri=str(uri), commit_rows=110, unit_bytes=2048, vector_index_min_rows=FIRST),
        resources=ResourcesConfig(batch_rows=16, prepare_batch_rows=16),
    )


def fragments(table) -> int:
    return len(table.to_lance().get_fragments())


def unindexed(table, column: str) -> int:
    name = next(i.name for i in table.list_indices() if column in i.columns)
    return table.index_stats(name).num_unindexed_rows


def text_hits(table, word: str) -> list[str]:
    return table.search(word, query_type="fts").select(["id"]).limit(5).to_arrow()["id"].to_pylist()


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory, ray_session):
    root = tmp_path_factory.mktemp("upkeep")
    first = write_texts(root / "first.jsonl", "a", FIRST)
    later = write_texts(root / "later.jsonl", "b", LATER)
    config = job(tiny_model_dir, root / "db", [first])
    summary = run_backfill(config)
    vectors = connect(config.table).open_table("vectors")
    after_first = {"fragments": fragments(vectors), "unindexed": unindexed(vectors, "vector")}
    again = run_backfill(job(tiny_model_dir, root / "db", [first, later]))
    vectors.checkout_latest()
    return summary, after_first, again, vectors


def test_a_run_compacts_its_commits_fragments_and_says_so(runs):
    summary, after_first, _, _ = runs
    before, after = map(int, re.search(r"compacted (\d+) -> (\d+) fragments", summary.upkeep).groups())
    assert before >= 3 and after == after_first["fragments"] <= 2


def test_the_vector_index_is_built_once_the_table_is_big_enough_and_covers_every_row(runs):
    summary, after_first, _, _ = runs
    assert f"built a cosine IVF_PQ index over {FIRST} vectors" in summary.upkeep
    assert "vector" in summary.indexes and after_first["unindexed"] == 0


def test_an_incremental_run_brings_both_indexes_over_its_new_rows(runs):
    _, _, again, vectors = runs
    assert again.embedded == LATER and again.already_done == FIRST
    assert "indexes updated" in again.upkeep and "built" not in again.upkeep  # updated, not rebuilt
    assert unindexed(vectors, "vector") == 0 and unindexed(vectors, "text") == 0
    assert text_hits(vectors, f"bword{LATER - 1}") == [f"b{LATER - 1}"]
    assert text_hits(vectors, "aword7") == ["a7"]
    assert fragments(vectors) <= 2
