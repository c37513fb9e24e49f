"""The packed layout: the sequences of a step laid end to end in one row, with no padding at all.

The padded layout (`pipelines.engine.PaddedForward`) makes every item of a batch as long as the longest one and
runs the model with a `[B, L, L]` mask. Here a batch is one row of `T = sum(lengths)` tokens: each item keeps
its own M-RoPE positions, and attention runs per sequence through a variable-length kernel, so no FLOP is spent
on padding and no mask is built.

`PackedForward` runs the model's own decoder layers and vision blocks (`pipelines.vision`) on that row: each
through a view whose attention is `pipelines.varlen.attention_forward`, registered with transformers'
`AttentionInterface` and called with the `cu_seq_lens_*` keywords of transformers' flash path; the layer loop
is `pipelines.forward.decoder_states`, the one every engine uses, and pooling is `pooling.pool_packed`. So it
computes the function the padded layout computes (float32: <= 1e-5, tested) without re-composing the layers.
`PackedEngine` is what the packed engines share: packing (on a helper thread, into pinned memory), pooling,
warm-up; `pipelines.packed_legacy` is the previous engine, which re-composes the layers from their parts.

What measurements kept (benchmarks/NOTES.md, H200): regional compilation (`compile`: 2B text 798 -> 1,263
items/s): one compiled function calls a layer or block, shared by every layer, so each kind of module compiles
once (two graphs each, around the attention call), with dynamic token counts; the vision groups and the position
cache of `pipelines.vision` (rows 5, 6); the next step packed on a helper thread into pinned memory (row 6).
With `cuda_graphs`, small text steps are padded to buckets and replayed from CUDA graphs captured at warm-up
(`pipelines.step_graphs`; `_run` routes each step). The legacy engine's split of each layer's MLP into 16,384-token calls is not kept: the model's own layer runs
its MLP over the whole step, whose size `max_batch_tokens` bounds (16,384 by default: the split never engaged
at the default budget).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from typing import Literal

import numpy as np
import torch

from pipelines import warm_up as warming
from pipelines.forward import decoder_states, resolve_layer
from pipelines.pooling import pool_packed
from pipelines.prepare import PreparedItem
from pipelines.step_graphs import StepGraphs
from pipelines.varlen import BackendChoice, Segments, resolve_backend, with_varlen_attention
from pipelines.vision import PackedVision, host_to


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
        pixels, positions = self.pixel_values, self.image_positions
        return PackedBatch(
            input_ids=host_to(self.input_ids, device),
            position_ids=host_to(self.position_ids, device),
            lengths=self.lengths,
            pixel_values=host_to(pixels, device, dtype or pixels.dtype) if pixels is not None else None,
            image_grid_thw=self.image_grid_thw,
            image_positions=host_to(positions, device) if positions is not None else None,
        )


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


def call_module(module: torch.nn.Module, *args, **kwargs):
    return module(*args, **kwargs)


@cache
def compiled_call():
    """One compiled `call_module` for the whole process: every layer, every engine and every model of the same
    shapes reuses its graphs (a fresh `torch.compile` wrapper would compile them again)."""
    return torch.compile(call_module, dynamic=True)


class PackedEngine:
    """What the packed engines share: `forward(items)` -> `[B, D]` float32, steps packed ahead, warm-up.
    A subclass says how `hidden_states` of a packed batch are computed."""

    layout: Literal["packed"] = "packed"

    def __init__(
        self,
        model,
        *,
        layer: int,
        pooling: str,
        attention: BackendChoice = "auto",
        compile: bool = False,
        compile_at_warm_up: bool = False,
        cuda_graphs: bool = False,
    ):
        self.model = model
        self.layer = resolve_layer(model, layer)
        self.pooling = pooling
        weight = model.language_model.embed_tokens.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.backend = resolve_backend(attention, self.device, self.dtype)
        self.compile = compile
        self.compile_at_warm_up = compile_at_warm_up  # compile: auto, on a GPU
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs needs a CUDA device; the model is on {self.device}")
        self.cuda_graphs = cuda_graphs  # captured at warm-up (`pipelines.step_graphs`)
        self.step_graphs = None  # a StepGraphs: text steps that fit a bucket go through it

    def _run(self, batch: PackedBatch) -> torch.Tensor:
        """One host batch: through the step graphs when it fits one of their buckets, else as it is."""
        graphs = self.step_graphs
        bucket = graphs.bucket(batch) if graphs is not None else None
        if bucket is None:
            if graphs is not None:
                graphs.report.unbucketed += 1
            return self.forward_packed(batch.to(self.device, self.dtype))
        return graphs.run(batch, bucket)

    def forward(self, items: Sequence[PreparedItem]) -> torch.Tensor:
        return self._run(self._pack(items))

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
                yield self._run(batch)
            yield self._run(packing.result())

    def _pack(self, items: Sequence[PreparedItem]) -> PackedBatch:
        return pack(items, self.model.config.image_token_id, pin=self.device.type == "cuda")

    @torch.inference_mode()
    def forward_packed(self, batch: PackedBatch) -> torch.Tensor:
        return self.pooled(batch, Segments.from_lengths(batch.lengths, self.device))

    def pooled(self, batch: PackedBatch, segments: Segments) -> torch.Tensor:
        """`[sequences, D]` float32 pooled states of a device batch: what a step graph captures."""
        hidden = self.hidden_states(batch, segments)
        return pool_packed(hidden, segments.cu_seqlens, self.pooling)

    def hidden_states(self, batch: PackedBatch, segments: Segments) -> torch.Tensor:
        raise NotImplementedError

    def use_compiled(self) -> None:
        """Run through the compiled region from now on (`compile: auto` does this at warm-up)."""
        self.compile = True

    def warm_up(self, image_side: int | None = None, step_tokens: int | None = None) -> float:
        """Representative steps (`pipelines.warm_up`), compiled first when `compile` is on or resolves on at
        warm-up; returns the seconds it took."""
        if self.compile_at_warm_up and not self.compile:
            self.use_compiled()
        seconds = warming.warm_up(self, image_side=image_side, step_tokens=step_tokens)
        if self.cuda_graphs and self.step_graphs is None:
            self.step_graphs = StepGraphs(self)
            seconds += self.step_graphs.capture().seconds
        return seconds

    def run_full_steps(self, step_tokens: int, image_side: int | None = None) -> int:
        return warming.run_full_steps(self, step_tokens, image_side)

    def _embeddings(self, batch: PackedBatch) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The token embeddings `[T, D]` with the image features scattered in, and the deepstack features."""
        embeds = self.model.language_model.embed_tokens(batch.input_ids)
        if batch.pixel_values is None:
            return embeds, []
        merge = self.model.visual.spatial_merge_size
        expected = int((batch.image_grid_thw.prod(-1) // merge**2).sum())
        if batch.image_positions.shape[0] != expected:
            raise ValueError(f"{batch.image_positions.shape[0]} image tokens but {expected} image features")
        merged, deepstack = self._image_features(batch)
        embeds = embeds.index_copy(0, batch.image_positions, merged.to(embeds.dtype))
        return embeds, [d.to(embeds.dtype) for d in deepstack]

    def _image_features(self, batch: PackedBatch):
        raise NotImplementedError

    def _model_image_features(self, batch: PackedBatch):
        """The model's own tower (per-image attention): a transformers version without the vision helpers."""
        grid = batch.image_grid_thw.to(self.device)
        out = self.model.get_image_features(batch.pixel_values, grid, return_dict=True)
        merged = torch.cat(out.pooler_output, dim=0)
        return merged, [torch.cat(features, dim=0) for features in out.deepstack_features]


class PackedForward(PackedEngine):
    """The packed layout on the model's own decoder layers and vision blocks (see the module docstring)."""

    def __init__(self, model, **options):
        super().__init__(model, **options)
        language_model = model.language_model
        self._layers = [with_varlen_attention(layer, "self_attn") for layer in language_model.layers]
        self.vision = PackedVision.for_model(model, self.backend, self._call)

    def _call(self, module, *args, **kwargs):
        return (compiled_call() if self.compile else call_module)(module, *args, **kwargs)

    def hidden_states(self, batch: PackedBatch, segments: Segments) -> torch.Tensor:
        """`hidden_states[layer]` for every packed token, `[T, D]` (see `pipelines.forward`)."""
        language_model = self.model.language_model
        embeds, deepstack = self._embeddings(batch)
        if self.layer == 0:
            return embeds
        hidden = embeds.unsqueeze(0)  # the model's layers take [batch, tokens, D]: one row
        position_embeddings = language_model.rotary_emb(hidden, batch.position_ids.unsqueeze(1))
        cu, longest = segments.cu_seqlens, segments.max_seqlen
        kwargs = dict(
            attention_mask=None,
            position_embeddings=position_embeddings,
            cu_seq_lens_q=cu,
            cu_seq_lens_k=cu,
            max_length_q=longest,
            max_length_k=longest,
            segments=segments,
            varlen_backend=self.backend,
        )

        def run_layer(index: int, hidden: torch.Tensor) -> torch.Tensor:
            return self._call(self._layers[index], hidden, **kwargs)

        def add_deepstack(hidden: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
            return hidden.index_add(1, batch.image_positions, features.unsqueeze(0))

        return decoder_states(language_model, hidden, self.layer, deepstack, run_layer, add_deepstack)[0]

    def _image_features(self, batch: PackedBatch):
        if self.vision is None:
            return self._model_image_features(batch)
        return self.vision.features(batch.pixel_values, batch.image_grid_thw)
