"""FP8 matmuls for the decoder layers: float8 e4m3 weights and activations, bf16 (or float32) out.

Each `nn.Linear` of the language model's decoder layers becomes an `Fp8Linear`: its weight is quantized once,
with one scale per output row; its input is quantized on the fly, with one scale per token; the product runs
in `torch._scaled_mm` (FP8 tensor cores on Hopper/Ada GPUs, about 1.8x bf16 on an H100; a reference kernel on
CPUs) and comes out in the input's dtype. The vision tower, embeddings and norms stay as they are: they are a
small share of the FLOPs and the most sensitive to precision.
"""

from __future__ import annotations

import torch
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`x` `[M, K]` as float8 e4m3 with one float32 scale per row (`[M, 1]`): `x ~ q * scale`."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-12)
    scale = amax / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


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
        out_features, in_features = linear.weight.shape
        if in_features % 16 or out_features % 16:
            raise ValueError(f"FP8 matmuls need sizes divisible by 16, got {out_features}x{in_features}")
        weight, scale = quantize_rows(linear.weight.detach())
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(weight, scale.reshape(1, -1), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        quantized, scale = quantize_rows(rows)
        out = torch._scaled_mm(
            quantized, self.weight.t(), scale_a=scale, scale_b=self.weight_scale, out_dtype=x.dtype
        )
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8=e4m3"


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


def convert_to_fp8(language_model) -> int:
    """Replace, in place, the linear layers of every decoder layer by `Fp8Linear`s; returns how many."""
    problem = fp8_problem(language_model.embed_tokens.weight.device)
    if problem is not None:
        raise RuntimeError(f"quantization='fp8' cannot run here: {problem}")
    converted = 0
    for layer in language_model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in TARGETS:
                module = getattr(parent, name, None)
                if isinstance(module, nn.Linear):
                    setattr(parent, name, Fp8Linear.from_linear(module))
                    converted += 1
    return converted
