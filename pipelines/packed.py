"""The packed layout: the sequences of a step laid end to end in one row, with no padding at all.

The padded layout (`pipelines.forward`) makes every item of a batch as long as the longest one and runs the
model's own layers with a `[B, L, L]` mask. Here a batch is one row of `T = sum(lengths)` tokens: each item keeps
its own M-RoPE positions, and attention runs per sequence through a variable-length kernel
(`pipelines.varlen`), so no FLOP is spent on padding and no mask is built. The images of the step go through
the vision tower together (in groups of up to `PATCHES_PER_CALL` patches), with one varlen attention call per
block over all their patches instead of one call per image.

The layers are the model's own modules (projections, norms, MLP); only the attention core and the data layout
differ, so the packed path computes the function the padded path computes (float32: <= 1e-5, tested).
With `compile=True`, the two halves of each decoder layer and vision block around attention are compiled once
(regional compilation, dynamic token counts) and reused by every layer, which bounds compile time.
"""

from __future__ import annotations

import importlib
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch

from pipelines.forward import resolve_layer
from pipelines.prepare import PreparedItem
from pipelines.varlen import BackendChoice, Segments, attention, resolve_backend


@dataclass
class PackedBatch:
    """One step in the packed layout, on the CPU until `.to(device)`."""

    input_ids: torch.Tensor  # [T]
    position_ids: torch.Tensor  # [3, T]
    lengths: list[int]  # tokens per item, in item order
    pixel_values: torch.Tensor | None = None  # [patches, D]
    image_grid_thw: torch.Tensor | None = None  # [images, 3], always on the CPU
    image_positions: torch.Tensor | None = None  # [image tokens]: where the image tokens are in the row

    @property
    def num_items(self) -> int:
        return len(self.lengths)

    def to(self, device, dtype=None) -> PackedBatch:
        """Copy to `device`; from pinned memory without waiting, when it is a GPU."""
        device = torch.device(device)

        pixels = self.pixel_values
        return PackedBatch(
            input_ids=_host_to(self.input_ids, device),
            position_ids=_host_to(self.position_ids, device),
            lengths=self.lengths,
            pixel_values=_host_to(pixels, device, dtype or pixels.dtype) if pixels is not None else None,
            image_grid_thw=self.image_grid_thw,
            image_positions=_host_to(self.image_positions, device)
            if self.image_positions is not None
            else None,
        )


def _host_to(t: torch.Tensor, device, dtype=None) -> torch.Tensor:
    """Copy a host tensor to `device`; through pinned memory without waiting, when it is a GPU."""
    device = torch.device(device)
    if device.type == "cuda" and not t.is_cuda and not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, dtype=dtype, non_blocking=True)


def pack(items: Sequence[PreparedItem], image_token_id: int, pin: bool = False) -> PackedBatch:
    """Lay prepared items end to end (on the CPU; where the image tokens are is found here, not on the GPU).

    `pin`: gather the pixels (the step's bulk: ~1.2 MB a 448x448 image) straight into pinned memory, one copy
    from which the GPU copies without the host waiting."""
    if not items:
        raise ValueError("cannot pack an empty batch")
    input_ids = np.concatenate([item.input_ids for item in items])
    images = [item for item in items if item.pixel_values is not None]
    pixel_values = grid = positions = None
    if images:
        parts = [torch.from_numpy(item.pixel_values) for item in images]
        shape = (sum(part.shape[0] for part in parts), *parts[0].shape[1:])
        pixel_values = torch.cat(parts, out=torch.empty(shape, dtype=parts[0].dtype, pin_memory=pin))
        grid = torch.from_numpy(np.concatenate([item.image_grids for item in images]))
        positions = torch.from_numpy(np.flatnonzero(input_ids == image_token_id))
    return PackedBatch(
        input_ids=torch.from_numpy(input_ids),
        position_ids=torch.from_numpy(np.concatenate([item.position_ids for item in items], axis=1)),
        lengths=[item.num_tokens for item in items],
        pixel_values=pixel_values,
        image_grid_thw=grid,
        image_positions=positions,
    )


def pool_packed(hidden: torch.Tensor, segments: Segments, mode: str) -> torch.Tensor:
    """One float32 vector per packed sequence of `hidden` `[T, D]` (mean, max, cls = first, last)."""
    starts = segments.cu_seqlens[:-1].long()
    ends = segments.cu_seqlens[1:].long()
    if mode == "cls":
        return hidden[starts].float()
    if mode == "last":
        return hidden[ends - 1].float()
    count, dim = len(segments.lengths), hidden.shape[-1]
    doc = segments.doc_ids().long()
    values = hidden.float()
    if mode == "mean":
        summed = torch.zeros(count, dim, dtype=torch.float32, device=hidden.device).index_add_(0, doc, values)
        return summed / (ends - starts).unsqueeze(1).to(torch.float32)
    if mode == "max":
        out = torch.full((count, dim), float("-inf"), dtype=torch.float32, device=hidden.device)
        return out.scatter_reduce_(0, doc.unsqueeze(1).expand(-1, dim), values, "amax")
    from pipelines.pooling import POOLING_MODES

    raise ValueError(f"unknown pooling {mode!r}; choose one of {POOLING_MODES}")


# -- the two halves of a decoder layer and of a vision block, around attention (what `compile` compiles) ---


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


# Memory: the per-token second half of a decoder layer (o_proj, MLP) runs over at most this many tokens at a
# time, and the vision tower over groups of images of at most this many patches, so that activations stay
# small whatever the step's token budget (the MLP's intermediate states are the largest tensors by far).
TOKENS_PER_CALL = 16384
PATCHES_PER_CALL = 32768
# image sizes whose position embeddings and rotary angles stay on the device (`_ImagePositions`): ~2.5 KiB a
# patch in bf16, so at most ~160 MiB
POSITION_CACHE_PATCHES = 65536


def _in_chunks(fn, module, hidden: torch.Tensor, attended: torch.Tensor, size: int) -> torch.Tensor:
    if hidden.shape[0] <= size:
        return fn(module, hidden, attended)
    parts = zip(hidden.split(size), attended.split(size), strict=True)
    return torch.cat([fn(module, h, a) for h, a in parts])


def _image_groups(grid: torch.Tensor, max_patches: int) -> list[slice]:
    """Consecutive images in groups of at most `max_patches` patches (an image larger than that: alone)."""
    groups, start, patches = [], 0, 0
    for index, count in enumerate(grid.prod(-1).tolist()):
        if index > start and patches + count > max_patches:
            groups.append(slice(start, index))
            start, patches = index, 0
        patches += count
    groups.append(slice(start, len(grid)))
    return groups


class PackedForward:
    """The base model up to a layer, in the packed layout, then pooling: `forward(items)` -> `[B, D]` float32."""

    def __init__(
        self,
        model,
        *,
        layer: int,
        pooling: str,
        attention: BackendChoice = "auto",
        compile: bool = False,
    ):
        self.model = model
        self.layer = resolve_layer(model, layer)
        self.pooling = pooling
        self.compile = compile
        language_model = model.language_model
        weight = language_model.embed_tokens.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.backend = resolve_backend(attention, self.device, self.dtype)
        self._text_rotary = importlib.import_module(type(language_model.layers[0]).__module__)
        self._halves = _compiled_halves() if compile else _HALVES
        self._vision = _VisionPreamble.for_model(model)
        self.tokens_per_call = TOKENS_PER_CALL
        self.patches_per_call = PATCHES_PER_CALL

    def forward(self, items: Sequence[PreparedItem]) -> torch.Tensor:
        return self.forward_packed(self._pack(items).to(self.device, self.dtype))

    def forward_steps(self, steps: Sequence[Sequence[PreparedItem]]) -> Iterator[torch.Tensor]:
        """`forward` of each step in turn, with the next step packed on a helper thread meanwhile.

        On a GPU the host's share of a step is packing (gathering ~100 MB of pixels for a step of images) and
        launching kernels; launching runs ahead of the GPU only as far as its queue allows, so packing the
        next step only after the last launch leaves the GPU idle for it. The copying releases the
        interpreter lock, so the helper thread's packing overlaps the launches. One step or none: no thread."""
        if len(steps) <= 1:
            yield from map(self.forward, steps)
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pack") as pool:
            packing = pool.submit(self._pack, steps[0])
            for step in steps[1:]:
                batch = packing.result()
                packing = pool.submit(self._pack, step)
                yield self.forward_packed(batch.to(self.device, self.dtype))
            yield self.forward_packed(packing.result().to(self.device, self.dtype))

    def _pack(self, items: Sequence[PreparedItem]) -> PackedBatch:
        return pack(items, self.model.config.image_token_id, pin=self.device.type == "cuda")

    @torch.inference_mode()
    def forward_packed(self, batch: PackedBatch) -> torch.Tensor:
        segments = Segments.from_lengths(batch.lengths, self.device)
        hidden = self.hidden_states(batch, segments)
        return pool_packed(hidden, segments, self.pooling)

    def hidden_states(self, batch: PackedBatch, segments: Segments) -> torch.Tensor:
        """`hidden_states[layer]` for every packed token, `[T, D]` (see `pipelines.forward`)."""
        language_model = self.model.language_model
        embeds = language_model.embed_tokens(batch.input_ids)
        deepstack = []
        if batch.pixel_values is not None:
            embeds, deepstack = self._scatter_image_features(batch, embeds)
        if self.layer == 0:
            return embeds
        cos, sin = language_model.rotary_emb(embeds.unsqueeze(0), batch.position_ids.unsqueeze(1))
        cos, sin = cos[0], sin[0]
        rotary = self._text_rotary.apply_rotary_pos_emb
        qkv, out = self._halves["text_qkv"], self._halves["text_out"]
        num_layers = len(language_model.layers)
        hidden = embeds
        for index in range(self.layer):
            decoder_layer = language_model.layers[index]
            q, k, v = qkv(decoder_layer, hidden, cos, sin, rotary)
            attended = attention(
                q, k, v, segments, causal=True, scale=decoder_layer.self_attn.scaling, backend=self.backend
            )
            hidden = _in_chunks(out, decoder_layer, hidden, attended, self.tokens_per_call)
            # hidden_states[k] is taken before the deepstack features are added, except for the last layer
            is_captured = index == self.layer - 1 and self.layer < num_layers
            if index < len(deepstack) and not is_captured:
                hidden = hidden.index_add(0, batch.image_positions, deepstack[index])
        if self.layer == num_layers:
            hidden = language_model.norm(hidden)
        return hidden

    def _scatter_image_features(self, batch: PackedBatch, embeds: torch.Tensor):
        grid = batch.image_grid_thw
        merge = self.model.visual.spatial_merge_size
        expected = int((grid.prod(-1) // merge**2).sum())
        if batch.image_positions.shape[0] != expected:
            raise ValueError(f"{batch.image_positions.shape[0]} image tokens but {expected} image features")
        if self._vision is not None:
            merged, deepstack = self._vision_in_groups(batch.pixel_values, grid)
        else:  # a transformers version without the vision helpers: the model's own tower (per-image attention)
            out = self.model.get_image_features(batch.pixel_values, grid.to(self.device), return_dict=True)
            merged = torch.cat(out.pooler_output, dim=0)
            deepstack = [torch.cat(features, dim=0) for features in out.deepstack_features]
        embeds = embeds.index_copy(0, batch.image_positions, merged.to(embeds.dtype))
        return embeds, [d.to(embeds.dtype) for d in deepstack]

    def _vision_in_groups(self, pixel_values: torch.Tensor, grid: torch.Tensor):
        groups = _image_groups(grid, self.patches_per_call)
        if len(groups) == 1:
            return self._vision.run(self, pixel_values, grid)
        offsets = np.concatenate([[0], np.cumsum(grid.prod(-1).numpy())])
        outputs = [
            self._vision.run(self, pixel_values[offsets[g.start] : offsets[g.stop]], grid[g]) for g in groups
        ]
        merged = torch.cat([m for m, _ in outputs])
        deepstack = [torch.cat(parts) for parts in zip(*(d for _, d in outputs), strict=True)]
        return merged, deepstack

    def warm_up(
        self,
        lengths: Sequence[int] = (64, 512, 7, 300),
        image_side: int | None = None,
        step_tokens: int | None = None,
    ) -> float:
        """Run representative steps once (compiles when `compile` is on); returns the seconds it took.

        On a GPU, with `step_tokens` (the step's token budget), also one full step of text and, with
        `image_side`, one of images: the first steps of new sizes load their kernels and pick their algorithms
        (on an H200, 2B images timed in their first pass ran at 122 items/s, at 324 after one pass;
        benchmarks/NOTES.md), and the first steps of a run pin host memory for their pixels: costs a replica
        or actor should pay before it takes work."""
        from pipelines import synthetic

        start = time.perf_counter()
        rng = np.random.default_rng(0)
        config = self.model.config
        items = [synthetic.text_item(rng, n, config) for n in lengths]
        for group in (items[: len(items) // 2], items[len(items) // 2 :]):  # two token counts: dynamic shapes
            self.forward(group)
        if image_side:
            self.forward([synthetic.image_item(rng, config, image_side) for _ in range(2)])
        if step_tokens and self.device.type == "cuda":
            self.run_full_steps(step_tokens, image_side)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start

    def run_full_steps(self, step_tokens: int, image_side: int | None = None) -> int:
        """`warm_up`'s GPU part: one full step of texts, then (with `image_side`) two of images, through
        `forward_steps` as a run would, so that two image steps' pinned buffers are live at once (one running,
        the next being packed) and get allocated here, not in the first pass. Returns the steps run."""
        steps = full_steps(self.model.config, step_tokens, image_side)
        steps.append(steps[-1])
        for _ in self.forward_steps(steps):
            pass
        return len(steps)


def full_steps(config, step_tokens: int, image_side: int | None = None) -> list[list]:
    """A step of texts and (with `image_side`) one of images, each filling `step_tokens`: the same synthetic
    item repeated, since only the sizes matter for warming up."""
    from pipelines import synthetic

    rng = np.random.default_rng(1)
    items = [synthetic.text_item(rng, 256, config)]
    if image_side:
        items.append(synthetic.image_item(rng, config, image_side))
    return [[item] * max(1, step_tokens // item.num_tokens) for item in items]


class _VisionPreamble:
    """The vision tower in the packed layout: its own patch embedding, position interpolation and mergers,
    with the blocks' attention through one varlen call for all images of the step."""

    def __init__(self, visual, helpers, rotary):
        self.visual = visual
        self.rotary = rotary
        self.positions = _ImagePositions(visual, helpers)

    @classmethod
    def for_model(cls, model) -> _VisionPreamble | None:
        visual = getattr(model, "visual", None)
        try:
            helpers = importlib.import_module("transformers.vision_utils")
            rotary = importlib.import_module(type(visual).__module__).apply_rotary_pos_emb_vision
            for name in ("get_vision_cu_seqlens", "get_vision_position_ids"):
                getattr(helpers, name)
            helpers.get_vision_interpolation_indices_and_weights  # noqa: B018
            visual.num_grid_per_side, visual.interpolation_mode  # noqa: B018
        except (ImportError, AttributeError):
            return None
        return cls(visual, helpers, rotary)

    def run(self, owner: PackedForward, pixel_values: torch.Tensor, grid: torch.Tensor):
        visual = self.visual
        device = pixel_values.device
        sizes = [tuple(row) for row in grid.tolist()]  # (t, h, w) per image, on the host: no device syncs
        # attention runs within each frame of each image, as in the model (`get_vision_cu_seqlens`)
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


class _ImagePositions:
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
        embeds = (visual.pos_embed(_host_to(indices, device)) * _host_to(weights, device)[:, :, None]).sum(1)
        embeds = embeds.to(dtype)
        cos, sin = visual.rotary_pos_emb(embeds, _host_to(positions, device))
        counts = [t * h * w for t, h, w in sizes]
        columns = [[part.clone() for part in tensor.split(counts)] for tensor in (embeds, cos, sin)]
        return list(zip(*columns, strict=True))  # clones: an evicted size frees its own memory

    def _evict(self) -> None:
        total = self.patches
        while total > self.max_patches and len(self._entries) > 1:
            _, entry = self._entries.popitem(last=False)
            total -= entry[0].shape[0]
