"""The GPU half of embedding: collate prepared items into a padded batch and run the base model up to a layer.

`hidden_states_at(model, batch, layer)` returns exactly what `output_hidden_states=True` would put at
`hidden_states[layer]`, without the LM head, without a KV cache, and without running the layers after it:
- `0` is the token embeddings (with the image features scattered in),
- `1 .. L-1` is the output of decoder layer `k-1`, before the deepstack visual features are added to it,
- `L` (or `-1`) is the output of the last layer after the final norm.

`decoder_states` is that rule as one layer loop, shared by every engine (`pipelines.engine`): how a layer is
called and how the deepstack features are added depend on the layout, the order does not.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from pipelines.prepare import PreparedItem


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    position_ids: torch.Tensor  # [3, B, L]
    pixel_values: torch.Tensor | None = None  # [patches, D]
    image_grid_thw: torch.Tensor | None = None  # [images, 3]

    def to(self, device, dtype=None) -> Batch:
        pixels = self.pixel_values
        if pixels is not None:
            pixels = pixels.to(device, dtype=dtype or pixels.dtype, non_blocking=True)
        grid = self.image_grid_thw.to(device) if self.image_grid_thw is not None else None
        return Batch(
            input_ids=self.input_ids.to(device, non_blocking=True),
            attention_mask=self.attention_mask.to(device, non_blocking=True),
            position_ids=self.position_ids.to(device, non_blocking=True),
            pixel_values=pixels,
            image_grid_thw=grid,
        )


def collate(items: list[PreparedItem], pad_token_id: int, padding_side: str = "right") -> Batch:
    """Pad a list of prepared items into one batch (on the CPU)."""
    if not items:
        raise ValueError("cannot collate an empty batch")
    longest = max(item.num_tokens for item in items)
    input_ids = np.full((len(items), longest), pad_token_id, np.int64)
    mask = np.zeros((len(items), longest), np.int64)
    positions = np.zeros((3, len(items), longest), np.int64)
    for row, item in enumerate(items):
        n = item.num_tokens
        cols = slice(longest - n, longest) if padding_side == "left" else slice(0, n)
        input_ids[row, cols] = item.input_ids
        mask[row, cols] = 1
        positions[:, row, cols] = item.position_ids
    images = [item for item in items if item.pixel_values is not None]
    pixel_values = grid = None
    if images:
        pixel_values = torch.from_numpy(np.concatenate([item.pixel_values for item in images]))
        grid = torch.from_numpy(np.concatenate([item.image_grids for item in images]))
    return Batch(
        input_ids=torch.from_numpy(input_ids),
        attention_mask=torch.from_numpy(mask),
        position_ids=torch.from_numpy(positions),
        pixel_values=pixel_values,
        image_grid_thw=grid,
    )


def num_hidden_states(model) -> int:
    return model.config.text_config.num_hidden_layers + 1


def resolve_layer(model, layer: int) -> int:
    """A `hidden_states` index (negative allowed) as a number in 0..num_layers; out of range is an error."""
    total = num_hidden_states(model)
    if not -total <= layer < total:
        raise ValueError(
            f"layer={layer} is out of range for a model with {total - 1} layers (-{total}..{total - 1})"
        )
    return layer % total


def _image_features(model, batch: Batch, embeds: torch.Tensor):
    """Run the vision tower once for all images of the batch; scatter its output into the token embeddings."""
    out = model.get_image_features(batch.pixel_values, batch.image_grid_thw, return_dict=True)
    image_embeds = torch.cat(out.pooler_output, dim=0).to(embeds.device, embeds.dtype)
    image_mask = batch.input_ids == model.config.image_token_id
    if int(image_mask.sum()) != image_embeds.shape[0]:
        raise ValueError(f"{int(image_mask.sum())} image tokens but {image_embeds.shape[0]} image features")
    embeds = embeds.masked_scatter(image_mask.unsqueeze(-1), image_embeds)
    deepstack = [
        torch.cat(features, dim=0).to(embeds.device, embeds.dtype) for features in out.deepstack_features
    ]
    return embeds, image_mask, deepstack


def decoder_states(
    language_model,
    hidden: torch.Tensor,
    target: int,
    deepstack: list[torch.Tensor],
    run_layer: Callable[[int, torch.Tensor], torch.Tensor],
    add_deepstack: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """`hidden_states[target]` from the token embeddings `hidden`: `run_layer(k, hidden)` runs decoder layer `k`,
    `add_deepstack(hidden, features)` adds layer `k`'s deepstack features (after layers 0 .. len(deepstack)-1)."""
    num_layers = len(language_model.layers)
    for index in range(target):
        hidden = run_layer(index, hidden)
        # hidden_states[k] is taken before the deepstack features are added, except for the last layer
        is_captured = index == target - 1 and target < num_layers
        if index < len(deepstack) and not is_captured:
            hidden = add_deepstack(hidden, deepstack[index])
    if target == num_layers:
        hidden = language_model.norm(hidden)
    return hidden


@torch.inference_mode()
def hidden_states_at(model, batch: Batch, layer: int) -> torch.Tensor:
    """`hidden_states[layer]` of the base model for a padded batch, running only the layers it needs."""
    from transformers.masking_utils import create_causal_mask

    target = resolve_layer(model, layer)
    language_model = model.language_model
    embeds = language_model.embed_tokens(batch.input_ids)
    image_mask, deepstack = None, []
    if batch.pixel_values is not None:
        embeds, image_mask, deepstack = _image_features(model, batch, embeds)
    if target == 0:
        return embeds
    mask = create_causal_mask(
        config=language_model.config,
        inputs_embeds=embeds,
        attention_mask=batch.attention_mask,
        cache=None,
        position_ids=None,
    )
    position_embeddings = language_model.rotary_emb(embeds, batch.position_ids)

    def run_layer(index: int, hidden: torch.Tensor) -> torch.Tensor:
        return language_model.layers[index](
            hidden,
            attention_mask=mask,
            position_ids=None,
            cache=None,
            position_embeddings=position_embeddings,
        )

    def add_deepstack(hidden: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return language_model._deepstack_process(hidden, image_mask, features)

    return decoder_states(language_model, embeds, target, deepstack, run_layer, add_deepstack)
