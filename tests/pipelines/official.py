"""The official Qwen3-VL-Embedding and -Reranker procedures, rebuilt here without anything from `pipelines/`.

Read from the authors' code (`QwenLM/Qwen3-VL-Embedding`: `src/models/qwen3_vl_embedding.py`,
`src/models/qwen3_vl_reranker.py`) and the `qwen_vl_utils.fetch_image` they call, and written out again step by
step, so that a test comparing `pipelines` with these functions cannot share our assumptions:
- a conversation: the instruction (stripped, a "." added unless it ends in Unicode punctuation) as the system
  message, the user message with each image and then the text;
- `apply_chat_template(..., add_generation_prompt=True, tokenize=False)`, then the processor on that text with
  special tokens on (the tokenizer's post-processor decides what it appends), right padding, `do_resize=False`
  on images that were already composited on white (RGBA), resized to multiples of 32 within the pixel bounds
  and resampled with PIL's default filter;
- the base model's `last_hidden_state` at the last attended position, L2-normalised.
The report (section 2) adds that the sequence ends in a "PAD" (`<|endoftext|>`) token, whose hidden state is
the vector: where the tokenizer does not append it (an Instruct checkpoint), it is appended to the prompt here.

torchvision (which `qwen_vl_utils` and the processor's video half import) cannot be installed on these CPUs,
so the processor is built without a video processor; images and text go through it unchanged.
"""

from __future__ import annotations

import math
import unicodedata

import torch

EMBEDDING_DEFAULT_INSTRUCTION = "Represent the user's input."
QUERY_INSTRUCTION = "Retrieve images or text relevant to the user's query."
MIN_PIXELS = 4 * 32 * 32
MAX_PIXELS = 1800 * 32 * 32
PAD_TOKEN = "<|endoftext|>"
RERANKER_SYSTEM = (
    "Judge whether the Document meets the requirements based on the Query and the Instruct provided. "
    'Note that the answer can only be "yes" or "no".'
)
RERANKER_DEFAULT_INSTRUCTION = "Given a search query, retrieve relevant candidates that answer the query."


def processor_from_parts(tokenizer, image_processor, padding_side: str):
    """A `Qwen3VLProcessor` of the checkpoint's tokenizer, image processor and chat template."""
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    class ImageTextProcessor(Qwen3VLProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    tokenizer.padding_side = padding_side
    return ImageTextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=None,
        chat_template=tokenizer.chat_template,
    )


def processor_of(directory, padding_side: str):
    """`processor_from_parts` of a checkpoint directory's own tokenizer and image processor."""
    from transformers import AutoImageProcessor, AutoTokenizer

    return processor_from_parts(
        AutoTokenizer.from_pretrained(directory),
        AutoImageProcessor.from_pretrained(directory, backend="pil"),
        padding_side=padding_side,
    )


def embedding_reference(directory):
    """A function from conversations to the official vectors `[n, D]` (numpy) of a checkpoint directory."""
    from transformers import Qwen3VLModel

    model = Qwen3VLModel.from_pretrained(directory, dtype=torch.float32).eval()
    processor = processor_of(directory, "right")
    return lambda conversations: official_embeddings(model, processor, conversations)[0].numpy()


def reranker_reference(directory):
    """A function (query, documents, instruction=None) -> the official scores of a checkpoint directory."""
    import numpy as np
    from transformers import Qwen3VLForConditionalGeneration

    model = Qwen3VLForConditionalGeneration.from_pretrained(directory, dtype=torch.float32).eval()
    processor = processor_of(directory, "left")
    return lambda query, documents, instruction=None: np.array(
        official_rerank_scores(model, processor, query, documents, instruction)
    )


def _with_period(instruction: str) -> str:
    instruction = instruction.strip()
    if instruction and not unicodedata.category(instruction[-1]).startswith("P"):
        instruction = instruction + "."
    return instruction


def _ceil(x: float, f: int) -> int:
    return math.ceil(x / f) * f


def _floor(x: float, f: int) -> int:
    return math.floor(x / f) * f


def fetch_image(image, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS, factor: int = 32):
    """An image as `qwen_vl_utils.fetch_image` hands it to the processor: RGBA on white, then resized so both
    sides are multiples of `factor` and the area lies within the bounds."""
    from PIL import Image

    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.split()[3])
        image = background
    else:
        image = image.convert("RGB")
    width, height = image.size
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = _floor(height / beta, factor), _floor(width / beta, factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = _ceil(height * beta, factor), _ceil(width * beta, factor)
    return image.resize((w, h))


def embedding_conversation(text=None, image=None, instruction=None, default=EMBEDDING_DEFAULT_INSTRUCTION):
    if instruction:
        instruction = _with_period(instruction)
    content = []
    if image is not None:
        content.append({"type": "image", "image": image})
    if text is not None:
        content.append({"type": "text", "text": text})
    if not content:
        content.append({"type": "text", "text": "NULL"})
    return [
        {"role": "system", "content": [{"type": "text", "text": instruction or default}]},
        {"role": "user", "content": content},
    ]


def _images_of(conversations) -> list:
    return [
        fetch_image(part["image"])
        for conversation in conversations
        for message in conversation
        for part in message["content"]
        if part["type"] == "image"
    ]


def embedding_inputs(processor, conversations):
    """The processor's inputs for a batch of conversations, each ending in one <|endoftext|>."""
    texts = processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=False)
    pad = processor.tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    probe = processor.tokenizer(texts[0])["input_ids"]
    if probe[-1] != pad:  # a tokenizer that does not append it: append it as the report's template does
        texts = [text + PAD_TOKEN for text in texts]
    images = _images_of(conversations) or None
    return processor(text=texts, images=images, padding=True, do_resize=False, return_tensors="pt")


def last_attended(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The official `_pooling_last`: the hidden state at each row's last attended position."""
    flipped = attention_mask.flip(dims=[1]).argmax(dim=1)
    col = attention_mask.shape[1] - flipped - 1
    return hidden[torch.arange(hidden.shape[0]), col]


@torch.no_grad()
def official_embeddings(base_model, processor, conversations):
    """(L2-normalised vectors [n, D], the input ids [n, L], the attention mask) for the conversations."""
    inputs = embedding_inputs(processor, conversations)
    out = base_model(**inputs, use_cache=False)
    pooled = last_attended(out.last_hidden_state.float(), inputs["attention_mask"])
    return torch.nn.functional.normalize(pooled, p=2, dim=-1), inputs["input_ids"], inputs["attention_mask"]


def _reranker_content(text, image, prefix: str) -> list:
    content = [{"type": "text", "text": prefix}]
    if text is None and image is None:
        content.append({"type": "text", "text": "NULL"})
        return content
    if image is not None:
        content.append({"type": "image", "image": image})
    if text is not None:
        content.append({"type": "text", "text": text})
    return content


def reranker_conversation(query: dict, document: dict, instruction=None):
    """The official `format_mm_instruction`: the judge system prompt, then instruct, query and document."""
    contents = [{"type": "text", "text": "<Instruct>: " + (instruction or RERANKER_DEFAULT_INSTRUCTION)}]
    contents += _reranker_content(query.get("text"), query.get("image"), "<Query>:")
    contents += _reranker_content(document.get("text"), document.get("image"), "\n<Document>:")
    return [
        {"role": "system", "content": [{"type": "text", "text": RERANKER_SYSTEM}]},
        {"role": "user", "content": contents},
    ]


@torch.no_grad()
def official_rerank_scores(generation_model, processor, query: dict, documents: list[dict], instruction=None):
    """The official `Qwen3VLReranker.process`: one pair at a time, left padding, the base model's last hidden
    state at the last position, through a linear layer of the LM head's "yes" row minus its "no" row, then a
    sigmoid."""
    vocab = processor.tokenizer.get_vocab()
    weight = generation_model.lm_head.weight
    linear = (weight[vocab["yes"]] - weight[vocab["no"]]).float()
    scores = []
    for document in documents:
        conversation = reranker_conversation(query, document, instruction)
        text = processor.apply_chat_template([conversation], tokenize=False, add_generation_prompt=True)
        images = _images_of([conversation]) or None
        inputs = processor(text=text, images=images, padding=True, do_resize=False, return_tensors="pt")
        hidden = generation_model.model(**inputs, use_cache=False).last_hidden_state[:, -1].float()
        scores.append(float(torch.sigmoid(hidden @ linear)[0]))
    return scores
