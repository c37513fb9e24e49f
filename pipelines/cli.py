"""`vlm-embed`: the command line. Each subcommand imports what it needs when it runs, so `--help` is instant."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipelines import __version__
from pipelines.config import EmbedderConfig
from pipelines.config_flags import add_config_flags, config_from_flags

EXIT_ITEM_ERRORS = 1
EXIT_USAGE = 2

DESCRIPTION = """\
Embed texts, images and text+image pairs with a Qwen3-VL model.

Every command runs offline on the built-in tiny random model ('--model tiny', the default), and on a real
checkpoint when you name one (a hub id such as Qwen/Qwen3-VL-2B-Instruct, or a local directory).
"""


class CliError(Exception):
    """A usage or input problem: printed as one line to stderr, exit status 2."""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # TEXTs given after an option (`embed --image a.png "text"`) are still TEXTs
        if getattr(args, "command", None) != "embed" or any(e.startswith("-") and e != "-" for e in extra):
            parser.parse_args(argv)  # reports the unknown arguments the usual way and exits 2
        args.texts = [*args.texts, *extra]
    if not getattr(args, "handler", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.handler(args) or 0)
    except CliError as exc:
        print(f"vlm-embed {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a clear one-line message instead of a traceback for known failures
        from pydantic import ValidationError

        from pipelines.loading import ModelLoadError

        if isinstance(exc, ModelLoadError | ValidationError | FileExistsError):
            print(f"vlm-embed {args.command}: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlm-embed", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"vlm-embed {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_embed(commands)
    _add_demo(commands)
    _add_make_tiny_model(commands)
    _add_backfill(commands)
    _add_search(commands)
    _add_reduce(commands)
    _add_rerank(commands)
    _add_eval(commands)
    _add_answer(commands)
    _add_serve(commands)
    return parser


def _subparser(commands, name: str, summary: str, description: str) -> argparse.ArgumentParser:
    return commands.add_parser(
        name, help=summary, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )


# -- embed -------------------------------------------------------------------------------------------------


def _add_embed(commands) -> None:
    p = _subparser(
        commands,
        "embed",
        "embed texts and images given on the command line or in a JSONL file",
        """\
Embed items and write one JSON object per item to stdout: {"index": i, "embedding": [...]}.

Items are numbered in this order: the lines of --input, then each TEXT, then each --image. With --pair,
the TEXTs and --images are zipped into text+image items instead (their counts must match).
An --input line is a JSON string (a text) or an object with "text" and/or "image" (a file path, relative
to the JSONL file) and optionally an "id", which is copied to the output. Bad items are reported on stderr ("item 3: ...") and the exit status is 1; the
other items are still embedded.

examples:
  vlm-embed embed "a red circle" "a blue square"
  vlm-embed embed --image photo.jpg
  vlm-embed embed --pair --image photo.jpg "a caption for the photo"
  vlm-embed embed --model Qwen/Qwen3-VL-Embedding-2B --recipe qwen3-vl-embedding --input items.jsonl
""",
    )
    p.add_argument("texts", nargs="*", metavar="TEXT", help="texts to embed")
    p.add_argument("--image", action="append", default=[], metavar="FILE", help="an image file (repeatable)")
    p.add_argument("--pair", action="store_true", help="zip TEXTs and --images into text+image items")
    p.add_argument("--input", type=Path, metavar="ITEMS.JSONL", help="a JSONL file of items")
    p.add_argument("--chunk-size", type=int, default=256, help="items embedded per step (default: 256)")
    add_config_flags(p, EmbedderConfig)
    p.set_defaults(handler=_run_embed)


def read_jsonl_items(path: Path, flag: str = "--input") -> Iterator[Any]:
    """The items of a JSONL file (image paths made relative to it); an unparseable line is a `BadLine`."""
    try:
        handle = path.open(encoding="utf-8")
    except OSError as exc:
        raise CliError(f"cannot read {flag} {path}: {exc.strerror or exc}") from exc
    with handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                item = BadLine(f"{path}:{number}: not valid JSON ({exc.msg}, column {exc.colno})")
            if isinstance(item, dict) and isinstance(item.get("image"), str):
                item = dict(item, image=str(path.parent / item["image"]))
            yield item


class BadLine:
    """A placeholder item for an unparseable input line; it fails as an item, so the others still run."""

    def __init__(self, message: str):
        self.message = message


def _collect_items(args) -> Iterator[Any]:
    if args.input is not None:
        yield from read_jsonl_items(args.input)
    if args.pair:
        if len(args.texts) != len(args.image):
            raise CliError(
                f"--pair needs as many TEXTs as --images, got {len(args.texts)} and {len(args.image)}"
            )
        for text, image in zip(args.texts, args.image, strict=True):
            yield {"text": text, "image": image}
        return
    yield from args.texts
    for image in args.image:
        yield {"image": image}


def _run_embed(args) -> int:
    from pipelines.backends import load_embedder

    if args.input is None and not args.texts and not args.image:
        raise CliError("nothing to embed: give TEXTs, --image FILEs or --input ITEMS.JSONL")
    if args.chunk_size < 1:
        raise CliError("--chunk-size must be at least 1")
    embedder = load_embedder(config_from_flags(args, EmbedderConfig))
    failures = 0
    for start, chunk in _chunks(_collect_items(args), args.chunk_size):
        good = [(offset, item) for offset, item in enumerate(chunk) if not isinstance(item, BadLine)]
        ids = {offset: item.pop("id") for offset, item in good if isinstance(item, dict) and "id" in item}
        result = embedder.try_embed_batch([item for _, item in good])
        errors = {good[e.index][0]: e.reason for e in result.errors}
        errors.update(
            {offset: item.message for offset, item in enumerate(chunk) if isinstance(item, BadLine)}
        )
        for index, vector in zip(result.indices, result.vectors, strict=True):
            offset = good[index][0]
            record = {"index": start + offset, **({"id": ids[offset]} if offset in ids else {})}
            record["embedding"] = [float(x) for x in vector]
            sys.stdout.write(json.dumps(record) + "\n")
        for offset in sorted(errors):
            print(f"error: item {start + offset}: {errors[offset]}", file=sys.stderr)
        failures += len(errors)
        sys.stdout.flush()
    return EXIT_ITEM_ERRORS if failures else 0


def _chunks(items: Iterator[Any], size: int) -> Iterator[tuple[int, list[Any]]]:
    chunk: list[Any] = []
    start = 0
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield start, chunk
            start, chunk = start + size, []
    if chunk:
        yield start, chunk


# -- demo --------------------------------------------------------------------------------------------------


def _add_demo(commands) -> None:
    p = _subparser(
        commands,
        "demo",
        "embed the bundled sample (texts, images, pairs) and print a similarity matrix",
        "Embed the small sample shipped with the package and print the vectors' shape and their cosine "
        "similarity matrix. Runs offline on the tiny model by default.",
    )
    add_config_flags(p, EmbedderConfig)
    p.set_defaults(handler=_run_demo)


def _run_demo(args) -> int:
    import numpy as np

    from pipelines.backends import load_embedder
    from pipelines.sample import sample_items

    config = config_from_flags(args, EmbedderConfig)
    if config.backend == "stand-in":
        raise CliError(
            "backend 'stand-in' is a pipeline-benchmark stand-in: its vectors mean nothing to show"
        )
    embedder = load_embedder(config)
    labels, items = zip(*sample_items(), strict=True)
    result = embedder.try_embed_batch(list(items))
    for error in result.errors:  # e.g. the images, for a text-only backend
        print(f"skipped {labels[error.index]}: {error.reason}", file=sys.stderr)
    labels, vectors = [labels[i] for i in result.indices], result.vectors
    print(f"{embedder}")
    print(
        f"embedded {len(labels)} of {len(items)} sample items -> vectors of shape {vectors.shape}, dtype {vectors.dtype}"
    )
    if not labels:
        return EXIT_ITEM_ERRORS
    similarity = vectors @ vectors.T
    width = max(len(label) for label in labels)
    print("cosine similarity:")
    print(" " * (width + 1) + " ".join(f"{i:>5d}" for i in range(len(labels))))
    for i, label in enumerate(labels):
        print(f"{label:<{width}} " + " ".join(f"{x:5.2f}" for x in similarity[i]) + f"  [{i}]")
    if not np.isfinite(vectors).all():
        print("error: some vectors are not finite", file=sys.stderr)
        return EXIT_ITEM_ERRORS
    return 0


# -- make-tiny-model ---------------------------------------------------------------------------------------


def _add_make_tiny_model(commands) -> None:
    from pipelines.tiny_model import FLAVOURS  # no heavy imports at the module's top

    p = _subparser(
        commands,
        "make-tiny-model",
        "build the tiny random Qwen3-VL checkpoint used offline and in tests",
        "Build a tiny, seeded, random Qwen3-VL checkpoint (real transformers classes, a BPE tokenizer trained "
        "offline with Qwen's special tokens and chat template, the Qwen3-VL image processor) into DIR with "
        "save_pretrained. Load it with --model DIR. The same seed and flavour give byte-identical files.",
    )
    p.add_argument(
        "--flavour",
        choices=FLAVOURS,
        default="instruct",
        help="instruct: like Qwen3-VL-Instruct (the tokenizer adds no special tokens); embedding: like "
        "Qwen3-VL-Embedding (the tokenizer appends <|endoftext|>); reranker: like Qwen3-VL-Reranker (an LM "
        "head of its own) (default: %(default)s)",
    )
    p.add_argument("directory", type=Path, metavar="DIR", help="where to write the checkpoint")
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights (default: 0)")
    p.add_argument("--overwrite", action="store_true", help="replace DIR if it is not empty")
    p.set_defaults(handler=_run_make_tiny_model)


def _run_make_tiny_model(args) -> int:
    from pipelines.tiny_model import make_tiny_model

    path = make_tiny_model(args.directory, seed=args.seed, overwrite=args.overwrite, flavour=args.flavour)
    size = sum(f.stat().st_size for f in path.iterdir())
    print(f"wrote a tiny Qwen3-VL checkpoint to {path} ({size / 1e6:.1f} MB); use it with --model {path}")
    return 0


# -- backfill and search (implemented in pipelines.backfill and pipelines.search) ----------------------------


def _add_backfill(commands) -> None:
    from pipelines.backfill import DESCRIPTION, add_backfill_arguments

    p = _subparser(
        commands,
        "backfill",
        "embed a corpus into a LanceDB table on Ray (resumable, exactly once)",
        DESCRIPTION,
    )
    add_backfill_arguments(p)
    p.set_defaults(handler=_run_backfill)


def _run_backfill(args) -> int:
    from pipelines.backfill import run_backfill_command

    return run_backfill_command(args)


def _add_search(commands) -> None:
    from pipelines.search import DESCRIPTION, add_search_arguments

    p = _subparser(
        commands, "search", "search a table made by backfill with a text and/or image query", DESCRIPTION
    )
    add_search_arguments(p)
    p.set_defaults(handler=_run_search)


def _run_search(args) -> int:
    from pipelines.search import run_search_command

    return run_search_command(args)


def _add_reduce(commands) -> None:
    from pipelines.reduce import DESCRIPTION as REDUCE
    from pipelines.reduce import add_reduce_arguments

    p = _subparser(
        commands, "reduce", "write a table with smaller vectors (PCA, Matryoshka, float16, int8)", REDUCE
    )
    add_reduce_arguments(p)
    p.set_defaults(handler=_run_reduce)


def _run_reduce(args) -> int:
    from pipelines.reduce import run_reduce_command

    return run_reduce_command(args)


def _add_eval(commands) -> None:
    from pipelines.eval_command import DESCRIPTION as EVAL
    from pipelines.eval_command import add_eval_arguments

    p = _subparser(
        commands, "eval", "measure retrieval quality on labelled queries (recall, MRR, nDCG)", EVAL
    )
    add_eval_arguments(p)
    p.set_defaults(handler=_run_eval)


def _run_eval(args) -> int:
    from pipelines.eval_command import run_eval_command

    return run_eval_command(args)


# -- serve (implemented in serve.launch and serve.app) ----------------------------------------------------


def _add_rerank(commands) -> None:
    from pipelines.rerank_command import DESCRIPTION as RERANK
    from pipelines.rerank_command import add_rerank_arguments

    p = _subparser(commands, "rerank", "score documents against a query with Qwen3-VL-Reranker", RERANK)
    add_rerank_arguments(p)
    p.set_defaults(handler=_run_rerank)


def _run_rerank(args) -> int:
    from pipelines.rerank_command import run_rerank_command

    return run_rerank_command(args)


def _add_answer(commands) -> None:
    from pipelines.answer_command import DESCRIPTION as ANSWER
    from pipelines.answer_command import add_answer_arguments

    p = _subparser(commands, "answer", "answer a question from a table with the same model", ANSWER)
    add_answer_arguments(p)
    p.set_defaults(handler=_run_answer)


def _run_answer(args) -> int:
    from pipelines.answer_command import run_answer_command

    return run_answer_command(args)


def _add_serve(commands) -> None:
    from pipelines.config import ServeConfig

    p = _subparser(
        commands,
        "serve",
        "serve the embedder over HTTP with Ray Serve (OpenAI-compatible embeddings, search)",
        """\
Start Ray Serve with the embedder behind an HTTP API, on 127.0.0.1:8000 unless told otherwise, and serve
until Ctrl-C: POST /v1/embeddings (OpenAI-compatible, plus {"text", "image"} items with inline base64
images), POST /search (the table in the config, queried with the configuration it was built with),
GET /healthz, GET /v1/models; with --reranker (or a reranker: section), POST /rerank and /search with
"rerank": true; with --answer (or an answer: section; Instruct checkpoints), POST /v1/chat/completions
(OpenAI-compatible, streaming too) answers from the table with the embedder's own weights.

--config takes the project's config YAML (the file a backfill runs from: embedder, table, serve sections)
or a Ray Serve config file such as serve/config.yaml. Flags override the file. If the environment variable
named by --api-key-env (default VLM_EMBED_API_KEY) is set, requests need 'Authorization: Bearer <key>'.

examples:
  vlm-embed serve                                        # the tiny offline model on 127.0.0.1:8000
  vlm-embed serve --config job.yaml --port 8080          # the model and table of a backfill job
  vlm-embed serve --config serve/config.yaml --model Qwen/Qwen3-VL-Embedding-2B \\
      --recipe qwen3-vl-embedding --num-gpus 1 --max-replicas 4
  vlm-embed serve --high-throughput                      # HAProxy in front of the replicas (Ray >= 2.55)
  vlm-embed serve --reranker tiny-reranker               # and POST /rerank with the tiny reranker
  vlm-embed serve --answer                               # and POST /v1/chat/completions (tiny model)
""",
    )
    p.add_argument(
        "--reranker",
        metavar="MODEL",
        help="also serve this Qwen3-VL-Reranker (a hub id such as Qwen/Qwen3-VL-Reranker-2B, a directory, or "
        "tiny-reranker): POST /rerank, and /search with rerank",
    )
    p.add_argument(
        "--answer",
        action="store_true",
        help="also answer POST /v1/chat/completions from the table with the same model (Instruct checkpoints; "
        "an answer: section in the config does the same and sets its options)",
    )
    p.add_argument("--config", type=Path, metavar="FILE", help="a config YAML or a Ray Serve config file")
    p.add_argument(
        "--address", help="Ray cluster address; default: the config's, else RAY_ADDRESS, else a new local Ray"
    )
    add_config_flags(p, EmbedderConfig)
    add_config_flags(p, ServeConfig)
    p.set_defaults(handler=_run_serve)


def _run_serve(args) -> int:
    from pipelines.loading import resolve_model_source
    from serve.launch import LaunchError, apply_flags, load_target, serve_forever, with_reranker

    try:
        target = load_target(args.config)
    except LaunchError as exc:
        raise CliError(str(exc)) from exc
    target = with_reranker(apply_flags(target, args), args.reranker)
    if args.answer and target.config.answer is None:
        from dataclasses import replace

        from pipelines.config import AnswerConfig

        target = replace(target, config=target.config.model_copy(update={"answer": AnswerConfig()}))
    resolve_model_source(target.config.embedder.model)  # a wrong local path fails here, not in every replica
    if target.config.reranker is not None:
        resolve_model_source(target.config.reranker.model)
    return serve_forever(target, args.address)


if __name__ == "__main__":
    sys.exit(main())
