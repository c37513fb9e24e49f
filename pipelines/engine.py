"""The forward engines: how a step of prepared items becomes pooled vectors on the model's device.

Every engine has the same interface, so the embedder (and the reranker through it) never asks which one runs:
- `forward(items)` -> `[B, D]` float32 pooled states of one step,
- `forward_steps(steps)` -> one such tensor per step, in order (the packed engines pack the next step meanwhile),
- `warm_up(image_side, step_tokens)` -> seconds spent running representative steps (`pipelines.warm_up`),
- `layout`: how a step's tokens are counted against the token budget (`pipelines.batching.plan_batches`).

`PaddedForward` pads a step to its longest item and runs the model's own layers with a mask
(`pipelines.forward`); `pipelines.packed.PackedForward` lays it end to end in one row with varlen attention;
`pipelines.packed_legacy.LegacyPackedForward` is the previous packed engine (`engine: legacy`).
`build_engine` picks one from the config (`attention_layout`, `engine`, `compile`, `cuda_graphs`, resolved for
the device).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Literal, Protocol

import torch

from pipelines import pooling
from pipelines import warm_up as warming
from pipelines.forward import collate, hidden_states_at, resolve_layer
from pipelines.prepare import PreparedItem

if TYPE_CHECKING:
    from pipelines.config import ModelOptions


class Engine(Protocol):
    layout: Literal["padded", "packed"]
    model: torch.nn.Module
    device: torch.device

    def forward(self, items: Sequence[PreparedItem]) -> torch.Tensor: ...

    def forward_steps(self, steps: Sequence[Sequence[PreparedItem]]) -> Iterator[torch.Tensor]: ...

    def warm_up(self, image_side: int | None = None, step_tokens: int | None = None) -> float: ...


class PaddedForward:
    """A step padded to its longest item, through the base model up to a layer, then pooling."""

    layout: Literal["padded"] = "padded"

    def __init__(self, model, *, layer: int, pooling: str, pad_token_id: int, padding_side: str = "right"):
        self.model = model
        self.layer = resolve_layer(model, layer)
        self.pooling = pooling
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side

    @property
    def device(self) -> torch.device:
        return self.model.language_model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.language_model.embed_tokens.weight.dtype

    def forward(self, items: Sequence[PreparedItem]) -> torch.Tensor:
        batch = collate(list(items), self.pad_token_id, self.padding_side).to(self.device, self.dtype)
        hidden = hidden_states_at(self.model, batch, self.layer)
        return pooling.pool(hidden, batch.attention_mask, self.pooling)

    def forward_steps(self, steps: Sequence[Sequence[PreparedItem]]) -> Iterator[torch.Tensor]:
        yield from map(self.forward, steps)

    def warm_up(self, image_side: int | None = None, step_tokens: int | None = None) -> float:
        """Representative steps (`pipelines.warm_up`): kernels loaded and algorithms picked before work. Two
        short texts (nothing compiles here); on a GPU also the full steps of `step_tokens`."""
        return warming.warm_up(self, lengths=(7, 64), image_side=image_side, step_tokens=step_tokens)


def build_engine(
    model, config: ModelOptions, *, layer: int, pooling: str, pad_token_id: int, padding_side: str
) -> Engine:
    """The engine the config asks for on the model's device (`attention_layout` and `compile` resolved)."""
    device = model.language_model.embed_tokens.weight.device
    if config.resolved_attention_layout(device.type) == "padded":
        return PaddedForward(
            model, layer=layer, pooling=pooling, pad_token_id=pad_token_id, padding_side=padding_side
        )
    options = dict(
        layer=layer,
        pooling=pooling,
        attention=config.varlen_attention,
        compile=config.resolved_compile(device.type, warmed_up=False),
        compile_at_warm_up=config.resolved_compile(device.type, warmed_up=True),
        cuda_graphs=config.resolved_cuda_graphs(device.type),
    )
    if config.engine == "legacy":
        from pipelines.packed_legacy import LegacyPackedForward

        return LegacyPackedForward(model, **options)
    from pipelines.packed import PackedForward

    return PackedForward(model, **options)
