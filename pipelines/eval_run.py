"""Evaluating retrieval on a table: every labelled query through `pipelines.search.search`, scored by
`pipelines.eval`. The Python API of `vlm-embed eval`.

    from pipelines.eval_run import evaluate
    report = evaluate(TableConfig(uri="./data/lancedb"), "queries.jsonl", mode="vector")
    report["metrics"]["ndcg@10"], report["random"]["ndcg@10"], report["latency_ms"]["p50"]

`evaluate` searches the table exactly as a user would (the embedder the table records, its query prompt or
instruction, the `mode` and any other `search` option passed through), one query at a time, and times each
search: the latency is a query's embedding plus its search, after one untimed warm-up query. The report is a
plain JSON-able dict (what `--json` writes) with the mean metrics, the shuffled-ranking baseline over the
table's own ids (`pipelines.eval.random_baseline`), latency percentiles, the vector size and bytes per vector
of the table, and each query's ranking. `evaluate_corpus` first embeds a corpus into a temporary table with the
normal backfill (`pipelines.backfill.run_backfill`), then evaluates it.
"""

from __future__ import annotations

import inspect
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pipelines.config import Config, EmbedderConfig, ResourcesConfig, SourceConfig, TableConfig
from pipelines.eval import CUTOFF, LabelledQuery, random_baseline, read_queries, score_rankings

REPORT_FORMAT = 1
CORPUS_KINDS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".csv": "csv"}


def evaluate(
    table_config: TableConfig,
    queries: Sequence[LabelledQuery] | str | Path,
    *,
    mode: str = "vector",
    embedder: Any = None,
    label: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    baseline_seeds: Sequence[int] = range(20),
    progress: Callable[[int, int], None] | None = None,
    **search_options: Any,
) -> dict[str, Any]:
    """Recall@1/5/10, MRR@10, nDCG@10 and query latency of `queries` (labelled queries, or a JSONL file of
    them) searched in the table. `mode` and `search_options` go to `pipelines.search.search` as they are;
    `embedder`: an already loaded one to reuse (default: the table's, loaded once). `progress(done, total)`
    is called after each query."""
    from pipelines.backends import load_embedder
    from pipelines.search import search
    from pipelines.table import open_vectors_table, recorded_embedder_config, recorded_metadata

    if not isinstance(queries, Sequence) or isinstance(queries, str):
        queries = read_queries(queries)
    if not queries:
        raise ValueError("no queries to evaluate")
    table = open_vectors_table(table_config)
    metadata = recorded_metadata(table)
    rows = table.count_rows()
    corpus_ids = table.search().select(["id"]).limit(rows).to_arrow().column("id").to_pylist() if rows else []
    if not corpus_ids:
        raise ValueError(f"table {table_config.name!r} at {table_config.uri} is empty")
    options = _search_options(mode, search_options)
    if embedder is None and mode != "text":  # a full-text search embeds nothing
        embedder = load_embedder(recorded_embedder_config(table, device=device, dtype=dtype))

    def run(query: LabelledQuery) -> list[str]:
        rows = search(table_config, query.text, query.image, top_k=CUTOFF, embedder=embedder, **options)
        return [row["id"] for row in rows]

    run(queries[0])  # warm-up: the first search pays for lazy set-up, not for its query
    rankings: dict[str, list[str]] = {}
    latencies: list[float] = []
    for done, query in enumerate(queries, start=1):
        start = time.perf_counter()
        rankings[query.id] = run(query)
        latencies.append((time.perf_counter() - start) * 1000)
        if progress is not None:
            progress(done, len(queries))
    metrics, per_query = score_rankings(rankings, queries)
    known = set(corpus_ids)
    missing = sorted({doc for q in queries for doc in q.relevant if doc not in known})
    signature = metadata.get("signature", {})
    return {
        "format": REPORT_FORMAT,
        "label": label or _default_label(signature, mode, search_options, metadata),
        "table": {"uri": table_config.uri, "name": table_config.name, "rows": len(corpus_ids)},
        "mode": mode,
        "search_options": {k: v for k, v in search_options.items() if _jsonable(v)},
        "embedder": signature,
        "dimension": metadata.get("dimension"),
        "bytes_per_vector": bytes_per_vector(table),
        **vector_cost(table, metadata),
        "queries": len(queries),
        "metrics": metrics,
        "random": random_baseline(corpus_ids, queries, baseline_seeds),
        "latency_ms": latency_summary(latencies),
        "missing_relevant": missing,
        "per_query": [
            {"id": q.id, "latency_ms": round(ms, 3), "ranking": rankings[q.id], **m}
            for q, ms, m in zip(queries, latencies, per_query, strict=True)
        ],
    }


def evaluate_corpus(
    corpus: str | Path,
    embedder_config: EmbedderConfig,
    queries: Sequence[LabelledQuery] | str | Path,
    *,
    id_column: str = "id",
    text_column: str | None = None,
    workdir: str | Path | None = None,
    resources: ResourcesConfig | None = None,
    quiet: bool = True,
    **evaluate_options: Any,
) -> dict[str, Any]:
    """Embed `corpus` (a JSONL, Parquet or CSV file with ids and texts) with `embedder_config` into a table
    under `workdir` (default: a temporary directory, removed afterwards) through the normal backfill on Ray,
    then `evaluate` it; the report's `backfill` holds the backfill's summary."""
    corpus = Path(corpus)
    kind = CORPUS_KINDS.get(corpus.suffix.lower())
    if kind is None:
        raise ValueError(f"{corpus}: a corpus is a .jsonl, .parquet or .csv file")
    if not isinstance(queries, Sequence) or isinstance(queries, str):
        queries = read_queries(queries)  # a bad query file fails before anything is embedded
    with tempfile.TemporaryDirectory(prefix="vlm-embed-eval-") as scratch:
        root = Path(workdir) if workdir is not None else Path(scratch)
        table = TableConfig(uri=str(root / "lancedb"), mode="overwrite")
        source = SourceConfig(
            kind=kind, path=str(corpus.resolve()), id_column=id_column, text_column=text_column
        )
        config = Config(
            embedder=embedder_config, sources=[source], table=table, resources=resources or ResourcesConfig()
        )
        from pipelines.backfill import run_backfill

        summary = run_backfill(config, quiet=quiet)
        report = evaluate(TableConfig(uri=table.uri, name=table.name), queries, **evaluate_options)
        report["backfill"] = summary.to_dict()
        if workdir is None:
            report["table"]["uri"] = None  # gone with the temporary directory
        return report


def latency_summary(milliseconds: Sequence[float]) -> dict[str, float]:
    """Mean, median, 95th percentile and maximum of the latencies (nearest-rank percentiles)."""
    ordered = sorted(milliseconds)

    def percentile(p: float) -> float:
        return ordered[max(0, min(len(ordered) - 1, int(round(p / 100 * len(ordered) + 0.5)) - 1))]

    return {
        "mean": round(sum(ordered) / len(ordered), 3),
        "p50": round(percentile(50), 3),
        "p95": round(percentile(95), 3),
        "max": round(ordered[-1], 3),
    }


def bytes_per_vector(table) -> int | None:
    """The bytes one row's `vector` takes as stored (dimension x the value type's width)."""
    import pyarrow as pa

    try:
        kind = table.schema.field("vector").type
    except KeyError:
        return None
    if pa.types.is_fixed_size_list(kind) and kind.value_type.bit_width:
        return kind.list_size * kind.value_type.bit_width // 8
    return None


def vector_cost(table, metadata: dict[str, Any]) -> dict[str, Any]:
    """What the stored vectors are (`vlm-embed reduce`): `storage` (float32, float16 or int8),
    `vector_dimension` (the stored size; `dimension` is what the embedder computes before a PCA) and
    `reduction` (pca, matryoshka, none; None for a table as the backfill wrote it). An int8 table also stores
    one float32 scale per dimension for the whole table, not per vector."""
    from pipelines.storage import recorded_storage

    kind = table.schema.field("vector").type if "vector" in table.schema.names else None
    return {
        "storage": recorded_storage(metadata)[0],
        "vector_dimension": getattr(kind, "list_size", None),
        "reduction": (metadata.get("reduction") or {}).get("method"),
    }


def _search_options(mode: str, options: dict[str, Any]) -> dict[str, Any]:
    """The options for `search`: `mode` is passed only where `search` takes it (it always does once hybrid
    search is in; a vector search needs no mode before that)."""
    from pipelines.search import search

    if "mode" in inspect.signature(search).parameters:
        return {**options, "mode": mode}
    if mode != "vector":
        raise ValueError(f"this vlm-embed searches by vector only (mode {mode!r} was asked for)")
    return dict(options)


def _default_label(
    signature: dict[str, Any], mode: str, options: dict[str, Any], metadata: dict[str, Any] | None = None
) -> str:
    metadata = metadata or {}
    model = "/".join(Path(str(signature.get("model", "?"))).parts[-2:])
    parts = [model, mode]
    if signature.get("dimensions"):
        parts.append(f"{signature['dimensions']}d")
    reduction, storage = (metadata.get("reduction") or {}), metadata.get("storage") or {}
    if reduction.get("method") == "pca":
        parts.append(f"pca{reduction['dimensions']}")
    if storage.get("type", "float32") != "float32":
        parts.append(storage["type"])
    parts += [
        f"{k}={v}" for k, v in sorted(options.items()) if _jsonable(v) and not isinstance(v, dict | list)
    ]
    return " ".join(parts)


def _jsonable(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool | list | dict)
