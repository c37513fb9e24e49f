"""The baseline recipe of BENCHMARK.md, written the straightforward way, to measure ours against.

`Qwen3VLForConditionalGeneration` (with its LM head, and its default KV cache), batches of 32 (8 for images)
in input order, each padded on the right to its longest item, `output_hidden_states=True`, the last hidden
state, a masked mean, L2 normalisation, a copy to the host per batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from pipelines.prepare import PreparedItem

TEXT_BATCH = 32
IMAGE_BATCH = 8


def batch_size_for(items: Sequence[PreparedItem]) -> int:
    return IMAGE_BATCH if any(item.pixel_values is not None for item in items) else TEXT_BATCH


@torch.inference_mode()
def baseline_embed(
    generation_model, items: Sequence[PreparedItem], pad_token_id: int, batch_size: int | None = None
) -> np.ndarray:
    """Vectors `[n, hidden]` for prepared items, the baseline way (the model computes its own positions)."""
    batch_size = batch_size or batch_size_for(items)
    device = generation_model.device
    dtype = generation_model.dtype
    image_token_id = generation_model.config.image_token_id
    vectors = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        longest = max(item.num_tokens for item in chunk)
        ids = np.full((len(chunk), longest), pad_token_id, np.int64)
        mask = np.zeros((len(chunk), longest), np.int64)
        for row, item in enumerate(chunk):
            ids[row, : item.num_tokens] = item.input_ids
            mask[row, : item.num_tokens] = 1
        input_ids = torch.from_numpy(ids).to(device)
        attention_mask = torch.from_numpy(mask).to(device)
        inputs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "mm_token_type_ids": (input_ids == image_token_id).int(),
        }
        images = [item for item in chunk if item.pixel_values is not None]
        if images:
            pixels = np.concatenate([item.pixel_values for item in images])
            inputs["pixel_values"] = torch.from_numpy(pixels).to(device, dtype)
            grid = np.concatenate([item.image_grids for item in images])
            inputs["image_grid_thw"] = torch.from_numpy(grid).to(device)
        out = generation_model(**inputs, output_hidden_states=True)
        last = out.hidden_states[-1].float()
        keep = attention_mask.bool().unsqueeze(-1)
        mean = last.masked_fill(~keep, 0.0).sum(dim=1) / keep.sum(dim=1)
        vectors.append(torch.nn.functional.normalize(mean, dim=-1).cpu().numpy())
    return np.concatenate(vectors)
