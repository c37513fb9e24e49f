"""Variable-length attention over packed sequences: many sequences laid end to end in one row, none padded.

`q` is `[T, H, d]`, `k` and `v` are `[T, Hkv, d]` (grouped-query attention when `Hkv < H`), and `Segments`
says where each sequence starts. Every backend computes the same function: each token attends only to tokens of
its own sequence (and, when causal, only to those at or before it).

- `flash`: PyTorch's own FlashAttention-2 varlen kernel (`aten._flash_attention_forward` with cumulative
  lengths; the kernel behind `torch.nn.attention.varlen`), CUDA with bf16/fp16 only. One launch per layer.
- `flex`: FlexAttention with a document mask (a compiled kernel on CUDA; an unfused reference on CPU).
- `sdpa`: one `scaled_dot_product_attention` call per sequence; runs anywhere, in any dtype, and is the exact
  float32 reference on CPU.

`resolve_backend("auto", ...)` picks the fastest one that works on the device, after checking it once
against `sdpa` on random data (so a kernel that is missing or wrong on some torch build is never used).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Literal

import torch
import torch.nn.functional as F

Backend = Literal["flash", "flex", "sdpa"]
BackendChoice = Literal["auto", "flash", "flex", "sdpa"]
BACKENDS = ("flash", "flex", "sdpa")


@dataclass
class Segments:
    """Where the packed sequences are: `cu_seqlens` (int32 `[S+1]`, on the device) and the same on the host."""

    cu_seqlens: torch.Tensor
    lengths: list[int]
    max_seqlen: int
    _doc_ids: torch.Tensor | None = None
    _block_masks: dict | None = None

    @classmethod
    def from_lengths(cls, lengths: list[int], device) -> Segments:
        if not lengths or min(lengths) < 1:
            raise ValueError(f"every packed sequence needs at least one token, got lengths {lengths[:8]}")
        offsets = [0]
        for n in lengths:
            offsets.append(offsets[-1] + n)
        cu = torch.tensor(offsets, dtype=torch.int32)
        if torch.device(device).type == "cuda":
            cu = cu.pin_memory()
        return cls(
            cu_seqlens=cu.to(device, non_blocking=True), lengths=list(lengths), max_seqlen=max(lengths)
        )

    @property
    def total(self) -> int:
        return sum(self.lengths)

    def doc_ids(self) -> torch.Tensor:
        """Which sequence each token belongs to (`[T]`, on the device)."""
        if self._doc_ids is None:  # built on the host: repeat_interleave on the GPU would wait for it
            doc = torch.repeat_interleave(
                torch.arange(len(self.lengths), dtype=torch.int32), torch.tensor(self.lengths)
            )
            device = self.cu_seqlens.device
            self._doc_ids = (doc.pin_memory() if device.type == "cuda" else doc).to(device, non_blocking=True)
        return self._doc_ids

    def block_mask(self, causal: bool):
        """FlexAttention's document mask for these segments (built once per batch, shared by every layer)."""
        from torch.nn.attention.flex_attention import create_block_mask

        self._block_masks = self._block_masks or {}
        if causal not in self._block_masks:
            doc = self.doc_ids()

            def same_doc(b, h, q_idx, kv_idx):
                return doc[q_idx] == doc[kv_idx]

            def same_doc_causal(b, h, q_idx, kv_idx):
                return (doc[q_idx] == doc[kv_idx]) & (kv_idx <= q_idx)

            total = self.total
            self._block_masks[causal] = create_block_mask(
                same_doc_causal if causal else same_doc, None, None, total, total, device=doc.device
            )
        return self._block_masks[causal]


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segments: Segments,
    *,
    causal: bool,
    scale: float,
    backend: Backend,
) -> torch.Tensor:
    """Attention of packed `q` `[T, H, d]` over `k`, `v` `[T, Hkv, d]` within each segment -> `[T, H, d]`."""
    if backend == "flash":
        return _flash(q, k, v, segments, causal, scale)
    if backend == "flex":
        return _flex(q, k, v, segments, causal, scale)
    if backend == "sdpa":
        return _sdpa(q, k, v, segments, causal, scale)
    raise ValueError(f"unknown varlen attention backend {backend!r}; choose one of {BACKENDS}")


# Set by the check below when this torch build's flash kernel refuses fewer key/value heads than query heads
_FLASH_REPEATS_KV = {"needed": False}


@torch.compiler.disable
def _flash(q, k, v, segments: Segments, causal: bool, scale: float) -> torch.Tensor:
    if _FLASH_REPEATS_KV["needed"] and k.shape[1] != q.shape[1]:
        repeat = q.shape[1] // k.shape[1]  # query head h reads key/value head h // repeat, as repeat_kv does
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    cu, n = segments.cu_seqlens, segments.max_seqlen
    out = torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, n, n, 0.0, causal, False, scale=scale)
    return out[0]


@torch.compiler.disable
def _flex(q, k, v, segments: Segments, causal: bool, scale: float) -> torch.Tensor:
    flex = _compiled_flex() if q.is_cuda else _eager_flex()
    out = flex(
        q.transpose(0, 1).unsqueeze(0),
        k.transpose(0, 1).unsqueeze(0),
        v.transpose(0, 1).unsqueeze(0),
        block_mask=segments.block_mask(causal),
        scale=scale,
        enable_gqa=k.shape[1] != q.shape[1],
    )
    return out.squeeze(0).transpose(0, 1)


@cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


def _eager_flex():
    import warnings

    from torch.nn.attention.flex_attention import flex_attention

    def run(*args, **kwargs):
        with warnings.catch_warnings():  # "called without torch.compile(), unfused": expected on CPU
            warnings.simplefilter("ignore", UserWarning)
            return flex_attention(*args, **kwargs)

    return run


@torch.compiler.disable
def _sdpa(q, k, v, segments: Segments, causal: bool, scale: float) -> torch.Tensor:
    out = torch.empty_like(q)
    gqa = k.shape[1] != q.shape[1]
    start = 0
    for n in segments.lengths:
        rows = slice(start, start + n)
        out[rows] = F.scaled_dot_product_attention(
            q[rows].transpose(0, 1),
            k[rows].transpose(0, 1),
            v[rows].transpose(0, 1),
            is_causal=causal,
            scale=scale,
            enable_gqa=gqa,
        ).transpose(0, 1)
        start += n
    return out


def resolve_backend(choice: BackendChoice, device, dtype: torch.dtype) -> Backend:
    """The backend to use: `auto` is `flash` on CUDA in bf16/fp16 when it checks out, else `sdpa`.

    A backend named explicitly is checked too, and a clear error says why it cannot run here.
    """
    device = torch.device(device)
    if choice == "auto":
        if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
            problem = backend_problem("flash", device.type, dtype)
            if problem is None:
                return "flash"
        return "sdpa"
    if choice not in BACKENDS:
        raise ValueError(f"unknown varlen attention backend {choice!r}; choose one of auto, {BACKENDS}")
    problem = backend_problem(choice, device.type, dtype)
    if problem is not None:
        raise RuntimeError(
            f"varlen attention backend {choice!r} cannot run on {device} in {dtype}: {problem}"
        )
    return choice


@cache
def backend_problem(backend: Backend, device_type: str, dtype: torch.dtype) -> str | None:
    """None if `backend` runs on this device and dtype and matches `sdpa` on random packed data; else why not.

    Cached per process: the check costs a few small kernels once.
    """
    if backend == "sdpa":
        return None
    if backend == "flash":
        if device_type != "cuda":
            return "the flash kernel needs CUDA"
        if dtype not in (torch.bfloat16, torch.float16):
            return "the flash kernel takes bf16 or fp16 only"
        if not hasattr(torch.ops.aten, "_flash_attention_forward"):
            return "this torch build has no aten._flash_attention_forward"
        problem = _check_against_sdpa(backend, device_type, dtype)
        if problem is not None and not _FLASH_REPEATS_KV["needed"]:
            _FLASH_REPEATS_KV["needed"] = True  # try again with the key/value heads repeated by hand
            problem = _check_against_sdpa(backend, device_type, dtype)
            _FLASH_REPEATS_KV["needed"] = problem is None
        return problem
    return _check_against_sdpa(backend, device_type, dtype)


def _check_against_sdpa(backend: Backend, device_type: str, dtype: torch.dtype) -> str | None:
    device = torch.device(device_type)
    generator = torch.Generator().manual_seed(0)
    segments = Segments.from_lengths([5, 64, 1, 130], device)
    # relative error ||got - want|| / ||want||: bf16 operands land between 1e-3 and 1e-2; a kernel that lets
    # sequences see each other, or ignores causality, lands far above 0.1
    tolerance = 2e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-5
    for heads, kv_heads, dim in ((4, 2, 64), (4, 4, 72)):  # GQA text layers; vision's head size 72 (8B)
        q, k, v = (
            torch.randn(segments.total, h, dim, generator=generator).to(device, dtype)
            for h in (heads, kv_heads, kv_heads)
        )
        for causal in (True, False):
            try:
                got = attention(q, k, v, segments, causal=causal, scale=dim**-0.5, backend=backend)
            except Exception as exc:  # a missing kernel or unsupported shape: report it, use another backend
                return f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            want = _sdpa(q.float(), k.float(), v.float(), segments, causal, dim**-0.5)
            error = float((got.float() - want).norm() / want.norm())
            if not error <= tolerance:  # NaN fails too
                return f"differs from sdpa by {error:.3g} (heads {heads}/{kv_heads}, causal={causal})"
    return None
