"""FP8 matmuls: the scaling math is exact up to float8 rounding, and vectors stay close to full precision."""

import numpy as np
import pytest
import torch

from pipelines.embedder import Embedder
from pipelines.fp8 import FP8, Fp8Linear, convert_to_fp8, quantize_rows
from tests.conftest import make_image

ITEMS = [
    "A much longer sentence about the old ship that carries three apples near the sea, again and again.",
    "short",
    {"image": make_image(10, (64, 64))},
    {"text": "a picture of a quiet garden", "image": make_image(11, (200, 96))},
]


def test_rows_are_quantized_with_one_scale_each_and_the_largest_value_maps_to_448():
    x = torch.randn(5, 32) * torch.tensor([[1.0], [10.0], [0.01], [300.0], [1.0]])
    q, scale = quantize_rows(x)
    assert q.dtype == FP8 and scale.shape == (5, 1)
    torch.testing.assert_close(q.float().abs().amax(dim=1), torch.full((5,), 448.0))
    relative = (q.float() * scale - x).norm(dim=1) / x.norm(dim=1)
    assert float(relative.max()) < 0.05  # e4m3: 3 mantissa bits


def test_fp8_linear_computes_the_dequantized_product():
    generator = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(64, 48, bias=True)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(48, 64, generator=generator))
        linear.bias.copy_(torch.randn(48, generator=generator))
    fp8 = Fp8Linear.from_linear(linear)
    x = torch.randn(2, 7, 64, generator=generator)
    got = fp8(x)
    # the same product written out: dequantize both sides, multiply in float64
    xq, xs = quantize_rows(x.reshape(-1, 64))
    expected = (xq.double() * xs.double()) @ (fp8.weight.double() * fp8.weight_scale.double().T).T
    expected = (expected + linear.bias.double()).reshape(2, 7, 48)
    torch.testing.assert_close(got.double(), expected, atol=1e-4, rtol=1e-5)
    # and close to the full-precision layer
    with torch.no_grad():
        full = linear(x)
    assert float((got - full).norm() / full.norm()) < 0.06


def test_sizes_not_divisible_by_16_are_refused():
    with pytest.raises(ValueError, match="divisible by 16"):
        Fp8Linear.from_linear(torch.nn.Linear(24, 16))


def test_fp8_embedder_converts_every_decoder_linear_and_stays_close_to_float32(tiny_model_dir, embedder):
    fp8 = Embedder.load(str(tiny_model_dir), device="cpu", quantization="fp8")
    layers = fp8.model.language_model.layers
    assert sum(isinstance(m, Fp8Linear) for m in layers.modules()) == 7 * len(layers)
    assert not any(isinstance(m, Fp8Linear) for m in fp8.model.visual.modules())
    full = embedder.embed_batch(ITEMS)
    for layout in ("padded", "packed"):
        got = Embedder(
            fp8.model,
            fp8.tokenizer,
            image_processor=fp8.image_processor,
            quantization="fp8",
            attention_layout=layout,
        ).embed_batch(ITEMS)
        cosines = np.sum(got * full, axis=1)
        print(f"fp8 vs float32, {layout}: cosines {np.round(cosines, 5)}")
        # random weights: the bound depends on the checkpoint (tiny build 1: >= 0.99; build 2: min 0.988)
        assert cosines.min() >= 0.98, (layout, cosines)
        assert cosines.min() < 0.99999  # it really is quantized


def test_an_already_converted_model_is_not_converted_again(tiny_model_dir):
    fp8 = Embedder.load(str(tiny_model_dir), device="cpu", quantization="fp8")
    before = fp8.embed_batch(ITEMS[:2])
    assert convert_to_fp8(fp8.model.language_model) == 0  # nothing left to convert
    again = Embedder(fp8.model, fp8.tokenizer, image_processor=fp8.image_processor, quantization="fp8")
    np.testing.assert_allclose(again.embed_batch(ITEMS[:2]), before, atol=1e-6)
