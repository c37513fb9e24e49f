"""Useful FLOPs and the measured matmul ceiling, the two halves of MFU.

MFU = useful FLOPs / time / ceiling (BENCHMARK.md). Useful FLOPs count only what the embedding needs, whatever a
recipe actually runs (padding, the LM head and layers past the chosen one are waste, not work):
- decoder layers: 2 x (parameters of the layers up to the chosen one) x real tokens, plus causal attention:
  per layer, per head, a sequence of n tokens has n(n+1)/2 query-key pairs, each 2 x head_dim multiply-adds for
  the scores and 2 x head_dim for the weighted values: 4 x heads x head_dim x n(n+1)/2;
- the vision tower, for images: 2 x (block + patch-embedding parameters) x patches, bidirectional attention
  4 x heads x head_dim x (patches per frame)^2 per block and frame, and 2 x (merger + deepstack merger
  parameters) x merged tokens.
Embedding lookups, norms' arithmetic and pooling are left out (they are not matmuls and are negligible).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


@dataclass(frozen=True)
class Costs:
    """The parameter counts and attention shapes that useful FLOPs are computed from."""

    layer_params: int  # all decoder layers that run
    layers: int
    heads: int
    head_dim: int
    vision_params: int = 0  # all vision blocks + the patch embedding (per patch)
    vision_blocks: int = 0
    vision_heads: int = 0
    vision_head_dim: int = 0
    merger_params: int = 0  # merger + deepstack mergers (per merged token)
    merge_unit: int = 4  # patches per merged token

    @classmethod
    def of(cls, model, layer: int = -1) -> Costs:
        """From a loaded model (the base model or the generation class), counting layers up to `layer`."""
        from pipelines.forward import resolve_layer
        from pipelines.loading import base_model_of

        base = base_model_of(model)
        text = base.config.text_config
        run = resolve_layer(base, layer)
        costs = dict(
            layer_params=sum(_params(layer) for layer in base.language_model.layers[:run]),
            layers=run,
            heads=text.num_attention_heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
        )
        visual = getattr(base, "visual", None)
        if visual is not None:
            vision = base.config.vision_config
            costs.update(
                vision_params=sum(_params(block) for block in visual.blocks) + _params(visual.patch_embed),
                vision_blocks=len(visual.blocks),
                vision_heads=vision.num_heads,
                vision_head_dim=vision.hidden_size // vision.num_heads,
                merger_params=_params(visual.merger) + _params(visual.deepstack_merger_list),
                merge_unit=vision.spatial_merge_size**2,
            )
        return cls(**costs)


def item_flops(costs: Costs, num_tokens: int, grid_thw: Sequence[int] | None = None) -> float:
    """Useful FLOPs of one item of `num_tokens` tokens, with an image of `grid_thw` patches if given."""
    n = num_tokens
    flops = 2.0 * costs.layer_params * n + costs.layers * 4.0 * costs.heads * costs.head_dim * n * (n + 1) / 2
    if grid_thw is not None:
        t, h, w = (int(x) for x in grid_thw)
        patches = t * h * w
        flops += 2.0 * costs.vision_params * patches
        flops += costs.vision_blocks * 4.0 * costs.vision_heads * costs.vision_head_dim * t * (h * w) ** 2
        flops += 2.0 * costs.merger_params * patches / costs.merge_unit
    return flops


def workload_flops(costs: Costs, items) -> float:
    """Useful FLOPs of prepared items (`pipelines.prepare.PreparedItem`)."""
    total = 0.0
    for item in items:
        grids = item.image_grids
        total += item_flops(costs, item.num_tokens, grids[0] if len(grids) else None)
        total += sum(item_flops(costs, 0, grid) for grid in grids[1:])  # the vision tower of further images
    return total


def matmul_ceiling(device, dtype, size: int | None = None, repeats: int = 10) -> dict:
    """The measured matmul rate (FLOP/s) on `device` in `dtype`: the median of `repeats` products of random
    `size`^3 matrices after warm-up (8192 on a GPU, 512 on a CPU), timed with device events on a GPU."""
    import torch

    device = torch.device(device)
    size = size or (8192 if device.type == "cuda" else 512)
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    times = []
    for step in range(3 + repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.mm(a, b)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1000
        else:
            began = time.perf_counter()
            torch.mm(a, b)
            seconds = time.perf_counter() - began
        if step >= 3:
            times.append(seconds)
    median = statistics.median(times)
    return {"flops_per_s": 2.0 * size**3 / median, "size": size, "dtype": str(dtype), "seconds": median}
