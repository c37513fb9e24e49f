"""Variable-length attention over packed sequences: many sequences laid end to end in one row, none padded.

`q` is `[T, H, d]`, `k` and `v` are `[T, Hkv, d]` (grouped-query attention when `Hkv < H`), and `Segments`
says where each sequence starts. Every backend computes the same function: each token attends only to tokens of
its own sequence (and, when causal, only to those at or before it).

- `flash`: a FlashAttention-2 varlen kernel, CUDA with bf16/fp16 only, one launch per layer: PyTorch's public
  `torch.nn.attention.varlen.varlen_attn` where this torch has it (2.13: `window_size`, `enable_gqa`), else the
  kernel behind it (`aten._flash_attention_forward` with cumulative lengths), with the key/value heads repeated
  by hand on builds whose kernel refuses grouped heads. Whichever variant checks out first is used.
- `flex`: FlexAttention with a document mask (a compiled kernel on CUDA; an unfused reference on CPU).
- `sdpa`: one `scaled_dot_product_attention` call per sequence; runs anywhere, in any dtype, and is the exact
  float32 reference on CPU (there is no public varlen kernel for the CPU).

`resolve_backend("auto", ...)` picks the fastest one that works on the device, after checking it once
against `sdpa` on random data (so a kernel that is missing or wrong on some torch build is never used).

`attention_forward` is the same attention as a transformers `AttentionInterface` function
(`register_attention()` registers it as `ATTENTION_NAME`): the model's own decoder layers and vision blocks call
it with the `cu_seq_lens_q/k`, `max_length_q/k` keywords of transformers' flash path, plus `segments` and
`varlen_backend` passed down by the packed engine. The name contains "flash" because transformers sends an
implementation the packed (`cu_seq_lens`) calling convention by that substring (`is_flash_attention_requested`:
the vision blocks then make one call for all images instead of one per image); the kernel is the backend's.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import get_args

import torch
import torch.nn.functional as F

from pipelines.config import VarlenAttention as BackendChoice
from pipelines.config import VarlenKernel as Backend

BACKENDS: tuple[str, ...] = get_args(Backend)


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

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor, max_seqlen: int | None = None) -> Segments:
        """From offsets alone (reads them on the host: a device sync when they are on a GPU)."""
        offsets = cu_seqlens.tolist()
        lengths = [b - a for a, b in zip(offsets, offsets[1:], strict=False)]
        return cls(cu_seqlens=cu_seqlens, lengths=lengths, max_seqlen=max_seqlen or max(lengths))

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


@torch.compiler.disable
def _flash(q, k, v, segments: Segments, causal: bool, scale: float) -> torch.Tensor:
    return _run_flash(_flash_variant(q.device.type, q.dtype), q, k, v, segments, causal, scale)


FLASH_VARIANTS = ("public", "aten", "aten-repeat-kv")


def _run_flash(variant: str, q, k, v, segments: Segments, causal: bool, scale: float) -> torch.Tensor:
    cu, n = segments.cu_seqlens, segments.max_seqlen
    gqa = k.shape[1] != q.shape[1]
    if variant == "public":
        window = (-1, 0) if causal else (-1, -1)
        return _public_varlen()(q, k, v, cu, cu, n, n, scale=scale, window_size=window, enable_gqa=gqa)
    if variant == "aten-repeat-kv" and gqa:
        repeat = q.shape[1] // k.shape[1]  # query head h reads key/value head h // repeat, as repeat_kv does
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, n, n, 0.0, causal, False, scale=scale)
    return out[0]


@cache
def _public_varlen():
    """`torch.nn.attention.varlen.varlen_attn` if this torch has it with the arguments used here, else None."""
    import inspect

    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    parameters = inspect.signature(varlen_attn).parameters
    return varlen_attn if {"window_size", "enable_gqa", "scale"} <= parameters.keys() else None


@cache
def _flash_variants(device_type: str, dtype: torch.dtype) -> tuple[str | None, str | None]:
    """(the first flash variant that matches sdpa here, None) or (None, why none does); once per process."""
    problem = "no flash kernel in this torch build"
    for variant in FLASH_VARIANTS:
        if variant == "public" and _public_varlen() is None:
            continue
        if variant != "public" and not hasattr(torch.ops.aten, "_flash_attention_forward"):
            continue

        def run(q, k, v, segments, causal, scale, variant=variant):
            return _run_flash(variant, q, k, v, segments, causal, scale)

        problem = _check_against_sdpa(run, device_type, dtype)
        if problem is None:
            return variant, None
    return None, problem


def _flash_variant(device_type: str, dtype: torch.dtype) -> str:
    variant, problem = _flash_variants(device_type, dtype)
    if variant is None:
        raise RuntimeError(f"the flash kernel cannot run on {device_type} in {dtype}: {problem}")
    return variant


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
        return _flash_variants(device_type, dtype)[1]

    def run(q, k, v, segments, causal, scale):
        return attention(q, k, v, segments, causal=causal, scale=scale, backend=backend)

    return _check_against_sdpa(run, device_type, dtype)


def _check_against_sdpa(run, device_type: str, dtype: torch.dtype) -> str | None:
    """None if `run(q, k, v, segments, causal, scale)` matches `sdpa` on random packed data, else how not."""
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
                got = run(q, k, v, segments, causal, dim**-0.5)
            except Exception as exc:  # a missing kernel or unsupported shape: report it, use another backend
                return f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            want = _sdpa(q.float(), k.float(), v.float(), segments, causal, dim**-0.5)
            error = float((got.float() - want).norm() / want.norm())
            if not error <= tolerance:  # NaN fails too
                return f"differs from sdpa by {error:.3g} (heads {heads}/{kv_heads}, causal={causal})"
    return None


# -- the same attention through transformers' AttentionInterface ------------------------------------------

ATTENTION_NAME = "vlm_embed_flash_varlen"


def attention_forward(
    module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    scaling: float | None = None,
    dropout: float = 0.0,
    *,
    cu_seq_lens_q: torch.Tensor | None = None,
    max_length_q: int | None = None,
    is_causal: bool | None = None,
    segments: Segments | None = None,
    varlen_backend: Backend = "sdpa",
    **_: object,
) -> tuple[torch.Tensor, None]:
    """An `AttentionInterface` function: `query` `[1, H, T, d]`, `key`/`value` `[1, Hkv, T, d]` of packed
    sequences (`cu_seq_lens_q`) -> `([1, T, H, d], None)`, the layout transformers' attention functions return.

    Self-attention only (the keys' offsets are the queries'); no mask, no dropout (inference). Causal unless
    the caller says `is_causal=False` or the module is not causal (the vision blocks)."""
    if attention_mask is not None or query.shape[0] != 1:
        raise ValueError("varlen attention takes one packed row and no mask (pass cu_seq_lens_q)")
    if segments is None:
        if cu_seq_lens_q is None:
            raise ValueError("varlen attention needs cu_seq_lens_q (or segments)")
        segments = Segments.from_cu_seqlens(cu_seq_lens_q, max_length_q)
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    if torch.compiler.is_compiling():  # one opaque op: the layer around it stays one graph
        q, k, v = (t.contiguous() for t in (q, k, v))
        out = _varlen_op(q, k, v, segments.cu_seqlens, segments.max_seqlen, causal, scale, varlen_backend)
    else:
        out = attention(q, k, v, segments, causal=causal, scale=scale, backend=varlen_backend)
    return out.unsqueeze(0), None


@torch.library.custom_op("vlm_embed::varlen_attention", mutates_args=())
def _varlen_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    causal: bool,
    scale: float,
    backend: str,
) -> torch.Tensor:
    """`attention` as a custom op, what compiled regions call: without it each call is a graph break, which
    splits a layer into several graphs and resumes every enclosing frame (13 graphs for the tiny model instead
    of 2, measured here). The flash kernel needs only the offsets; the other backends read them on the host."""
    if backend == "flash":
        segments = Segments(cu_seqlens=cu_seqlens, lengths=[], max_seqlen=max_seqlen)
    else:
        segments = Segments.from_cu_seqlens(cu_seqlens, max_seqlen)
    return attention(q, k, v, segments, causal=causal, scale=scale, backend=backend).contiguous()


@_varlen_op.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, causal, scale, backend):
    return q.new_empty(q.shape)


@cache
def register_attention() -> str:
    """Register `attention_forward` with transformers' `AttentionInterface` (once); returns its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, attention_forward)
    return ATTENTION_NAME


def with_varlen_attention(module: torch.nn.Module, attention: str) -> torch.nn.Module:
    """A view of `module` (a decoder layer or vision block) whose attention submodule `attention` calls
    `attention_forward`: shallow copies sharing every parameter and every other submodule, the attention's
    config a copy naming `ATTENTION_NAME`. The model itself is left as it is (its own forward, and any other
    engine on it, keep the model's attention implementation)."""
    import copy

    name = register_attention()
    inner = getattr(module, attention)
    inner_view = copy.copy(inner)
    config = copy.copy(inner.config)
    config._attn_implementation = name
    inner_view.__dict__["config"] = config
    view = copy.copy(module)
    view.__dict__["_modules"] = {**module._modules, attention: inner_view}
    return view
