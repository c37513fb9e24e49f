"""Generation with the embedder's own weights: one Qwen3-VL model in memory both embeds and answers.

`Generator.load(...)` loads the generation class (`Qwen3VLForConditionalGeneration`: the base model plus the
LM head) once and builds the `Embedder` on its `.model`, so embedding and generation run on the same tensors,
never a second copy (for checkpoints with tied word embeddings, such as Qwen3-VL-2B-Instruct and `tiny`, the
LM head is the token embedding matrix itself). Only Instruct (chat) checkpoints generate: Qwen3-VL-Embedding
checkpoints, rerankers and the non-Qwen backends are refused with the reason (`generation_refusal`).

Prompts are rendered by the checkpoint's own chat template (images as image parts) and tokenized here, each
`<|image_pad|>` expanded to one token per merged patch as `Qwen3VLProcessor` does: that processor cannot be
built without a video processor (torchvision, which CPU machines here lack), and the embedder's image
preprocessing (`pipelines.prepare.image_patches`) is the one the vision tower already gets. Tokens come out of
transformers' `generate` through its `TextIteratorStreamer`, on a thread of their own; closing the stream stops
the generation (a `StoppingCriteria`). Knows nothing about Ray.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipelines.config import TINY_MODELS, EmbedderConfig
from pipelines.recipes import IMAGE_PAD

# Where a checkpoint's generation_config names no end of turn: Qwen's chat template closes a turn with these.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>")
STREAM_TIMEOUT_S = 600.0  # a generation thread that stops giving tokens for this long is given up on


class GenerationUnsupported(ValueError):
    """The checkpoint cannot answer: it is embedding-only (or a reranker, or a non-Qwen backend)."""


def generation_refusal(config: EmbedderConfig) -> str | None:
    """Why this embedder configuration cannot generate answers, or None when it can (an Instruct checkpoint)."""
    name = config.model.rstrip("/")
    if config.backend != "transformers":
        return (
            f"the {config.backend} backend computes vectors only; answers need a Qwen3-VL Instruct checkpoint"
        )
    if TINY_MODELS.get(name) == "reranker" or "reranker" in name.lower():
        return f"{name} is a reranker checkpoint: it scores pairs and cannot answer"
    if config.recipe == "qwen3-vl-embedding":
        return (
            f"{name} is an embedding-only checkpoint (recipe qwen3-vl-embedding): it was trained to embed, not "
            "to answer; use an Instruct checkpoint (e.g. Qwen/Qwen3-VL-2B-Instruct, or tiny) for answers"
        )
    return None


def check_can_generate(config: EmbedderConfig) -> None:
    reason = generation_refusal(config)
    if reason is not None:
        raise GenerationUnsupported(reason)


@dataclass
class ChatPrompt:
    """A rendered chat prompt, ready for `generate`: its text, its token ids (images expanded) and the images'
    patches and grids."""

    text: str
    input_ids: np.ndarray  # [L] int64
    pixel_values: np.ndarray | None = None  # [patches, D]
    image_grid_thw: np.ndarray | None = None  # [images, 3]

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class SamplingOptions:
    """How to generate: `temperature` 0 is greedy, None the checkpoint's own generation config."""

    max_new_tokens: int = 256
    temperature: float | None = None
    top_p: float | None = None


@dataclass
class Completion:
    """What one generation gave: the text, token counts, why it ended ("stop" or "length"), and the token ids
    that were passed to `generate` (the prompt the model saw)."""

    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"
    prompt_token_ids: list[int] = field(default_factory=list)


class PromptBuilder:
    """Chat messages -> `ChatPrompt`, with the checkpoint's chat template and the embedder's image preprocessing.

    A message's `content` is a string or a list of parts: `{"type": "text", "text": ...}` and
    `{"type": "image", "image": <path, bytes or PIL image>}`."""

    def __init__(self, tokenizer, image_processor, config: EmbedderConfig):
        if getattr(tokenizer, "chat_template", None) is None:
            raise GenerationUnsupported(f"{config.model}: the tokenizer has no chat template")
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.config = config
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        self.merge_size = int(image_processor.merge_size) if image_processor is not None else 2

    def build(self, messages: list[dict[str, Any]]) -> ChatPrompt:
        from pipelines.prepare import expand_image_tokens, image_patches

        images, rendered = [], []
        for message in messages:
            content = message["content"]
            if isinstance(content, list):
                parts = []
                for part in content:
                    if part.get("type") == "image":
                        images.append(part["image"])
                        parts.append({"type": "image"})
                    else:
                        parts.append({"type": "text", "text": part["text"]})
                content = parts
            rendered.append({"role": message["role"], "content": content})
        text = self.tokenizer.apply_chat_template(rendered, add_generation_prompt=True, tokenize=False)
        ids = np.asarray(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], np.int64)
        pixels = grids = None
        if images:
            c = self.config
            patches = [
                image_patches(
                    self.image_processor,
                    image,
                    c.resolved_min_pixels,
                    c.resolved_max_pixels,
                    c.max_image_pixels,
                    index,
                )
                for index, image in enumerate(images)
            ]
            pixels = np.concatenate([p for p, _ in patches])
            grids = np.stack([np.asarray(g).reshape(3) for _, g in patches])
            ids = expand_image_tokens(ids, self.image_token_id, grids, self.merge_size)
        if len(ids) > self.config.max_length:
            raise ValueError(
                f"the prompt is {len(ids)} tokens, over max_length={self.config.max_length}: retrieve fewer or "
                "shorter passages"
            )
        return ChatPrompt(text=text, input_ids=ids, pixel_values=pixels, image_grid_thw=grids)


class Generator:
    """A Qwen3-VL Instruct checkpoint loaded once as the generation class, with an `Embedder` on its base
    model: `embedder` embeds (queries for retrieval), `stream`/`generate` answer, from the same weights."""

    def __init__(self, model: Any, tokenizer: Any, image_processor: Any, config: EmbedderConfig):
        from pipelines.embedder import Embedder
        from pipelines.loading import ModelLoadError

        check_can_generate(config)
        if not hasattr(model, "lm_head"):
            raise ModelLoadError(
                f"expected the generation class (Qwen3VLForConditionalGeneration), got {type(model).__name__}"
            )
        self.model = model
        self.embedder = Embedder(model, tokenizer, image_processor=image_processor, config=config)
        self.tokenizer = tokenizer
        self.prompts = PromptBuilder(tokenizer, image_processor, config)
        self.eos_token_ids = _eos_token_ids(model.generation_config, tokenizer)

    @classmethod
    def load(cls, model: str = "tiny", **options: Any) -> Generator:
        """Load from a hub id, a local Instruct checkpoint or 'tiny'; options are `EmbedderConfig` fields."""
        return cls.from_config(EmbedderConfig(model=model, **options))

    @classmethod
    def from_config(cls, config: EmbedderConfig) -> Generator:
        from pipelines.loading import load_checkpoint

        check_can_generate(config)  # before anything is loaded
        model, tokenizer, image_processor = load_checkpoint(config, lm_head=True)
        return cls(model, tokenizer, image_processor, config)

    @property
    def config(self) -> EmbedderConfig:
        return self.embedder.config

    def prompt(self, messages: list[dict[str, Any]]) -> ChatPrompt:
        return self.prompts.build(messages)

    def stream(self, prompt: ChatPrompt, options: SamplingOptions | None = None) -> GenerationStream:
        """Start generating; iterate the result for text pieces as they come (`.completion` when done)."""
        return GenerationStream(self, prompt, options or SamplingOptions())

    def generate(self, prompt: ChatPrompt, options: SamplingOptions | None = None) -> Completion:
        stream = self.stream(prompt, options)
        for _ in stream:
            pass
        return stream.completion

    def generate_kwargs(self, prompt: ChatPrompt, options: SamplingOptions) -> dict[str, Any]:
        import torch

        device = self.embedder.device
        ids = torch.from_numpy(prompt.input_ids).unsqueeze(0).to(device)
        kwargs: dict[str, Any] = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "max_new_tokens": options.max_new_tokens,
            "eos_token_id": self.eos_token_ids,
            "pad_token_id": self.embedder.pad_token_id,
        }
        if prompt.pixel_values is not None:
            kwargs["pixel_values"] = torch.from_numpy(prompt.pixel_values).to(device, self.embedder.dtype)
            kwargs["image_grid_thw"] = torch.from_numpy(prompt.image_grid_thw).to(device)
            kwargs["mm_token_type_ids"] = (ids == self.prompts.image_token_id).to(torch.int32)
        if options.temperature is not None:
            kwargs["do_sample"] = options.temperature > 0
            if options.temperature > 0:
                kwargs["temperature"] = options.temperature
        if options.top_p is not None:
            kwargs["top_p"] = options.top_p
        return kwargs


class GenerationStream:
    """One generation running on its own thread: iterate it for text pieces; `close()` stops it early."""

    def __init__(self, generator: Generator, prompt: ChatPrompt, options: SamplingOptions):
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        self._generator = generator
        self._stopped = threading.Event()
        self._streamer = TextIteratorStreamer(
            generator.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=STREAM_TIMEOUT_S
        )
        self._kwargs = generator.generate_kwargs(prompt, options)
        self._kwargs["streamer"] = self._streamer
        self._kwargs["stopping_criteria"] = StoppingCriteriaList([_StopWhen(self._stopped)])
        self._max_new_tokens = options.max_new_tokens
        self._error: BaseException | None = None
        self._pieces: list[str] = []
        self.completion = Completion(
            prompt_tokens=prompt.num_tokens, prompt_token_ids=self._kwargs["input_ids"][0].tolist()
        )
        self._thread = threading.Thread(target=self._run, name="generate", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import torch

        try:
            with torch.inference_mode():
                output = self._generator.model.generate(**self._kwargs)
            new = output[0, self.completion.prompt_tokens :].tolist()
            self.completion.completion_tokens = len(new)
            ended = bool(new) and new[-1] in self._generator.eos_token_ids
            hit_limit = len(new) >= self._max_new_tokens and not ended
            self.completion.finish_reason = "length" if hit_limit else "stop"
        except BaseException as exc:  # noqa: BLE001 (handed to the consumer, which re-raises it)
            self._error = exc
            self._streamer.end()

    def __iter__(self) -> Iterator[str]:
        for piece in self._streamer:
            if piece:
                self._pieces.append(piece)
                yield piece
        self._thread.join()
        if self._error is not None:
            raise self._error
        self.completion.text = "".join(self._pieces)

    def close(self) -> None:
        """Stop generating at the next token (the consumer went away)."""
        self._stopped.set()


class _StopWhen:
    """A `StoppingCriteria`-compatible callable: True for every sequence once `event` is set."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.full(
            (input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device
        )


def _eos_token_ids(generation_config, tokenizer) -> list[int]:
    """The checkpoint's end-of-generation ids (its generation_config), else Qwen's end-of-turn tokens."""
    configured = getattr(generation_config, "eos_token_id", None)
    if configured is not None:
        return [int(i) for i in (configured if isinstance(configured, list | tuple) else [configured])]
    vocab = tokenizer.get_vocab()
    return [int(vocab[token]) for token in END_OF_TURN_TOKENS if token in vocab]
