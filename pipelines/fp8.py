"""FP8 matmuls for the decoder layers: float8 e4m3 weights and activations, bf16 (or float32) out.

The linear layers of the language model's decoder layers run in FP8: each weight is quantized once, with one
scale per output row; each input is quantized on the fly, with one scale per token; the product runs in
`torch._scaled_mm` (FP8 tensor cores on Hopper/Ada GPUs, about 1.8x bf16 on an H100; a reference kernel on
CPUs) and comes out in the input's dtype. The vision tower, embeddings and norms stay as they are: they are a
small share of the FLOPs and the most sensitive to precision.

Projections that read the same input are fused: q/k/v, and gate/up, each become one `Fp8Fused` matmul over
the concatenated weights, so their input is quantized once and read once. Per-row weight scales do not
depend on the grouping and the activation is the same tensor, so a fused product equals the separate ones up
to the kernel's accumulation order. The model's own attention and MLP code still runs: `q_proj` (`gate_proj`)
becomes an `Fp8Slice` that makes the fused call and hands the other slices their outputs, which `k_proj`
and `v_proj` (`up_proj`) pick up when called with the same input (else they compute their own slice).

`keep` (`EmbedderConfig.fp8_keep`) leaves parts in bf16, as `nn.Linear`s: the first and last decoder layers
and every `down_proj`, the parts FP8 recipes usually spare (benchmarks/NOTES.md measures what each costs).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# projections that read the same input, by the module that holds them, and the fused module's name there
GROUPS = {
    "self_attn": ("qkv_fp8", ("q_proj", "k_proj", "v_proj")),
    "mlp": ("gate_up_fp8", ("gate_proj", "up_proj")),
}
CONVERTED = "_vlm_embed_fp8"  # set on a converted language model: {"keep": (...), "fused": bool}


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`x` `[M, K]` as float8 e4m3 with one float32 scale per row (`[M, 1]`): `x ~ q * scale`."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-12)
    scale = amax / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def _quantized_weight(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The linears' weights stacked row-wise in FP8, their `[1, N]` scales and biases (None if none has one)."""
    weight = torch.cat([linear.weight.detach() for linear in linears])
    out_features, in_features = weight.shape
    if in_features % 16 or out_features % 16:
        raise ValueError(f"FP8 matmuls need sizes divisible by 16, got {out_features}x{in_features}")
    quantized, scale = quantize_rows(weight)
    biases = [linear.bias for linear in linears]
    if all(b is None for b in biases):
        bias = None
    else:
        bias = torch.cat(
            [
                b.detach() if b is not None else weight.new_zeros(len(linear.weight))
                for b, linear in zip(biases, linears, strict=True)
            ]
        )
    return quantized, scale.reshape(1, -1), bias


def fp8_product(x: torch.Tensor, weight, weight_scale, bias) -> torch.Tensor:
    """`x W^T + b` for `x` `[..., K]` (quantized here, per token) and an FP8 `W` `[N, K]` with `[1, N]` scales."""
    rows = x.reshape(-1, weight.shape[1])
    quantized, scale = quantize_rows(rows)
    out = torch._scaled_mm(quantized, weight.t(), scale_a=scale, scale_b=weight_scale, out_dtype=x.dtype)
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


class Fp8Linear(nn.Module):
    """`y = x W^T + b` with `W` stored in float8 e4m3 (per-row scales) and `x` quantized per token."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)  # [N, K] float8
        self.register_buffer("weight_scale", weight_scale)  # [1, N] float32
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Fp8Linear:
        return cls(*_quantized_weight([linear]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_product(x, self.weight, self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8=e4m3"


class Fp8Fused(Fp8Linear):
    """Several projections of the same input as one FP8 matmul: `forward(x)` is the tuple of their outputs.

    `pending` holds the outputs of the last fused call until every slice has picked its own up (`Fp8Slice`)."""

    def __init__(self, weight, weight_scale, bias, sizes: tuple[int, ...]):
        super().__init__(weight, weight_scale, bias)
        self.sizes = tuple(sizes)
        self.pending: tuple[torch.Tensor, dict[int, torch.Tensor]] | None = None

    @classmethod
    def from_linears(cls, linears: list[nn.Linear]) -> Fp8Fused:
        return cls(*_quantized_weight(linears), sizes=tuple(len(linear.weight) for linear in linears))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.split(super().forward(x), self.sizes, dim=-1)

    def one(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Slice `index` alone (the same quantization of `x`, this slice's weight rows)."""
        start = sum(self.sizes[:index])
        rows = slice(start, start + self.sizes[index])
        bias = None if self.bias is None else self.bias[rows]
        return fp8_product(x, self.weight[rows], self.weight_scale[:, rows].contiguous(), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.sizes}, fp8=e4m3, fused"


class Fp8Slice(nn.Module):
    """One projection of an `Fp8Fused` group, where the model's code calls it (`self.q_proj(x)`).

    Slice 0 makes the fused call and leaves the others' outputs with the group; the others take theirs when
    called with that same input tensor, and otherwise compute their own slice (the same result, unfused)."""

    def __init__(self, group: Fp8Fused, index: int):
        super().__init__()
        object.__setattr__(self, "group", group)  # registered once, on the parent module, not in every slice
        self.index = index
        self.in_features = group.in_features
        self.out_features = group.sizes[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.group
        if self.index == 0:
            outputs = group(x)
            group.pending = (x, dict(enumerate(outputs[1:], start=1)))
            return outputs[0]
        pending = group.pending
        if pending is not None and pending[0] is x and self.index in pending[1]:
            waiting = dict(pending[1])
            out = waiting.pop(self.index)
            group.pending = (x, waiting) if waiting else None
            return out
        return group.one(x, self.index)

    def extra_repr(self) -> str:
        return f"slice {self.index} of a fused FP8 matmul, in_features={self.in_features}, out_features={self.out_features}"


def fp8_problem(device) -> str | None:
    """None if FP8 matmuls run on `device`; else why not (FP8 tensor cores need compute capability 8.9+)."""
    device = torch.device(device)
    if not hasattr(torch, "_scaled_mm"):
        return "this torch has no torch._scaled_mm"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            return f"FP8 matmuls need an Ada or Hopper GPU (compute capability 8.9+), this one is {major}.{minor}"
    return None


def kept_layers(count: int, keep: Iterable[str]) -> set[int]:
    """Indices of the decoder layers `keep` leaves entirely in bf16."""
    keep = set(keep)
    return ({0} if "first" in keep else set()) | ({count - 1} if "last" in keep else set())


def conversion(language_model) -> dict | None:
    """How `language_model` was converted (`{"keep": (...), "fused": bool}`), or None if it was not."""
    return getattr(language_model, CONVERTED, None)


def convert_to_fp8(language_model, keep: Iterable[str] = (), fuse: bool = True) -> int:
    """Replace, in place, the linear layers of the decoder layers by FP8 ones, except what `keep` names
    (`first`, `last`, `down_proj`); q/k/v and gate/up fused unless `fuse` is False. Returns how many linears
    now run in FP8 (0 for a model already converted)."""
    if conversion(language_model) is not None:
        return 0
    problem = fp8_problem(language_model.embed_tokens.weight.device)
    if problem is not None:
        raise RuntimeError(f"quantization='fp8' cannot run here: {problem}")
    keep = tuple(keep)
    unknown = set(keep) - {"first", "last", "down_proj"}
    if unknown:
        raise ValueError(f"fp8 keep: unknown parts {sorted(unknown)}")
    spared = kept_layers(len(language_model.layers), keep)
    converted = 0
    for index, layer in enumerate(language_model.layers):
        if index in spared:
            continue
        for parent_name in ("self_attn", "mlp"):
            parent = getattr(layer, parent_name)
            names = [n for n in TARGETS if isinstance(getattr(parent, n, None), nn.Linear)]
            names = [n for n in names if not (n == "down_proj" and "down_proj" in keep)]
            fused_name, group = GROUPS[parent_name]
            if fuse and all(n in names for n in group):
                fused = Fp8Fused.from_linears([getattr(parent, n) for n in group])
                parent.add_module(fused_name, fused)
                for slot, n in enumerate(group):
                    setattr(parent, n, Fp8Slice(fused, slot))
                converted += len(group)
                names = [n for n in names if n not in group]
            for n in names:
                setattr(parent, n, Fp8Linear.from_linear(getattr(parent, n)))
                converted += 1
    setattr(language_model, CONVERTED, {"keep": tuple(sorted(keep)), "fused": fuse})
    return converted


def decoder_linears(language_model) -> dict[tuple[int, str, str], nn.Module]:
    """The decoder layers' projections as they are now, to put back with `restore_linears` (the benchmark
    converts one model several ways)."""
    return {
        (index, parent_name, name): getattr(getattr(layer, parent_name), name)
        for index, layer in enumerate(language_model.layers)
        for parent_name in ("self_attn", "mlp")
        for name in TARGETS
        if getattr(getattr(layer, parent_name), name, None) is not None
    }


def restore_linears(language_model, saved: dict[tuple[int, str, str], nn.Module]) -> None:
    """Undo `convert_to_fp8` with the modules `decoder_linears` saved before it."""
    for (index, parent_name, name), module in saved.items():
        parent = getattr(language_model.layers[index], parent_name)
        setattr(parent, name, module)
        fused_name = GROUPS[parent_name][0]
        if fused_name in parent._modules:
            del parent._modules[fused_name]
    if conversion(language_model) is not None:
        delattr(language_model, CONVERTED)
