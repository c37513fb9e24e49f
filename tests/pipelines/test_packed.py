"""The packed layout computes the same vectors as the plain transformers forward and as the padded layout,
with the default engine (the model's own layers through transformers' AttentionInterface) and the legacy one."""

import shutil

import numpy as np
import pytest
import torch

from pipelines.batching import plan_batches
from pipelines.embedder import Embedder
from pipelines.packed import pack
from pipelines.warm_up import full_steps
from tests.conftest import make_image
from tests.pipelines.reference import VISION, embed_item, reference_embedding, reference_inputs

TEXT = "The quick red car follows two white clouds near the sea."
CASES = {
    "text": (TEXT, None),
    "image": ("", make_image(1, (120, 90))),
    "text+image": ("a photo of the garden", make_image(2, (64, 160))),
}
MIXED = [
    "short",
    {"image": make_image(10, (64, 64))},
    "A much longer sentence about the old ship that carries three apples near the sea, again and again.",
    {"text": "a picture of a quiet garden", "image": make_image(11, (200, 96))},
    "Number 42 and 294: xxB",
    {"text": "medium length text with an image", "image": make_image(12, (48, 140))},
]


@pytest.fixture(scope="module")
def generation_model(tiny_model_dir):
    from transformers import Qwen3VLForConditionalGeneration

    return Qwen3VLForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def _embedder(model, parts, **options):
    return Embedder(model, parts.tokenizer, image_processor=parts.image_processor, **options)


ENGINES = ["hooks", "legacy"]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("modality", sorted(CASES))
@pytest.mark.parametrize("layer", [-1, 2])
@pytest.mark.parametrize("pooling", ["mean", "cls", "max", "last"])
def test_packed_layout_matches_the_plain_forward(
    generation_model, embedder, modality, layer, pooling, engine
):
    text, image = CASES[modality]
    packed = _embedder(
        generation_model, embedder, pooling=pooling, layer=layer, attention_layout="packed", engine=engine
    )
    prompt = (VISION if image is not None else "") + text
    inputs = reference_inputs(embedder.tokenizer, embedder.image_processor, prompt, image)
    expected = reference_embedding(generation_model, inputs, layer, pooling)
    np.testing.assert_allclose(packed.embed_batch([embed_item(text, image)])[0], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("engine", ENGINES)
def test_every_layer_index_in_the_packed_layout_matches_the_plain_forward(generation_model, embedder, engine):
    image = make_image(3)
    inputs = reference_inputs(embedder.tokenizer, embedder.image_processor, VISION + TEXT, image)
    for layer in range(-5, 5):  # 0: embeddings; 1..3: before/after deepstack; 4: after the final norm
        packed = _embedder(generation_model, embedder, layer=layer, attention_layout="packed", engine=engine)
        expected = reference_embedding(generation_model, inputs, layer, "mean")
        got = packed.embed_batch([{"text": TEXT, "image": image}])[0]
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0, err_msg=f"layer {layer}")


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("layer", [-1, 1, 2])
@pytest.mark.parametrize("pooling", ["mean", "cls", "max", "last"])
def test_packed_and_padded_layouts_give_the_same_vectors_for_a_mixed_batch(embedder, pooling, layer, engine):
    padded = _embedder(embedder.model, embedder, pooling=pooling, layer=layer)
    packed = _embedder(
        embedder.model, embedder, pooling=pooling, layer=layer, attention_layout="packed", engine=engine
    )
    np.testing.assert_allclose(packed.embed_batch(MIXED), padded.embed_batch(MIXED), atol=1e-5, rtol=0)


def test_qwen3_vl_embedding_recipe_gives_the_same_vectors_packed(embedder):
    options = dict(recipe="qwen3-vl-embedding", dimensions=32)
    padded = _embedder(embedder.model, embedder, **options)
    packed = _embedder(embedder.model, embedder, attention_layout="packed", **options)
    np.testing.assert_allclose(packed.embed_batch(MIXED), padded.embed_batch(MIXED), atol=1e-5, rtol=0)


def test_an_item_alone_equals_the_same_item_packed_with_others(embedder):
    packed = _embedder(embedder.model, embedder, attention_layout="packed", layer=2, pooling="max")
    together = packed.embed_batch(MIXED)
    for index, item in enumerate(MIXED):
        np.testing.assert_allclose(together[index], packed.embed_batch([item])[0], atol=1e-5, rtol=0)


def test_tight_token_budgets_split_packed_steps_without_changing_vectors(tiny_model_dir, embedder):
    packed = Embedder.load(str(tiny_model_dir), device="cpu", attention_layout="packed")
    tight = Embedder.load(str(tiny_model_dir), device="cpu", attention_layout="packed", max_batch_tokens=40)
    prepared = [packed.prepare(item) for item in MIXED]
    assert len(plan_batches([p.num_tokens for p in prepared], 40, 256, layout="packed")) > 2
    np.testing.assert_allclose(tight.embed_batch(MIXED), packed.embed_batch(MIXED), atol=1e-5, rtol=0)
    np.testing.assert_allclose(
        packed.embed_batch(MIXED, batch_size=1), embedder.embed_batch(MIXED), atol=1e-5
    )


def test_small_memory_chunks_give_the_same_vectors(embedder):
    packed = _embedder(embedder.model, embedder, attention_layout="packed", layer=2, engine="legacy")
    whole = packed.embed_batch(MIXED)
    packed.engine.tokens_per_call = 7  # the per-token half of every layer in pieces of 7 tokens
    packed.engine.patches_per_call = 20  # the vision tower one or two images at a time
    np.testing.assert_allclose(packed.embed_batch(MIXED), whole, atol=1e-5, rtol=0)
    np.testing.assert_allclose(
        whole, _embedder(embedder.model, embedder, layer=2).embed_batch(MIXED), atol=1e-5
    )


def test_small_image_groups_give_the_same_vectors(embedder):
    packed = _embedder(embedder.model, embedder, attention_layout="packed", layer=2)
    whole = packed.embed_batch(MIXED)
    packed.engine.vision.patches_per_call = 20  # the vision tower one or two images at a time
    np.testing.assert_allclose(packed.embed_batch(MIXED), whole, atol=1e-5, rtol=0)
    np.testing.assert_allclose(
        whole, _embedder(embedder.model, embedder, layer=2).embed_batch(MIXED), atol=1e-5
    )


def test_images_are_grouped_by_patches_in_order():
    from pipelines.vision import image_groups as _image_groups

    grid = torch.tensor([[1, 4, 4], [1, 2, 2], [1, 8, 8], [1, 2, 2], [1, 2, 2]])  # 16, 4, 64, 4, 4 patches
    assert _image_groups(grid, 20) == [slice(0, 2), slice(2, 3), slice(3, 5)]
    assert _image_groups(grid, 1000) == [slice(0, 5)]
    assert _image_groups(grid, 1) == [slice(i, i + 1) for i in range(5)]


SAME_SIZES = [
    {"image": make_image(20, (64, 64))},
    {"text": "the same size again", "image": make_image(21, (64, 64))},
    {"image": make_image(22, (96, 48))},
    {"image": make_image(23, (64, 64))},
]


def test_image_positions_are_computed_once_per_size_and_reused_with_the_same_vectors(
    generation_model, embedder
):
    packed = _embedder(generation_model, embedder, attention_layout="packed", layer=-1, pooling="mean")
    first = packed.embed_batch(SAME_SIZES)
    positions = packed.engine.vision.positions
    assert len(positions._entries) == 2  # two sizes among four images
    np.testing.assert_allclose(packed.embed_batch(SAME_SIZES), first, atol=1e-6, rtol=0)  # from the cache
    for item, vector in zip(SAME_SIZES, first, strict=True):
        prompt = VISION + item.get("text", "")
        inputs = reference_inputs(embedder.tokenizer, embedder.image_processor, prompt, item["image"])
        np.testing.assert_allclose(
            vector, reference_embedding(generation_model, inputs, -1, "mean"), atol=1e-5
        )


def test_the_image_position_cache_keeps_within_its_patch_bound_and_still_gives_the_same_vectors(embedder):
    packed = _embedder(embedder.model, embedder, attention_layout="packed")
    whole = packed.embed_batch(SAME_SIZES + MIXED)
    positions = packed.engine.vision.positions
    positions.max_patches = 20
    bounded = packed.embed_batch(SAME_SIZES + MIXED)
    assert len(positions._entries) == 1  # every size here is over 20 patches: only the latest is kept
    np.testing.assert_allclose(bounded, whole, atol=1e-6, rtol=0)
    positions.max_patches = 10**6
    packed.embed_batch(SAME_SIZES + MIXED)
    assert positions.patches == sum(entry[0].shape[0] for entry in positions._entries.values()) > 20


def test_flex_attention_backend_gives_the_same_vectors_as_sdpa(embedder):
    sdpa = _embedder(embedder.model, embedder, attention_layout="packed", varlen_attention="sdpa")
    flex = _embedder(embedder.model, embedder, attention_layout="packed", varlen_attention="flex")
    np.testing.assert_allclose(flex.embed_batch(MIXED), sdpa.embed_batch(MIXED), atol=1e-5, rtol=0)


def test_a_backend_that_cannot_run_here_is_a_clear_error(embedder):
    with pytest.raises(RuntimeError, match="flash.*needs CUDA"):
        _embedder(embedder.model, embedder, attention_layout="packed", varlen_attention="flash")


def test_compile_needs_the_packed_layout():
    from pydantic import ValidationError

    from pipelines.config import EmbedderConfig

    with pytest.raises(ValidationError, match="compile=True needs attention_layout='packed'"):
        EmbedderConfig(compile=True)


def test_packing_lays_items_end_to_end_with_their_own_positions(embedder):
    prepared = [embedder.prepare(item) for item in MIXED[:4]]
    batch = pack(prepared, embedder.model.config.image_token_id)
    assert batch.lengths == [p.num_tokens for p in prepared]
    assert batch.input_ids.shape == (sum(batch.lengths),)
    start = 0
    for p in prepared:
        np.testing.assert_array_equal(batch.input_ids[start : start + p.num_tokens].numpy(), p.input_ids)
        np.testing.assert_array_equal(
            batch.position_ids[:, start : start + p.num_tokens].numpy(), p.position_ids
        )
        start += p.num_tokens
    image_tokens = sum(int((p.input_ids == embedder.model.config.image_token_id).sum()) for p in prepared)
    assert batch.image_positions.shape == (image_tokens,)
    assert batch.image_grid_thw.shape == (2, 3)


def test_steps_run_in_order_with_the_next_one_packed_meanwhile(embedder):
    packed = _embedder(embedder.model, embedder, attention_layout="packed")
    prepared = [embedder.prepare(item) for item in MIXED + SAME_SIZES]
    steps = [prepared[:3], prepared[3:4], prepared[4:]]
    pooled = list(packed.engine.forward_steps(steps))
    assert [p.shape[0] for p in pooled] == [3, 1, len(prepared) - 4]
    for step, vectors in zip(steps, pooled, strict=True):
        torch.testing.assert_close(vectors, packed.engine.forward(step), atol=1e-6, rtol=0)
    assert list(packed.engine.forward_steps([])) == []
    (alone,) = packed.engine.forward_steps(steps[:1])  # one step: run in place
    torch.testing.assert_close(alone, pooled[0], atol=1e-6, rtol=0)


def test_a_bad_step_raises_from_the_packing_thread(embedder):
    packed = _embedder(embedder.model, embedder, attention_layout="packed")
    with pytest.raises(ValueError, match="empty batch"):
        list(packed.engine.forward_steps([[embedder.prepare("fine")], []]))


def test_warm_up_runs_text_and_image_steps(embedder):
    packed = _embedder(embedder.model, embedder, attention_layout="packed")
    assert packed.warm_up(image_side=64) > 0
    assert embedder.warm_up() > 0


def test_the_full_warm_up_steps_fill_the_token_budget_and_run(embedder):
    """What `warm_up` adds on a GPU (one full step of texts, one of images), run here on the CPU."""
    config = embedder.model.config
    texts, images = full_steps(config, 2048, image_side=64)
    for step in (texts, images):
        tokens = sum(item.num_tokens for item in step)
        assert 2048 - step[0].num_tokens < tokens <= 2048
    assert images[0].pixel_values is not None and texts[0].pixel_values is None
    packed = _embedder(embedder.model, embedder, attention_layout="packed")
    for step in (texts, images):
        vectors = packed.forward(step).cpu().numpy()
        np.testing.assert_allclose(vectors, np.repeat(vectors[:1], len(step), axis=0), atol=1e-5)
    assert len(full_steps(config, 2048)) == 1  # no image side: texts only
    assert packed.engine.run_full_steps(2048, image_side=64) == 5  # texts, images three times, a half step
    assert packed.engine.run_full_steps(2048) == 1  # texts: nothing pinned, one step


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None, reason="needs a C++ compiler"
)
@pytest.mark.parametrize("engine", ENGINES)
def test_compiled_packed_layout_gives_the_same_vectors_and_compiles_each_half_once(embedder, engine):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # whatever compiled these functions before in this process: compile them here
    eager = _embedder(embedder.model, embedder, attention_layout="packed", layer=2, engine=engine)
    compiled = _embedder(
        embedder.model, embedder, attention_layout="packed", layer=2, compile=True, engine=engine
    )
    before = counters["stats"]["unique_graphs"]
    np.testing.assert_allclose(compiled.embed_batch(MIXED), eager.embed_batch(MIXED), atol=1e-5, rtol=0)
    # legacy: four graphs (text qkv/out, vision qkv/out); hooks: two (a text layer and a vision block, the
    # varlen attention one opaque op inside each); shared by every layer
    graphs = {"legacy": 4, "hooks": 2}[engine]
    assert counters["stats"]["unique_graphs"] - before == graphs
    # a different token count and batch reuses them (dynamic shapes): no recompilation
    np.testing.assert_allclose(compiled.embed_batch(MIXED[2:]), eager.embed_batch(MIXED[2:]), atol=1e-5)
    assert counters["stats"]["unique_graphs"] - before == graphs


@pytest.mark.gpu
def test_on_a_gpu_in_bf16_the_packed_layout_uses_flash_and_agrees_with_padded(cuda, tiny_model_dir):
    padded = Embedder.load(str(tiny_model_dir), device="cuda", dtype="bfloat16", attention_layout="padded")
    packed = Embedder(
        padded.model, padded.tokenizer, image_processor=padded.image_processor, attention_layout="packed"
    )
    assert packed.engine.backend == "flash"
    cosines = np.sum(packed.embed_batch(MIXED) * padded.embed_batch(MIXED), axis=1)
    print(f"tiny bf16 packed (flash) vs padded: min cosine {cosines.min():.5f}")
    assert cosines.min() >= 0.99
    # on a GPU a step's pixels are gathered into pinned memory (copied without the host waiting)
    batch = packed.engine._pack([packed.prepare(item) for item in MIXED])
    assert batch.pixel_values.is_pinned() and not batch.input_ids.is_pinned()
    # and steps run with the next one packed meanwhile: the same vectors as one at a time
    prepared = [packed.prepare(item) for item in MIXED + SAME_SIZES]
    steps = [prepared[:3], prepared[3:]]
    for step, vectors in zip(steps, packed.engine.forward_steps(steps), strict=True):
        torch.testing.assert_close(vectors, packed.engine.forward(step), atol=1e-2, rtol=1e-2)
