"""`vlm-embed rerank`: score documents against a query with a Qwen3-VL-Reranker and print them best first."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pipelines.config import RerankerConfig
from pipelines.config_flags import add_config_flags, config_from_flags

EXIT_ITEM_ERRORS = 1
EXIT_USAGE = 2

DESCRIPTION = """\
Score each document's relevance to the query with a Qwen3-VL-Reranker (the official recipe: a cross-encoder
reading the instruction, the query and the document together; the score is P("yes") against P("no") as the
next token, in [0, 1]) and print the documents best first: rank, score, index, document.

Documents are numbered in this order: each DOC given after the query, then the lines of --documents (a JSON
string, or an object with "text" and/or "image": a file path relative to the JSONL file, and optionally an
"id", which is printed). A bad document is reported on stderr ("document 3: ...") and the exit status is 1;
the others are still scored.

examples:
  vlm-embed rerank "a red car" "a red car on a road" "three apples" --model tiny-reranker
  vlm-embed rerank --query-image photo.jpg --documents candidates.jsonl --top-n 5 --json
  vlm-embed rerank "what is shown?" --documents pages.jsonl --model Qwen/Qwen3-VL-Reranker-2B
"""


def add_rerank_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("query", nargs="?", metavar="QUERY", help="the query text")
    parser.add_argument("documents", nargs="*", metavar="DOC", help="documents (texts)")
    parser.add_argument(
        "--query-image", metavar="FILE", help="a query image (with QUERY: a text+image query)"
    )
    parser.add_argument(
        "--documents", dest="documents_file", type=Path, metavar="DOCS.JSONL", help="documents"
    )
    parser.add_argument("--top-n", type=int, metavar="N", help="print only the best N (default: all)")
    parser.add_argument("--json", action="store_true", help="one JSON object per document instead of columns")
    add_config_flags(parser, RerankerConfig)


def run_rerank_command(args: argparse.Namespace) -> int:
    from pipelines.cli import BadLine, CliError, read_jsonl_items
    from pipelines.reranker import Reranker

    query: dict[str, Any] = {}
    if args.query is not None:
        query["text"] = args.query
    if args.query_image is not None:
        query["image"] = args.query_image
    if not query:
        raise CliError("no query: give QUERY and/or --query-image FILE")
    documents = list(args.documents)
    if args.documents_file is not None:
        documents += read_jsonl_items(args.documents_file, "--documents")
    if not documents:
        raise CliError("no documents: give DOCs after the query or --documents DOCS.JSONL")
    if args.top_n is not None and args.top_n < 1:
        raise CliError("--top-n must be at least 1")
    from pipelines.items import ItemError

    ids = {i: d.pop("id") for i, d in enumerate(documents) if isinstance(d, dict) and "id" in d}
    bad = {i: d.message for i, d in enumerate(documents) if isinstance(d, BadLine)}
    good = [i for i in range(len(documents)) if i not in bad]
    reranker = Reranker.from_config(config_from_flags(args, RerankerConfig))
    try:
        result = reranker.try_score(query, [documents[i] for i in good])
    except ItemError as exc:
        raise CliError(f"the query: {exc.reason}") from exc
    errors = {**bad, **{good[e.index]: e.reason for e in result.errors}}
    indices = [good[i] for i in result.indices]
    scored = sorted(zip(indices, result.scores.tolist(), strict=True), key=lambda p: (-p[1], p[0]))
    for rank, (index, score) in enumerate(scored[: args.top_n or len(scored)], start=1):
        document = documents[index]
        shown = document if isinstance(document, str) else document.get("text") or document.get("image")
        if args.json:
            record = {
                "rank": rank,
                "index": index,
                "score": score,
                **({"id": ids[index]} if index in ids else {}),
            }
            print(json.dumps({**record, "document": document}))
        else:
            print(f"{rank}\t{score:.4f}\t{ids.get(index, index)}\t{shown}")
    for index in sorted(errors):
        print(f"error: document {index}: {errors[index]}", file=sys.stderr)
    return EXIT_ITEM_ERRORS if errors else 0
