"""An independent reference: the generation class's plain forward with output_hidden_states=True, run on one
unpadded item whose inputs are built the way Qwen3VLProcessor builds them, and pooling written out by hand."""

from __future__ import annotations

import numpy as np
import torch

VISION = "<|vision_start|><|image_pad|><|vision_end|>"


def reference_inputs(
    tokenizer, image_processor, prompt: str, image=None, min_pixels=64 * 64, max_pixels=1280 * 32 * 32
):
    inputs = {}
    if image is not None:
        processed = image_processor(
            images=[image],
            size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
            return_tensors="pt",
        )
        count = int(processed["image_grid_thw"][0].prod()) // image_processor.merge_size**2
        prompt = prompt.replace("<|image_pad|>", "<|image_pad|>" * count)
        inputs["pixel_values"] = processed["pixel_values"]
        inputs["image_grid_thw"] = processed["image_grid_thw"]
    encoded = tokenizer([prompt], add_special_tokens=False, return_tensors="pt")
    inputs["input_ids"] = encoded["input_ids"]
    inputs["attention_mask"] = encoded["attention_mask"]
    image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    inputs["mm_token_type_ids"] = (encoded["input_ids"] == image_id).int()
    return inputs


def reference_embedding(
    generation_model, inputs, layer: int, pooling: str, normalize: bool = True
) -> np.ndarray:
    with torch.no_grad():
        out = generation_model(**inputs, output_hidden_states=True, use_cache=False)
    states = out.hidden_states[layer][0].float()  # [tokens, hidden], no padding
    if pooling == "mean":
        vector = states.sum(dim=0) / states.shape[0]
    elif pooling == "max":
        vector = states.max(dim=0).values
    elif pooling == "cls":
        vector = states[0]
    elif pooling == "last":
        vector = states[-1]
    else:
        raise ValueError(pooling)
    if normalize:
        vector = vector / torch.sqrt((vector * vector).sum())
    return vector.cpu().numpy()


def embed_item(text: str, image):
    """The `Embedder` item for a (text, image) case: a string, an image dict, or a text+image dict."""
    if image is None:
        return text
    return {"image": image} if not text else {"text": text, "image": image}
