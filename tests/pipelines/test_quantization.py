"""bitsandbytes 4-bit and 8-bit loading work on the tiny model on the CPU and stay close to float32."""

import numpy as np
import pytest

from pipelines.embedder import Embedder
from tests.conftest import make_image

ITEMS = ["a red car near the sea", {"image": make_image(3)}, {"text": "two apples", "image": make_image(4)}]


@pytest.mark.parametrize(("quantization", "min_cosine"), [("8bit", 0.999), ("4bit", 0.95)])
def test_quantized_embedder_loads_and_stays_close_to_float32(
    tiny_model_dir, embedder, quantization, min_cosine
):
    pytest.importorskip("bitsandbytes")
    quantized = Embedder.load(str(tiny_model_dir), device="cpu", quantization=quantization)
    linear = quantized.model.language_model.layers[0].mlp.up_proj
    assert type(linear).__module__.startswith("bitsandbytes"), type(linear)
    vectors = quantized.embed_batch(ITEMS)
    reference = embedder.embed_batch(ITEMS)
    cosines = (vectors * reference).sum(axis=1)
    assert np.isfinite(vectors).all()
    assert cosines.min() >= min_cosine, cosines
    assert not np.allclose(vectors, reference, atol=1e-6)  # it really is a different (quantized) computation
