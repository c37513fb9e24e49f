"""Build a tiny, seeded, random Qwen3-VL checkpoint with a real processor, offline.

The checkpoint uses the real transformers classes (`Qwen3VLForConditionalGeneration`: a text tower of a few
layers and a vision tower with deepstack), a byte-level BPE tokenizer trained here on a fixed generated corpus
with Qwen's special tokens and a Qwen-style chat template, and the Qwen2-VL/Qwen3-VL image processor with patch,
merge and pixel bounds matching the vision config. It is saved with `save_pretrained`, so loading it goes
through the same `from_pretrained` calls as a hub id. The same arguments give byte-identical files.

Three flavours stand for the three kinds of released checkpoint:
- `instruct`: like `Qwen/Qwen3-VL-2B-Instruct`; its tokenizer adds no special tokens.
- `embedding`: like `Qwen/Qwen3-VL-Embedding-2B`, whose tokenizer's post-processor appends `<|endoftext|>`
  whenever special tokens are on (the token the official code pools).
- `reranker`: like `Qwen/Qwen3-VL-Reranker-8B`: an LM head of its own (not tied to the token embeddings), so a
  test can tell the two apart, and "yes"/"no" single tokens in the vocabulary (the score is read off their rows).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Literal

Flavour = Literal["instruct", "embedding", "reranker"]
FLAVOURS: tuple[str, ...] = ("instruct", "embedding", "reranker")
# Bumped whenever the files a flavour builds change, so that a cached checkpoint of an older build is not reused.
BUILD_VERSION = 2
END_OF_TEXT = "<|endoftext|>"

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# A Qwen-style chat template: content is a string or a list of {"type": "image"|"text", ...} parts.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'video' -%}{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

TEXT_CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    rope_parameters={
        "rope_type": "default",
        "rope_theta": 5_000_000.0,
        "mrope_section": [4, 2, 2],
        "mrope_interleaved": True,
    },
)
VISION_CONFIG = dict(
    depth=3,
    hidden_size=32,
    intermediate_size=64,
    num_heads=2,
    patch_size=16,
    spatial_merge_size=2,
    temporal_patch_size=2,
    num_position_embeddings=64,
    deepstack_visual_indexes=[0, 1],
)
MIN_PIXELS = 32 * 32
MAX_PIXELS = 256 * 256
VOCAB_SIZE = 1024

_SUBJECTS = [
    "the cat",
    "a dog",
    "the red car",
    "my neighbour",
    "a small bird",
    "the old ship",
    "our team",
    "the river",
    "a young child",
    "the green tree",
    "an engineer",
    "the blue house",
]
_VERBS = [
    "sees",
    "paints",
    "follows",
    "builds",
    "carries",
    "finds",
    "describes",
    "measures",
    "loves",
    "opens",
]
_OBJECTS = [
    "a bright picture",
    "the long road",
    "three apples",
    "an empty box",
    "the morning light",
    "a heavy stone",
    "the quiet garden",
    "two white clouds",
    "a wooden table",
    "the city map",
]
_EXTRAS = [
    "today.",
    "again!",
    "near the sea.",
    "in 2024.",
    "with care, slowly.",
    "at 7:30 pm?",
    "for €12.50.",
    "— quite well.",
    "(twice).",
    "on page 42;",
    "über alles.",
    "très vite.",
]


def training_corpus() -> list[str]:
    """A fixed corpus of sentences, the same on every machine and Python version."""
    lines = []
    for i, subject in enumerate(_SUBJECTS):
        for j, verb in enumerate(_VERBS):
            for k, obj in enumerate(_OBJECTS):
                extra = _EXTRAS[(i + j + k) % len(_EXTRAS)]
                lines.append(f"{subject.capitalize()} {verb} {obj} {extra}")
    lines += [f"Number {n} and {n * 7 % 1000}: {'x' * (n % 5)}{chr(65 + n % 26)}" for n in range(300)]
    lines += ["def embed(items):\n    return [vector(x) for x in items]\n", "A photo of a {color} {shape}."]
    # the reranker's answers, at the start of a line as they follow "assistant\n": single tokens "yes" and "no"
    lines += ["yes", "no", "yes.", "no."] * 50
    return lines


def build_tokenizer(vocab_size: int = VOCAB_SIZE, flavour: Flavour = "instruct"):
    """A Qwen2-style byte-level BPE tokenizer trained on `training_corpus()`, with Qwen's special tokens; the
    embedding flavour's post-processor appends `<|endoftext|>` when special tokens are on."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX, Qwen2Tokenizer

    trainer_tokenizer = Tokenizer(models.BPE())
    trainer_tokenizer.normalizer = normalizers.NFC()
    trainer_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(QWEN_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    trainer_tokenizer.train_from_iterator(training_corpus(), trainer)
    trained = json.loads(trainer_tokenizer.to_str())["model"]
    tokenizer = Qwen2Tokenizer(
        vocab=trained["vocab"],
        merges=[tuple(pair) for pair in trained["merges"]],
        model_max_length=32768,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL_TOKENS})
    tokenizer.chat_template = CHAT_TEMPLATE
    if flavour == "embedding":
        _append_end_of_text(tokenizer)
    return tokenizer


def _append_end_of_text(tokenizer) -> None:
    """Make the tokenizer append `<|endoftext|>` to every sequence when special tokens are on (a
    TemplateProcessing post-processor, saved in tokenizer.json like the released embedding checkpoints')."""
    from tokenizers import processors

    end = (END_OF_TEXT, tokenizer.convert_tokens_to_ids(END_OF_TEXT))
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {END_OF_TEXT}", pair=f"$A $B {END_OF_TEXT}", special_tokens=[end]
    )


def build_image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(
        patch_size=VISION_CONFIG["patch_size"],
        merge_size=VISION_CONFIG["spatial_merge_size"],
        temporal_patch_size=VISION_CONFIG["temporal_patch_size"],
        min_pixels=MIN_PIXELS,
        max_pixels=MAX_PIXELS,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


def build_config(tokenizer, initializer_range: float = 0.1, tie_word_embeddings: bool = True):
    from transformers import Qwen3VLConfig

    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_TOKENS}
    text_config = dict(
        TEXT_CONFIG,
        vocab_size=len(tokenizer),
        pad_token_id=ids["<|endoftext|>"],
        initializer_range=initializer_range,
    )
    vision_config = dict(
        VISION_CONFIG, out_hidden_size=TEXT_CONFIG["hidden_size"], initializer_range=initializer_range
    )
    return Qwen3VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=tie_word_embeddings,
    )


def _video_processor_config(image_processor) -> dict:
    # Written as JSON because the video processor class needs torchvision, which CPU machines here lack;
    # machines with torchvision then load a full Qwen3VLProcessor from the directory, like from the hub.
    return {
        "video_processor_type": "Qwen3VLVideoProcessor",
        "processor_class": "Qwen3VLProcessor",
        "patch_size": image_processor.patch_size,
        "temporal_patch_size": image_processor.temporal_patch_size,
        "merge_size": image_processor.merge_size,
        "image_mean": list(image_processor.image_mean),
        "image_std": list(image_processor.image_std),
        "size": {"shortest_edge": 128 * 32 * 32, "longest_edge": 768 * 32 * 32},
        "fps": 2,
        "min_frames": 4,
        "max_frames": 768,
        "do_sample_frames": True,
    }


def make_tiny_model(
    output_dir: str | Path, seed: int = 0, overwrite: bool = False, flavour: Flavour = "instruct"
) -> Path:
    """Build the tiny checkpoint of a flavour (`instruct`, `embedding`, `reranker`) into `output_dir`."""
    if flavour not in FLAVOURS:
        raise ValueError(f"unknown flavour {flavour!r}; choose one of {list(FLAVOURS)}")
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"{output_dir} is not empty; pass overwrite=True (--overwrite) to replace it"
            )
        shutil.rmtree(output_dir)
    import torch  # after the cheap checks: these imports take seconds
    from transformers import Qwen3VLForConditionalGeneration

    tokenizer = build_tokenizer(flavour=flavour)
    image_processor = build_image_processor()
    config = build_config(tokenizer, tie_word_embeddings=flavour != "reranker")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3VLForConditionalGeneration(config).eval()
    # Write into a temporary sibling, then rename: a crash never leaves a half-written checkpoint behind.
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}-", dir=output_dir.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        image_processor.save_pretrained(staging)
        (staging / "chat_template.jinja").write_text(CHAT_TEMPLATE)
        _patch_json(staging / "preprocessor_config.json", processor_class="Qwen3VLProcessor")
        (staging / "video_preprocessor_config.json").write_text(
            json.dumps(_video_processor_config(image_processor), indent=2, sort_keys=True) + "\n"
        )
        try:
            staging.rename(output_dir)  # atomic; fails if another process filled output_dir meanwhile
        except OSError as exc:
            if not overwrite:
                raise FileExistsError(f"{output_dir} was written by another process meanwhile") from exc
            shutil.rmtree(output_dir)
            staging.rename(output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output_dir


def _patch_json(path: Path, **updates) -> None:
    data = json.loads(path.read_text())
    data.update(updates)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
