"""`vlm-embed search`: embed a text and/or image query the way the table was embedded, and print the nearest rows.

The embedder is built from the configuration the table records (`pipelines.table.recorded_embedder_config`),
so a query always goes through the same model, recipe, pooling, layer and dimension as the corpus; only
runtime options (device, dtype) may differ. Queries are embedded with the recipe's query instruction (the
table records it; qwen3-vl-embedding: "Retrieve images or text relevant to the user's query."), documents
were embedded with the document one; `--instruction` replaces the query instruction for one search.
"""

from __future__ import annotations

import argparse
import json
import sys
import typing
from typing import Any

from pipelines.config import DEFAULT_TABLE_NAME, DType, RerankerConfig, TableConfig
from pipelines.rerank_search import DEFAULT_CANDIDATES, candidates_for
from pipelines.table_query import SEARCH_MODES, SearchMode

EXIT_USAGE = 2

DESCRIPTION = """\
Search a vectors table made by `vlm-embed backfill`: embed the query (TEXT, --image FILE, or both for a
text+image query) with the table's recorded embedder configuration, and print the top-k rows by cosine
similarity: rank, score, id, and the row's text (or its image path).

With --rerank MODEL the vector search's first --rerank-candidates rows are scored again by a Qwen3-VL-Reranker
(a cross-encoder that reads query and row together) and the best --top-k are printed by that score.

examples:
  vlm-embed search "a red circle" --table ./data/lancedb --top-k 3
  vlm-embed search "a red circle" --rerank tiny-reranker --rerank-candidates 20 --top-k 3
  vlm-embed search --image photo.png --table ./data/lancedb
  vlm-embed search "shapes" --where "modality = 'text'" --json
  vlm-embed search "red circle" --mode hybrid --top-k 3
  vlm-embed search "red circle" --mode text

--mode text searches the full-text index the backfill builds on the rows' text (BM25 scores); --mode hybrid
runs the vector and full-text searches and fuses them with LanceDB's reciprocal-rank-fusion reranker (the
printed score is then the fused one). A table made by `vlm-embed reduce` is searched the same way: the query is
projected with the table's stored PCA and compared with its float16 or int8 vectors.
"""


def search(
    table_config: TableConfig,
    text: str | None = None,
    image: Any = None,
    *,
    top_k: int = 10,
    where: str | None = None,
    mode: SearchMode = "vector",
    instruction: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    embedder=None,
    reranker=None,
    rerank_candidates: int | None = None,
    rerank_instruction: str | None = None,
    columns: list[str] | None = None,
) -> list[dict[str, Any]]:
    """The `top_k` best rows for the query, as dicts with id, score, modality, text and image_uri (and the
    extra `columns`).

    `mode`: `vector` (cosine `score`), `text` (LanceDB full-text search on `text`, BM25 `score`, no model
    loaded) or `hybrid` (both, fused by LanceDB's RRF reranker: `score` is the fused relevance,
    `vector_score` the cosine); text and hybrid need a query text, and text takes no image
    (`SearchModeError`). `embedder`: an already loaded `Embedder` to reuse (checked against the table);
    default: one built from the table's recorded configuration. `reranker` (a `pipelines.reranker.Reranker`):
    the search's first `rerank_candidates` rows (default 50) are reranked by it and the best `top_k`
    returned, each with its `rerank_score` (`pipelines.rerank_search`). Reduced (PCA) tables get their query
    projected, int8 tables are decoded (`pipelines.table_query`)."""
    from pipelines.backends import load_embedder
    from pipelines.table import check_matches, open_vectors_table, recorded_embedder_config, search_table
    from pipelines.table_query import check_mode, needs_vector

    if text is None and image is None:
        raise ValueError("nothing to search for: give a text and/or an image")
    check_mode(mode, text, image)
    table = open_vectors_table(table_config)
    if where:  # a bad filter is refused before a model is loaded or a query embedded
        from pipelines.filters import check_filter

        check_filter(where, table.schema.names)
    item: dict[str, Any] = {}
    if text is not None:
        item["text"] = text
    if image is not None:
        item["image"] = image
    vector = None
    if needs_vector(mode):
        if embedder is None:
            embedder = load_embedder(recorded_embedder_config(table, device=device, dtype=dtype))
        check_matches(table, embedder.config, embedder.get_embedding_dimension())
        query = {**item, "instruction": instruction} if instruction is not None else item
        vector = embedder.embed_queries([query])[0]
    limit = top_k if reranker is None else candidates_for(top_k, rerank_candidates)
    rows = search_table(table, vector, top_k=limit, where=where, columns=columns, mode=mode, text=text)
    if reranker is None:
        return rows
    from pipelines.rerank_search import rerank_rows

    return rerank_rows(reranker, item, rows, top_k, rerank_instruction)


def retrieve_context(
    query: str | dict[str, Any] | None = None,
    top_k: int = 5,
    filter: str | None = None,
    mode: SearchMode = "vector",
    *,
    image: Any = None,
    table: TableConfig | str = "./data/lancedb",
    name: str = DEFAULT_TABLE_NAME,
    embedder=None,
    reranker=None,
    instruction: str | None = None,
    device: str | None = None,
) -> list[dict[str, Any]]:
    """The RAG entry point: the `top_k` rows of a vectors table that best match `query`, to put into a
    prompt.

    `query`: a text, or an item `{"text": ..., "image": ...}` (an image: a path, bytes or a PIL image), or
    None with `image=`. `filter`: one SQL condition on the table's columns. `mode`: vector, text (full-text
    only) or hybrid (`search`). `table`: a `TableConfig`, or a LanceDB URI with the table `name`.
    `embedder`: an already loaded embedder (e.g. the one that also generates answers), reused; default: one
    loaded from the table's recorded configuration. Returns dicts, best first, each with `score`, `id`,
    `text`, `image_uri`, `modality` and every kept column of the table (the vector itself left out)."""
    from pipelines.table import BASE_COLUMNS, open_vectors_table

    text = query
    if isinstance(query, dict):
        unknown = set(query) - {"text", "image"}
        if unknown:
            raise ValueError(f"a query item has only 'text' and 'image', not {sorted(unknown)}")
        text, image = query.get("text"), query.get("image", image)
    elif query is not None and not isinstance(query, str):
        raise TypeError(f"query must be a text or a {{text, image}} item, not {type(query).__name__}")
    config = table if isinstance(table, TableConfig) else TableConfig(uri=table, name=name)
    kept = [c for c in open_vectors_table(config).schema.names if c not in BASE_COLUMNS]
    return search(
        config,
        text,
        image,
        top_k=top_k,
        where=filter,
        mode=mode,
        instruction=instruction,
        device=device,
        embedder=embedder,
        reranker=reranker,
        columns=kept,
    )


def add_search_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("text", nargs="?", metavar="TEXT", help="the query text")
    parser.add_argument("--image", metavar="FILE", help="a query image (with TEXT: a text+image query)")
    parser.add_argument(
        "--table", default="./data/lancedb", metavar="URI", help="the LanceDB (default: %(default)s)"
    )
    parser.add_argument(
        "--name", default=DEFAULT_TABLE_NAME, help="the vectors table's name (default: %(default)s)"
    )
    parser.add_argument(
        "--top-k", type=int, default=10, metavar="K", help="rows to return (default: %(default)s)"
    )
    parser.add_argument(
        "--where", metavar="SQL", help="a filter on the table's columns, e.g. \"modality = 'image'\""
    )
    parser.add_argument(
        "--mode",
        choices=list(SEARCH_MODES),
        default="vector",
        help="vector: cosine similarity of the embedded query (the default); text: the full-text index on "
        "the rows' text only (BM25; no model is loaded); hybrid: both, fused by LanceDB's reciprocal rank "
        "fusion (the score printed is then the fused one). text and hybrid need TEXT",
    )
    parser.add_argument(
        "--instruction",
        help="the query's instruction, instead of the one the table records (recipes that take one, e.g. "
        "qwen3-vl-embedding)",
    )
    parser.add_argument("--device", help="where to run the query embedder (default: auto)")
    parser.add_argument("--dtype", choices=list(typing.get_args(DType)), help="its precision")
    parser.add_argument(
        "--rerank",
        metavar="MODEL",
        help="rerank the vector search's candidates with this Qwen3-VL-Reranker checkpoint (a hub id such as "
        "Qwen/Qwen3-VL-Reranker-2B, a directory, or tiny-reranker); rows are then printed as rank, rerank "
        "score, cosine score, id, text",
    )
    parser.add_argument(
        "--rerank-candidates",
        type=int,
        metavar="N",
        help=f"rows the vector search hands to the reranker (default: {DEFAULT_CANDIDATES}, at least --top-k)",
    )
    parser.add_argument("--rerank-instruction", metavar="TEXT", help="the reranker's instruction")
    parser.add_argument("--json", action="store_true", help="one JSON object per row instead of columns")


def run_search_command(args: argparse.Namespace) -> int:
    from pipelines.loading import ModelLoadError
    from pipelines.table import TableConfigMismatch, TableNotFound

    if args.top_k < 1:
        print("search: error: --top-k must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    if args.rerank_candidates is not None and args.rerank_candidates < 1:
        print("search: error: --rerank-candidates must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    try:
        reranker = None
        if args.rerank:
            from pipelines.reranker import Reranker

            reranker = Reranker.from_config(RerankerConfig(model=args.rerank, device=args.device or "auto"))
        rows = search(
            TableConfig(uri=args.table, name=args.name),
            args.text,
            args.image,
            top_k=args.top_k,
            where=args.where,
            mode=args.mode,
            instruction=args.instruction,
            device=args.device,
            dtype=args.dtype,
            reranker=reranker,
            rerank_candidates=args.rerank_candidates,
            rerank_instruction=args.rerank_instruction,
        )
    except (TableNotFound, TableConfigMismatch, ModelLoadError, ValueError) as exc:
        print(f"search: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    for rank, row in enumerate(rows, start=1):
        if args.json:
            print(json.dumps({"rank": rank, **row}))
        else:
            shown = row["text"] if row["text"] is not None else row["image_uri"]
            if reranker is None:
                print(f"{rank}\t{row['score']:.4f}\t{row['id']}\t{shown}")
            else:
                rerank = "-" if row["rerank_score"] is None else f"{row['rerank_score']:.4f}"
                print(f"{rank}\t{rerank}\t{row['score']:.4f}\t{row['id']}\t{shown}")
    if not rows:
        print("no rows (is the table empty?)", file=sys.stderr)
    return 0
