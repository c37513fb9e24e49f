"""Pooling: pure functions from token states and the attention mask to one vector per sequence.

They know nothing about the backbone. `pool`: `hidden` is `[batch, seq, dim]`, `mask` is `[batch, seq]` with 1
for real tokens and 0 for padding, on either side. Padding positions may hold anything (even NaN): they are never
read. `pool_packed`: `hidden` is `[tokens, dim]`, sequences laid end to end with their offsets in `cu_seqlens`
(`[S+1]`, as varlen attention takes them); the same modes, the same vectors as `pool` of the padded batch.
`matryoshka` (truncate, then re-normalise) takes torch tensors and numpy arrays alike, so the embedder's
`finish` and Serve's per-request `dimensions` are the same code; torch is imported only where it is needed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, get_args

from pipelines.recipes import Pooling

if TYPE_CHECKING:
    import torch

POOLING_MODES: tuple[str, ...] = get_args(Pooling)


def first_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the first real token of each row (works for left and right padding)."""
    return mask.long().argmax(dim=1)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row (works for left and right padding)."""
    seq_len = mask.shape[1]
    return seq_len - 1 - mask.long().flip(dims=[1]).argmax(dim=1)


def _gather(hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    import torch

    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """One vector per row of `hidden`, in float32."""
    if hidden.ndim != 3 or mask.shape != hidden.shape[:2]:
        raise ValueError(
            f"expected hidden [B, L, D] and mask [B, L], got {tuple(hidden.shape)} and {tuple(mask.shape)}"
        )
    if not bool(mask.any(dim=1).all()):
        raise ValueError("every row needs at least one real token")
    hidden = hidden.float()
    keep = mask.bool().unsqueeze(-1)
    if mode == "mean":
        summed = hidden.masked_fill(~keep, 0.0).sum(dim=1)
        return summed / keep.sum(dim=1).to(hidden.dtype)
    if mode == "max":
        return hidden.masked_fill(~keep, float("-inf")).amax(dim=1)
    if mode == "cls":
        return _gather(hidden, first_token_index(mask))
    if mode == "last":
        return _gather(hidden, last_token_index(mask))
    raise ValueError(f"unknown pooling {mode!r}; choose one of {POOLING_MODES}")


def pool_packed(hidden: torch.Tensor, cu_seqlens: torch.Tensor, mode: str) -> torch.Tensor:
    """One float32 vector per packed sequence of `hidden` `[T, D]`; `cu_seqlens` `[S+1]` are the offsets."""
    import torch

    if hidden.ndim != 2 or cu_seqlens.ndim != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(
            f"expected hidden [T, D] and cu_seqlens [S+1], got {tuple(hidden.shape)} and {tuple(cu_seqlens.shape)}"
        )
    starts, ends = cu_seqlens[:-1].long(), cu_seqlens[1:].long()
    if mode == "cls":
        return hidden[starts].float()
    if mode == "last":
        return hidden[ends - 1].float()
    count, dim = starts.shape[0], hidden.shape[-1]
    # which sequence each token is in; output_size given: no device sync for the result's size
    doc = torch.repeat_interleave(
        torch.arange(count, device=hidden.device), ends - starts, output_size=hidden.shape[0]
    )
    values = hidden.float()
    if mode == "mean":
        summed = torch.zeros(count, dim, dtype=torch.float32, device=hidden.device).index_add_(0, doc, values)
        return summed / (ends - starts).unsqueeze(1).to(torch.float32)
    if mode == "max":
        out = torch.full((count, dim), float("-inf"), dtype=torch.float32, device=hidden.device)
        return out.scatter_reduce_(0, doc.unsqueeze(1).expand(-1, dim), values, "amax")
    raise ValueError(f"unknown pooling {mode!r}; choose one of {POOLING_MODES}")


def normalize(vectors: Any, eps: float = 1e-12) -> Any:
    """L2-normalise each row (a torch tensor or a numpy array)."""
    import numpy as np

    if isinstance(vectors, np.ndarray):
        norms = np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), eps)
        return (vectors / norms).astype(vectors.dtype, copy=False)
    return vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(eps)


def truncate(vectors: Any, dimensions: int | None) -> Any:
    """Keep the first `dimensions` components (Matryoshka); the caller re-normalises."""
    if dimensions is None:
        return vectors
    if dimensions > vectors.shape[-1]:
        raise ValueError(f"dimensions={dimensions} is larger than the model's {vectors.shape[-1]}")
    return vectors[..., :dimensions]


def matryoshka(vectors: Any, dimensions: int | None, normalize_rows: bool) -> Any:
    """The first `dimensions` components, re-normalised when the vectors are: what `EmbedderConfig(dimensions=D)`
    computes, and what a shorter dimension of an already normalised vector must be cut to."""
    if dimensions is None or dimensions == vectors.shape[-1]:
        return vectors
    out = truncate(vectors, dimensions)
    return normalize(out) if normalize_rows else out
