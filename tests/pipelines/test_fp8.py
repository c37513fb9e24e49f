"""FP8 matmuls: the scaling math is exact up to float8 rounding, and vectors stay close to full precision."""

import shutil

import numpy as np
import pytest
import torch

from pipelines.embedder import Embedder
from pipelines.fp8 import FP8, TARGETS, Fp8Fused, Fp8Linear, Fp8Slice, convert_to_fp8, quantize_rows
from tests.conftest import make_image, on_the_same_weights

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
    projections = [
        getattr(getattr(layer, part), name)
        for layer in layers
        for part in ("self_attn", "mlp")
        for name in TARGETS
        if hasattr(getattr(layer, part), name)
    ]
    assert len(projections) == 7 * len(layers)
    assert all(isinstance(m, (Fp8Linear, Fp8Slice)) for m in projections)
    assert not any(isinstance(m, Fp8Linear) for m in fp8.model.visual.modules())
    full = embedder.embed_batch(ITEMS)
    for layout in ("padded", "packed"):
        got = on_the_same_weights(fp8, quantization="fp8", attention_layout=layout).embed_batch(ITEMS)
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


# -- fused q/k/v and gate/up, parts kept in bf16 (issue 17) -------------------------------------------------

U32 = 2.0**-24  # float32 unit roundoff


def _linears(sizes, in_features, generator, bias=False):
    linears = []
    for size in sizes:
        linear = torch.nn.Linear(in_features, size, bias=bias)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(size, in_features, generator=generator) * 0.05)
            if bias:
                linear.bias.copy_(torch.randn(size, generator=generator))
        linears.append(linear)
    return linears


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_a_fused_group_equals_its_projections_in_fp8_within_float32_accumulation(out_dtype, bias):
    """Per-row weight scales do not depend on which rows sit together, and the activation is the same
    tensor, so fused and separate products multiply the same float8 numbers; e4m3 x e4m3 products are exact
    in float32 (4+4 significant bits), and only the order of the K additions (and the two scale products)
    may differ. Recursive summation is off by at most gamma_K = K u / (1 - K u) times sum |terms| each way,
    so the two differ by at most 2 (gamma_K + 2u) sum |terms|. In bf16 (u = 2^-8) the product is rounded,
    the bias added and rounded again: at most one bf16 step more for each, 2^-7 (sum |terms| + |y|)."""
    generator = torch.Generator().manual_seed(1)
    in_features, sizes = 256, (64, 32, 32)
    linears = [linear.to(out_dtype) for linear in _linears(sizes, in_features, generator, bias)]
    fused = Fp8Fused.from_linears(linears)
    x = (torch.randn(3, 11, in_features, generator=generator) * 3).to(out_dtype)
    together = fused(x)
    assert [t.shape[-1] for t in together] == list(sizes)
    xq, xs = quantize_rows(x.reshape(-1, in_features))
    for linear, got in zip(linears, together, strict=True):
        alone = Fp8Linear.from_linear(linear)
        # the same float8 weight rows and scales as the group's share
        expected = alone(x)
        terms = (xq.double().abs() * xs.double()) @ (
            alone.weight.double().abs() * alone.weight_scale.double().T
        ).T
        gamma = in_features * U32 / (1 - in_features * U32)
        bound = 2 * (gamma + 2 * U32) * terms.reshape(expected.shape)
        if out_dtype == torch.bfloat16:
            bound = bound + 2.0**-7 * 1.01 * (terms.reshape(expected.shape) + expected.double().abs())
        assert got.dtype == out_dtype
        assert bool(((got.double() - expected.double()).abs() <= bound).all())
        # and each slice alone (the path a caller with another input takes) is the same product again
        index = linears.index(linear)
        assert bool(((fused.one(x, index).double() - expected.double()).abs() <= bound).all())


def test_slices_share_one_fused_call_and_an_other_input_gets_its_own_product(monkeypatch):
    generator = torch.Generator().manual_seed(2)
    linears = _linears((32, 16, 16), 64, generator)
    fused = Fp8Fused.from_linears(linears)
    q, k, v = (Fp8Slice(fused, i) for i in range(3))
    x, other = torch.randn(5, 64, generator=generator), torch.randn(5, 64, generator=generator)
    calls = []
    monkeypatch.setattr(Fp8Fused, "one", lambda self, x, index: calls.append(index) or torch.zeros(1))
    outputs = (q(x), k(x), v(x))
    assert calls == [] and fused.pending is None  # k and v took the fused call's outputs, then it let go
    for got, linear in zip(outputs, linears, strict=True):
        torch.testing.assert_close(got, Fp8Linear.from_linear(linear)(x), atol=1e-5, rtol=1e-5)
    q(x)
    k(other)  # not the input q saw: its own product
    assert calls == [1]


def _projections(layer):
    return {
        (part, name): getattr(getattr(layer, part), name)
        for part in ("self_attn", "mlp")
        for name in TARGETS
        if hasattr(getattr(layer, part), name)
    }


def test_fp8_keep_leaves_the_first_and_last_layers_and_down_proj_as_linears(tiny_model_dir):
    reference = Embedder.load(str(tiny_model_dir), device="cpu")
    kept = Embedder.load(
        str(tiny_model_dir), device="cpu", quantization="fp8", fp8_keep="first,last,down_proj"
    )
    layers, original = kept.model.language_model.layers, reference.model.language_model.layers
    for index in (0, len(layers) - 1):
        for key, module in _projections(layers[index]).items():
            assert type(module) is torch.nn.Linear, (index, key)
            assert torch.equal(module.weight, _projections(original[index])[key].weight)
    for layer in layers[1:-1]:
        projections = _projections(layer)
        assert type(projections["mlp", "down_proj"]) is torch.nn.Linear
        assert isinstance(projections["self_attn", "q_proj"], Fp8Slice)
        assert isinstance(projections["self_attn", "o_proj"], Fp8Linear)
        assert isinstance(projections["mlp", "up_proj"], Fp8Slice)


@pytest.mark.parametrize("keep, exact", [("first", True), ("last", False)])
def test_a_kept_first_layer_computes_exactly_what_the_unquantized_model_does(tiny_model_dir, keep, exact):
    """Vectors taken after the first decoder layer (layer=1): nothing quantized has run when it is kept."""
    reference = Embedder.load(str(tiny_model_dir), device="cpu", layer=1)
    fp8 = Embedder.load(str(tiny_model_dir), device="cpu", layer=1, quantization="fp8", fp8_keep=[keep])
    got, expected = fp8.embed_batch(ITEMS), reference.embed_batch(ITEMS)
    assert np.array_equal(got, expected) is exact


def test_an_embedder_refuses_a_model_converted_with_other_kept_parts(tiny_model_dir):
    fp8 = Embedder.load(str(tiny_model_dir), device="cpu", quantization="fp8", fp8_keep=["down_proj"])
    with pytest.raises(ValueError, match="load the model again"):
        Embedder(fp8.model, fp8.tokenizer, image_processor=fp8.image_processor, quantization="fp8")


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("keep", [(), ("first", "last", "down_proj")])
def test_fp8_vectors_do_not_depend_on_padding(tiny_model_dir, padding_side, keep):
    """Activations are quantized per token, so a padded neighbour changes no real token's scale."""
    fp8 = Embedder.load(
        str(tiny_model_dir), device="cpu", quantization="fp8", fp8_keep=keep, padding_side=padding_side
    )
    assert fp8.engine.layout == "padded"
    together = fp8.embed_batch(ITEMS)
    for index, item in enumerate(ITEMS):
        np.testing.assert_allclose(together[index], fp8.embed_batch([item])[0], atol=1e-5, rtol=0)


def test_every_variant_stays_close_and_keeping_parts_moves_the_vectors_less():
    from benchmarks.fp8_cosine import VARIANTS, measure

    result = measure("tiny", items=8, log=lambda line: print(line))
    assert set(result["variants"]) == set(VARIANTS)
    worst = {name: v["cosine_to_float32"]["min"] for name, v in result["variants"].items()}
    assert all(0.98 <= c < 0.99999 for c in worst.values()), worst
    assert abs(worst["all"] - worst["all, unfused"]) < 1e-4  # fusing changes the accumulation order only
    assert worst["keep first+last+down_proj"] > worst["all"]


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None, reason="needs a C++ compiler"
)
def test_compiled_fused_fp8_takes_the_fused_path_in_the_same_two_graphs(tiny_model_dir, monkeypatch):
    """Compiled, the slices still share one fused call (the unfused fallback made to fail), and a decoder
    layer is still one graph shared by every layer (plus the vision block's): no graph break."""
    from torch._dynamo.utils import counters

    def unfused(self, x, index):
        raise AssertionError("a slice computed its own product")

    monkeypatch.setattr(Fp8Fused, "one", unfused)
    torch._dynamo.reset()
    options = dict(quantization="fp8", fp8_keep=["down_proj"], attention_layout="packed")
    eager = Embedder.load(str(tiny_model_dir), device="cpu", **options)
    expected = eager.embed_batch(ITEMS)
    compiled = Embedder(
        eager.model, eager.tokenizer, image_processor=eager.image_processor, compile=True, **options
    )
    before, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    np.testing.assert_allclose(compiled.embed_batch(ITEMS), expected, atol=1e-5, rtol=0)
    assert counters["stats"]["unique_graphs"] - before == 2
    assert sum(counters["graph_break"].values()) == breaks
