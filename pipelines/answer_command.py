"""`vlm-embed answer`: retrieve from a table, then answer with the same loaded model (`pipelines.answer`)."""

from __future__ import annotations

import argparse
import json
import sys
import typing

from pipelines.config import DEFAULT_TABLE_NAME, AnswerConfig, DType, TableConfig
from pipelines.config_flags import add_config_flags, config_from_flags

EXIT_USAGE = 2

DESCRIPTION = """\
Answer a question from a table made by `vlm-embed backfill`: embed the question with the table's recorded
embedder configuration, retrieve the --top-k nearest rows, put their texts and images into the prompt
(the checkpoint's chat template), and generate the answer with the same model, loaded once (the generation
class shares the embedder's weights). Prints the answer, then the sources it was given: rank, cosine score,
id and text (or image path).

Only Instruct (chat) checkpoints answer (Qwen/Qwen3-VL-*-Instruct, or the offline `tiny`); a table embedded
with an embedding-only checkpoint (Qwen3-VL-Embedding, tiny-embedding) or a reranker is refused (exit 2).
The tiny model's weights are random, so its answers are gibberish; the retrieval and prompt are real.

examples:
  vlm-embed answer "What shape has no corners?" --table ./data/lancedb --top-k 3 --max-new-tokens 32
  vlm-embed answer "What is in this picture?" --image photo.png --stream
  vlm-embed answer "Which texts are German?" --where "modality = 'text'" --json
"""


def add_answer_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("question", metavar="QUESTION", help="the question")
    parser.add_argument(
        "--image", metavar="FILE", help="an image the question is about (retrieval uses it too)"
    )
    parser.add_argument(
        "--table", default="./data/lancedb", metavar="URI", help="the LanceDB (default: %(default)s)"
    )
    parser.add_argument(
        "--name", default=DEFAULT_TABLE_NAME, help="the vectors table's name (default: %(default)s)"
    )
    parser.add_argument(
        "--where", metavar="SQL", help="a filter on the table's columns, e.g. \"modality = 'image'\""
    )
    parser.add_argument(
        "--mode",
        choices=["vector", "text", "hybrid"],
        default="vector",
        help="how rows are retrieved: vector (cosine, the default), text (the full-text index), hybrid (both, "
        "fused by LanceDB's RRF), as in vlm-embed search",
    )
    parser.add_argument("--stream", action="store_true", help="print the answer's tokens as they come")
    parser.add_argument("--json", action="store_true", help="print one JSON object: answer, sources, usage")
    parser.add_argument("--device", help="where to run the model (default: auto)")
    parser.add_argument("--dtype", choices=list(typing.get_args(DType)), help="its precision")
    add_config_flags(parser, AnswerConfig, skip=("max_new_tokens_limit",))


def run_answer_command(args: argparse.Namespace) -> int:
    from pipelines.answer import prepare_answer, sampling
    from pipelines.generation import GenerationUnsupported, Generator
    from pipelines.items import ItemError
    from pipelines.loading import ModelLoadError
    from pipelines.table import (
        TableConfigMismatch,
        TableNotFound,
        open_vectors_table,
        recorded_embedder_config,
    )

    try:
        config = config_from_flags(args, AnswerConfig)
        if args.json and args.stream:
            raise ValueError("--json and --stream do not go together")
        table_config = TableConfig(uri=args.table, name=args.name)
        embedder_config = recorded_embedder_config(
            open_vectors_table(table_config), device=args.device, dtype=args.dtype
        )
        generator = Generator.from_config(embedder_config)  # refuses an embedding-only checkpoint first
        prompt, sources = prepare_answer(
            table_config,
            generator,
            args.question,
            config,
            image=args.image,
            where=args.where,
            mode=args.mode,
        )
    except GenerationUnsupported as exc:
        print(f"answer: error: this table's model cannot answer: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (TableNotFound, TableConfigMismatch, ModelLoadError, ItemError, ValueError) as exc:
        print(f"answer: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    stream = generator.stream(prompt, sampling(config))
    if args.stream:
        for piece in stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    else:
        for _ in stream:
            pass
    completion = stream.completion
    if args.json:
        usage = {
            "prompt_tokens": completion.prompt_tokens,
            "completion_tokens": completion.completion_tokens,
            "finish_reason": completion.finish_reason,
        }
        print(json.dumps({"answer": completion.text, "sources": sources, "usage": usage}))
        return 0
    if not args.stream:
        print(completion.text)
    print(f"\nsources ({len(sources)}):")
    for rank, row in enumerate(sources, start=1):
        shown = row["text"] if row.get("text") is not None else row.get("image_uri")
        note = f"\t(image not used: {row['image_error']})" if row.get("image_error") else ""
        print(f"[{rank}]\t{row['score']:.4f}\t{row['id']}\t{shown}{note}")
    if not sources:
        print("no rows retrieved (is the table empty?)", file=sys.stderr)
    return 0
