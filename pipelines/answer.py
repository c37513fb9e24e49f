"""Answers from the collection (RAG): retrieve the top-k rows with the embedder, put them into the prompt, and
generate with the same loaded model (`pipelines.generation.Generator`: one copy of the weights).

The prompt is the checkpoint's chat template over: the system prompt (`AnswerConfig.system_prompt`, or the
caller's own system message), the earlier turns of a conversation if any, and the last user turn with the
retrieved context first — each row on lines of its own, headed `[1] (id ...)`, `[2] ...`, its image as an image part (read
from `image_uri`, as the reranker reads it) and its text (cut to `max_context_chars`) — then the question.
A row whose image cannot be read keeps its text and says why in `image_error`. Knows nothing about Ray: the
CLI (`vlm-embed answer`) calls it directly, and Serve (`serve.chat`) uses its prompt building.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pipelines.config import AnswerConfig, TableConfig
from pipelines.generation import ChatPrompt, Completion, GenerationStream, Generator, SamplingOptions

SOURCE_FIELDS = ("id", "score", "modality", "text", "image_uri")


@dataclass
class Answer:
    """An answer, the rows it was given (`sources`, best first) and the prompt the model saw."""

    text: str
    sources: list[dict[str, Any]]
    prompt: ChatPrompt
    completion: Completion = field(default_factory=Completion)


def context_messages(
    question: str,
    sources: Sequence[dict[str, Any]],
    config: AnswerConfig,
    *,
    history: Sequence[dict[str, Any]] = (),
    system: str | None = None,
    question_image: Any = None,
    max_image_pixels: int = 100_000_000,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(the chat messages of a RAG prompt, the sources as they went in: each with `image_error` where its image
    could not be read). `history`: earlier turns, as chat messages with string or part-list content."""
    from pipelines.items import ItemError, load_image
    from pipelines.rerank_search import row_document

    parts: list[dict[str, Any]] = []
    used = []
    if sources:
        parts.append({"type": "text", "text": "Context:\n"})
    for number, row in enumerate(sources, start=1):
        row = dict(row)
        parts.append({"type": "text", "text": f"[{number}] (id {row.get('id')})\n"})
        if row.get("image_uri") is not None:
            document, error = row_document({"image_uri": row["image_uri"]})
            try:
                if error is not None:
                    raise ItemError(error)
                parts.append({"type": "image", "image": load_image(document["image"], max_image_pixels)})
            except ItemError as exc:
                row["image_error"] = error or f"{exc.kind}: {exc.reason}"
        text = row.get("text")
        if text:
            cut = text if len(text) <= config.max_context_chars else text[: config.max_context_chars] + " ..."
            parts.append({"type": "text", "text": cut})
        parts.append({"type": "text", "text": "\n"})
        used.append(row)
    if question_image is not None:
        parts.append({"type": "text", "text": "\nThe question is about this image:\n"})
        parts.append({"type": "image", "image": load_image(question_image, max_image_pixels)})
    parts.append({"type": "text", "text": f"\nQuestion: {question}" if sources else question})
    messages = [{"role": "system", "content": system if system is not None else config.system_prompt}]
    messages += [dict(m) for m in history]
    messages.append({"role": "user", "content": _merge_text_parts(parts)})
    return messages, used


def _merge_text_parts(parts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Adjacent text parts joined into one (the template renders them back to back either way)."""
    merged: list[dict[str, Any]] = []
    for part in parts:
        if part["type"] == "text" and merged and merged[-1]["type"] == "text":
            merged[-1] = {"type": "text", "text": merged[-1]["text"] + part["text"]}
        else:
            merged.append(part)
    return merged


def source_row(row: dict[str, Any]) -> dict[str, Any]:
    """A retrieved row as answers report it: id, score, modality, text, image_uri (and image_error, kept
    columns); never the vector."""
    return {key: value for key, value in row.items() if key != "vector"}


def retrieve(
    table_config: TableConfig,
    generator: Generator,
    question: str,
    *,
    image: Any = None,
    top_k: int = 5,
    where: str | None = None,
    mode: str = "vector",
) -> list[dict[str, Any]]:
    """The `top_k` rows that best match the question (`pipelines.search.retrieve_context`: vector, text or
    hybrid), the question embedded by the generator's own embedder (checked against the table's recorded
    configuration)."""
    from pipelines.search import retrieve_context

    return retrieve_context(
        question, top_k, where, mode, image=image, table=table_config, embedder=generator.embedder
    )


def prepare_answer(
    table_config: TableConfig,
    generator: Generator,
    question: str,
    config: AnswerConfig | None = None,
    *,
    image: Any = None,
    where: str | None = None,
    mode: str = "vector",
) -> tuple[ChatPrompt, list[dict[str, Any]]]:
    """Retrieve and build the prompt: (the prompt, the sources it holds)."""
    config = config or AnswerConfig()
    if not question or not question.strip():
        raise ValueError("the question is empty")
    rows = retrieve(
        table_config, generator, question, image=image, top_k=config.top_k, where=where, mode=mode
    )
    messages, used = context_messages(
        question,
        rows,
        config,
        question_image=image,
        max_image_pixels=generator.config.max_image_pixels,
    )
    return generator.prompt(messages), [source_row(row) for row in used]


def sampling(config: AnswerConfig, max_new_tokens: int | None = None) -> SamplingOptions:
    return SamplingOptions(
        max_new_tokens=max_new_tokens or config.max_new_tokens, temperature=config.temperature
    )


def answer(
    table_config: TableConfig,
    question: str,
    config: AnswerConfig | None = None,
    *,
    generator: Generator,
    image: Any = None,
    where: str | None = None,
    mode: str = "vector",
) -> Answer:
    """Retrieve (`mode`: vector, text or hybrid), prompt and generate: the whole answer at once."""
    config = config or AnswerConfig()
    prompt, sources = prepare_answer(
        table_config, generator, question, config, image=image, where=where, mode=mode
    )
    completion = generator.generate(prompt, sampling(config))
    return Answer(text=completion.text, sources=sources, prompt=prompt, completion=completion)


def stream_answer(
    table_config: TableConfig,
    question: str,
    config: AnswerConfig | None = None,
    *,
    generator: Generator,
    image: Any = None,
    where: str | None = None,
    mode: str = "vector",
) -> tuple[list[dict[str, Any]], GenerationStream]:
    """Retrieve and prompt, then (the sources, the generation: iterate it for the answer's text pieces as they
    are generated, then read its `completion`)."""
    config = config or AnswerConfig()
    prompt, sources = prepare_answer(
        table_config, generator, question, config, image=image, where=where, mode=mode
    )
    return sources, generator.stream(prompt, sampling(config))
