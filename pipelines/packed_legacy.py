"""The previous packed engine (`engine: legacy`): the packed layout with each decoder layer and vision block
re-composed from its parts around the varlen attention call.

Kept selectable, one option away, until the default engine (`pipelines.packed.PackedForward`, the model's own
layers through transformers' `AttentionInterface`) is measured on a GPU against the README's figures: this is
the engine those figures were measured with (benchmarks/NOTES.md). It reads the layers' submodules and
transformers' rotary helpers directly (`self_attn.q_proj`, `attn.qkv`, `apply_rotary_pos_emb`, ...), which ties
it to one transformers release's module layout; `compile` compiles the two halves of each layer and block
around attention (four graphs for the whole model), and the per-token second half of a layer runs over at most
`tokens_per_call` tokens at a time (the MLP's intermediate states are the largest tensors by far).
"""

from __future__ import annotations

import importlib
from functools import cache

import torch

from pipelines.forward import decoder_states
from pipelines.packed import PackedBatch, PackedEngine
from pipelines.varlen import Segments, attention
from pipelines.vision import PATCHES_PER_CALL, ImagePositions, in_groups, vision_helpers

TOKENS_PER_CALL = 16384


def _text_qkv(layer, hidden, cos, sin, rotary):
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    shape = (hidden.shape[0], -1, attn.head_dim)
    q = attn.q_norm(attn.q_proj(x).view(shape))
    k = attn.k_norm(attn.k_proj(x).view(shape))
    v = attn.v_proj(x).view(shape)
    q, k = rotary(q, k, cos, sin, unsqueeze_dim=1)
    return q, k, v


def _text_out(layer, hidden, attended):
    hidden = hidden + layer.self_attn.o_proj(attended.reshape(hidden.shape[0], -1))
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


def _vision_qkv(block, hidden, cos, sin, rotary):
    attn = block.attn
    x = block.norm1(hidden)
    q, k, v = attn.qkv(x).reshape(hidden.shape[0], 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = rotary(q, k, cos, sin)
    return q, k, v


def _vision_out(block, hidden, attended):
    hidden = hidden + block.attn.proj(attended.reshape(hidden.shape[0], -1))
    return hidden + block.mlp(block.norm2(hidden))


_HALVES = {"text_qkv": _text_qkv, "text_out": _text_out, "vision_qkv": _vision_qkv, "vision_out": _vision_out}


@cache
def _compiled_halves() -> dict:
    """One compiled function per half for the whole process: every layer, every embedder and every model of
    the same shapes reuses its graphs (a fresh `torch.compile` wrapper would compile them again)."""
    return {name: torch.compile(fn, dynamic=True) for name, fn in _HALVES.items()}


def _in_chunks(fn, module, hidden: torch.Tensor, attended: torch.Tensor, size: int) -> torch.Tensor:
    if hidden.shape[0] <= size:
        return fn(module, hidden, attended)
    parts = zip(hidden.split(size), attended.split(size), strict=True)
    return torch.cat([fn(module, h, a) for h, a in parts])


class LegacyPackedForward(PackedEngine):
    """The base model up to a layer, in the packed layout, with the layers re-composed (module docstring)."""

    def __init__(self, model, **options):
        super().__init__(model, **options)
        self._text_rotary = importlib.import_module(type(model.language_model.layers[0]).__module__)
        self._vision = _VisionPreamble.for_model(model)
        self.tokens_per_call = TOKENS_PER_CALL
        self.patches_per_call = PATCHES_PER_CALL

    @property
    def _halves(self) -> dict:
        return _compiled_halves() if self.compile else _HALVES

    def hidden_states(self, batch: PackedBatch, segments: Segments) -> torch.Tensor:
        """`hidden_states[layer]` for every packed token, `[T, D]` (see `pipelines.forward`)."""
        language_model = self.model.language_model
        embeds, deepstack = self._embeddings(batch)
        if self.layer == 0:
            return embeds
        cos, sin = language_model.rotary_emb(embeds.unsqueeze(0), batch.position_ids.unsqueeze(1))
        cos, sin = cos[0], sin[0]
        rotary = self._text_rotary.apply_rotary_pos_emb
        qkv, out = self._halves["text_qkv"], self._halves["text_out"]

        def run_layer(index: int, hidden: torch.Tensor) -> torch.Tensor:
            decoder_layer = language_model.layers[index]
            q, k, v = qkv(decoder_layer, hidden, cos, sin, rotary)
            scale = decoder_layer.self_attn.scaling
            attended = attention(q, k, v, segments, causal=True, scale=scale, backend=self.backend)
            return _in_chunks(out, decoder_layer, hidden, attended, self.tokens_per_call)

        def add_deepstack(hidden: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
            return hidden.index_add(0, batch.image_positions, features)

        return decoder_states(language_model, embeds, self.layer, deepstack, run_layer, add_deepstack)

    def _image_features(self, batch: PackedBatch):
        if self._vision is None:
            return self._model_image_features(batch)

        def run(pixels, grid):
            return self._vision.run(self, pixels, grid)

        return in_groups(run, batch.pixel_values, batch.image_grid_thw, self.patches_per_call)


class _VisionPreamble:
    """The vision tower in the packed layout: its own patch embedding, position interpolation and mergers,
    with the blocks' attention through one varlen call for all images of the step."""

    def __init__(self, visual, helpers, rotary):
        self.visual = visual
        self.rotary = rotary
        self.positions = ImagePositions(visual, helpers)

    @classmethod
    def for_model(cls, model) -> _VisionPreamble | None:
        helpers = vision_helpers(model)
        try:
            rotary = importlib.import_module(type(model.visual).__module__).apply_rotary_pos_emb_vision
        except (ImportError, AttributeError):
            return None
        return None if helpers is None else cls(model.visual, helpers, rotary)

    def run(self, owner: LegacyPackedForward, pixel_values: torch.Tensor, grid: torch.Tensor):
        visual = self.visual
        device = pixel_values.device
        sizes = [tuple(row) for row in grid.tolist()]
        segments = Segments.from_lengths([h * w for t, h, w in sizes for _ in range(t)], device)
        hidden = visual.patch_embed(pixel_values)
        position_embeds, cos, sin = self.positions.lookup(sizes, hidden.dtype, device)
        hidden = hidden + position_embeds
        qkv, out = owner._halves["vision_qkv"], owner._halves["vision_out"]
        deepstack = []
        for index, block in enumerate(visual.blocks):
            q, k, v = qkv(block, hidden, cos, sin, self.rotary)
            attended = attention(
                q, k, v, segments, causal=False, scale=block.attn.scaling, backend=owner.backend
            )
            hidden = _in_chunks(out, block, hidden, attended, owner.tokens_per_call)
            if index in visual.deepstack_visual_indexes:
                merger = visual.deepstack_merger_list[visual.deepstack_visual_indexes.index(index)]
                deepstack.append(merger(hidden))
        return visual.merger(hidden), deepstack
