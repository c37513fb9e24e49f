"""The vision tower in the packed layout: all images of a step through the model's own vision blocks together.

The model's `get_image_features` runs per batch, but its attention (outside transformers' flash path) makes one
call per image per block, and it redoes the position interpolation on the host for every call. Here:
- images go in groups of at most `patches_per_call` patches (`image_groups`), each group through every block
  with one varlen attention call (`pipelines.varlen`) for all its frames: bounded memory, few launches;
- the position embeddings and rotary angles of each image size are computed once and kept on the device
  (`ImagePositions`), since they depend only on the size and the frozen weights.
Both were measured on an H200 (benchmarks/NOTES.md, rows 5 and 6: 2B images 233 -> 363 items/s with the
larger groups and the position cache). A transformers version without the helpers used here falls back to the
model's own tower (`PackedVision.for_model` returns None).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import numpy as np
import torch

from pipelines.varlen import Backend, Segments, with_varlen_attention

# the vision tower over groups of images of at most this many patches (memory; NOTES row 5)
PATCHES_PER_CALL = 32768
# image sizes whose position embeddings and rotary angles stay on the device (`ImagePositions`): ~2.5 KiB a
# patch in bf16, so at most ~160 MiB
POSITION_CACHE_PATCHES = 65536


def host_to(t: torch.Tensor, device, dtype=None) -> torch.Tensor:
    """Copy a host tensor to `device`; through pinned memory without waiting, when it is a GPU."""
    device = torch.device(device)
    if device.type == "cuda" and not t.is_cuda and not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, dtype=dtype, non_blocking=True)


def image_groups(grid: torch.Tensor, max_patches: int) -> list[slice]:
    """Consecutive images in groups of at most `max_patches` patches (an image larger than that: alone)."""
    groups, start, patches = [], 0, 0
    for index, count in enumerate(grid.prod(-1).tolist()):
        if index > start and patches + count > max_patches:
            groups.append(slice(start, index))
            start, patches = index, 0
        patches += count
    groups.append(slice(start, len(grid)))
    return groups


def in_groups(run: Callable, pixel_values: torch.Tensor, grid: torch.Tensor, max_patches: int):
    """`run(pixels, grid) -> (merged, deepstack)` over groups of images, concatenated in image order."""
    groups = image_groups(grid, max_patches)
    if len(groups) == 1:
        return run(pixel_values, grid)
    offsets = np.concatenate([[0], np.cumsum(grid.prod(-1).numpy())])
    outputs = [run(pixel_values[offsets[g.start] : offsets[g.stop]], grid[g]) for g in groups]
    merged = torch.cat([m for m, _ in outputs])
    deepstack = [torch.cat(parts) for parts in zip(*(d for _, d in outputs), strict=True)]
    return merged, deepstack


def vision_helpers(model):
    """transformers' vision helpers this module needs, or None where this version lacks them."""
    import importlib

    visual = getattr(model, "visual", None)
    try:
        helpers = importlib.import_module("transformers.vision_utils")
        for name in ("get_vision_position_ids", "get_vision_interpolation_indices_and_weights"):
            getattr(helpers, name)
        visual.num_grid_per_side, visual.interpolation_mode  # noqa: B018
    except (ImportError, AttributeError):
        return None
    return helpers


class PackedVision:
    """The model's own vision blocks over packed images, with varlen attention (see the module docstring)."""

    def __init__(self, visual, helpers, backend: Backend, call: Callable):
        self.visual = visual
        self.backend = backend
        self.call = call  # how a block is called: eagerly, or through the compiled region
        self.blocks = [with_varlen_attention(block, "attn") for block in visual.blocks]
        self.positions = ImagePositions(visual, helpers)
        self.patches_per_call = PATCHES_PER_CALL

    @classmethod
    def for_model(cls, model, backend: Backend, call: Callable) -> PackedVision | None:
        helpers = vision_helpers(model)
        return None if helpers is None else cls(model.visual, helpers, backend, call)

    def features(self, pixel_values: torch.Tensor, grid: torch.Tensor):
        """(merged image features `[image tokens, D]`, deepstack features) for a step's images."""
        return in_groups(self.run, pixel_values, grid, self.patches_per_call)

    def run(self, pixel_values: torch.Tensor, grid: torch.Tensor):
        visual = self.visual
        device = pixel_values.device
        sizes = [tuple(row) for row in grid.tolist()]  # (t, h, w) per image, on the host: no device syncs
        # attention runs within each frame of each image, as in the model (`get_vision_cu_seqlens`)
        segments = Segments.from_lengths([h * w for t, h, w in sizes for _ in range(t)], device)
        hidden = visual.patch_embed(pixel_values)
        position_embeds, cos, sin = self.positions.lookup(sizes, hidden.dtype, device)
        hidden = hidden + position_embeds
        kwargs = dict(
            cu_seqlens=segments.cu_seqlens,
            max_seqlen=segments.max_seqlen,
            position_embeddings=(cos, sin),
            segments=segments,
            varlen_backend=self.backend,
        )
        deepstack = []
        for index, block in enumerate(self.blocks):
            hidden = self.call(block, hidden, **kwargs)
            if index in visual.deepstack_visual_indexes:
                merger = visual.deepstack_merger_list[visual.deepstack_visual_indexes.index(index)]
                deepstack.append(merger(hidden))
        return visual.merger(hidden), deepstack


class ImagePositions:
    """Per image size `(t, h, w)`: its interpolated position embeddings and the rotary cos/sin of its patches.

    They depend only on the size (and the frozen weights), yet computing them takes index arithmetic on the
    host (about 17 ms for 41 images of 448x448 on a slow core) and a dozen small kernels per group of images.
    So each size is computed once, kept on the device, and a group is the concatenation of its images' entries.
    Bounded: at most `max_patches` patches are kept, the least recently used size goes first."""

    def __init__(self, visual, helpers, max_patches: int = POSITION_CACHE_PATCHES):
        self.visual = visual
        self.helpers = helpers
        self.max_patches = max_patches
        self._entries: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = OrderedDict()

    @property
    def patches(self) -> int:
        return sum(entry[0].shape[0] for entry in self._entries.values())

    def lookup(self, sizes: list[tuple], dtype: torch.dtype, device) -> tuple[torch.Tensor, ...]:
        """`(position_embeds [P, D] in dtype, cos [P, d], sin [P, d])` for images of these sizes, in order."""
        wanted = {}
        for size in sizes:
            if size not in wanted:
                wanted[size] = self._entries.get(size)
        missing = [size for size, entry in wanted.items() if entry is None or entry[0].dtype != dtype]
        if missing:
            wanted.update(zip(missing, self._compute(missing, dtype, device), strict=True))
        for size, entry in wanted.items():
            self._entries[size] = entry
            self._entries.move_to_end(size)
        self._evict()
        parts = [wanted[size] for size in sizes]
        if len(parts) == 1:
            return parts[0]
        return tuple(torch.cat(column) for column in zip(*parts, strict=True))

    def _compute(self, sizes: list[tuple], dtype: torch.dtype, device) -> list[tuple[torch.Tensor, ...]]:
        visual, helpers = self.visual, self.helpers
        grid = torch.tensor(sizes, dtype=torch.long)
        indices, weights = helpers.get_vision_interpolation_indices_and_weights(
            grid,
            num_grid_per_side=visual.num_grid_per_side,
            mode=visual.interpolation_mode,
            align_corners=visual.interpolation_align_corners,
            spatial_merge_size=visual.config.spatial_merge_size,
        )
        positions = helpers.get_vision_position_ids(grid, visual.spatial_merge_size)
        embeds = (visual.pos_embed(host_to(indices, device)) * host_to(weights, device)[:, :, None]).sum(1)
        embeds = embeds.to(dtype)
        cos, sin = visual.rotary_pos_emb(embeds, host_to(positions, device))
        counts = [t * h * w for t, h, w in sizes]
        columns = [[part.clone() for part in tensor.split(counts)] for tensor in (embeds, cos, sin)]
        return list(zip(*columns, strict=True))  # clones: an evicted size frees its own memory

    def _evict(self) -> None:
        total = self.patches
        while total > self.max_patches and len(self._entries) > 1:
            _, entry = self._entries.popitem(last=False)
            total -= entry[0].shape[0]
