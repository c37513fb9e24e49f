"""On a GPU: the 2B shape in bf16 through `Embedder` stays close to the float32 reference forward."""

import copy

import numpy as np
import pytest
import torch

from tests.conftest import make_image
from tests.pipelines.reference import VISION, embed_item, reference_embedding, reference_inputs

pytestmark = pytest.mark.gpu

ITEMS = [
    ("A long sentence about ships, rivers and the morning light over the quiet garden.", None),
    ("", make_image(1, (448, 448))),
    ("a photo of a garden", make_image(2, (640, 360))),
]


def test_2b_shape_in_bf16_matches_the_float32_reference(cuda):
    from pipelines.embedder import Embedder
    from pipelines.model_shapes import random_model, shape_processor_parts

    tokenizer, image_processor = shape_processor_parts()
    reference_model = random_model("2b", tokenizer, device="cuda", dtype=torch.float32, generation=True)
    fast = Embedder(
        copy.deepcopy(reference_model.model).to(torch.bfloat16), tokenizer, image_processor=image_processor
    )
    assert fast.dtype == torch.bfloat16
    items = [embed_item(text, image) for text, image in ITEMS]
    got = fast.embed_batch(items)
    for (text, image), vector in zip(ITEMS, got, strict=True):
        prompt = (VISION if image is not None else "") + text
        inputs = {
            k: v.to("cuda") for k, v in reference_inputs(tokenizer, image_processor, prompt, image).items()
        }
        expected = reference_embedding(reference_model, inputs, -1, "mean")
        cosine = float(np.dot(vector, expected))
        print(
            f"2B bf16 vs float32 reference, {'image' if image is not None else 'text'}: cosine {cosine:.5f}"
        )
        assert cosine >= 0.99
