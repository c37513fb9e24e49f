"""The generator answers with the embedder's own weights: one copy of the model serves both."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.config import EmbedderConfig
from pipelines.generation import GenerationUnsupported, Generator, SamplingOptions, generation_refusal
from tests.conftest import make_image

GREEDY = SamplingOptions(max_new_tokens=24, temperature=0)


@pytest.fixture(scope="module")
def generator(tiny_model_dir):
    return Generator.load(str(tiny_model_dir), device="cpu", dtype="float32")


def _storages(module) -> dict[int, int]:
    """Bytes of each distinct tensor storage behind a module's parameters and buffers, by address."""
    tensors = [*module.parameters(), *module.buffers()]
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


def test_the_embedder_runs_on_the_generation_models_own_tensors(generator, embedder):
    base = generator.model.model
    assert generator.embedder.model is base
    generation_params = dict(generator.model.named_parameters())
    for name, tensor in generator.embedder.model.named_parameters():
        assert tensor is generation_params[f"model.{name}"], name
        assert tensor.data_ptr() == generation_params[f"model.{name}"].data_ptr(), name
    # the tiny Instruct checkpoint ties its LM head to the token embeddings, as Qwen3-VL-2B-Instruct does
    assert generator.model.lm_head.weight is base.language_model.embed_tokens.weight
    # memory not doubled: embedder and generator together hold exactly the storage of one base model
    together = {**_storages(generator.model), **_storages(generator.embedder.model)}
    assert sum(together.values()) == sum(_storages(embedder.model).values())


def test_the_shared_embedder_gives_the_vectors_of_a_base_model_loaded_alone(generator, embedder):
    items = ["a red circle", {"image": make_image(3)}, {"text": "a caption", "image": make_image(4)}]
    np.testing.assert_allclose(generator.embedder.embed_batch(items), embedder.embed_batch(items), atol=1e-5)


@pytest.mark.parametrize(
    "model, why",
    [
        ("tiny-embedding", "embedding-only"),
        ("Qwen/Qwen3-VL-Embedding-2B", "embedding-only"),
        ("tiny-reranker", "reranker"),
        ("Qwen/Qwen3-VL-Reranker-2B", "reranker"),
    ],
)
def test_embedding_only_and_reranker_checkpoints_refuse_to_generate_before_loading(model, why):
    assert why in generation_refusal(EmbedderConfig(model=model))
    with pytest.raises(GenerationUnsupported, match=why):
        Generator.load(model)  # a hub id: it would fail on the network if it got as far as loading


def test_an_embedding_checkpoint_directory_is_refused(tiny_embedding_dir):
    with pytest.raises(GenerationUnsupported, match="embedding-only"):
        Generator.load(str(tiny_embedding_dir), device="cpu")


def test_instruct_checkpoints_can_generate():
    assert generation_refusal(EmbedderConfig(model="Qwen/Qwen3-VL-2B-Instruct")) is None
    assert generation_refusal(EmbedderConfig(model="tiny")) is None


def test_the_prompt_is_the_chat_template_with_one_image_token_per_merged_patch(generator):
    image = make_image(5, (64, 96))
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What?"}]},
    ]
    prompt = generator.prompt(messages)
    assert prompt.text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert prompt.text.endswith("What?<|im_end|>\n<|im_start|>assistant\n")
    image_tokens = int((prompt.input_ids == generator.prompts.image_token_id).sum())
    assert image_tokens == int(np.prod(prompt.image_grid_thw[0])) // 4 > 1
    completion = generator.generate(prompt, GREEDY)
    assert completion.prompt_token_ids == prompt.input_ids.tolist()
    assert 0 < completion.completion_tokens <= GREEDY.max_new_tokens


def test_streamed_pieces_join_into_the_same_greedy_answer(generator):
    prompt = generator.prompt([{"role": "user", "content": "Tell me about the red car."}])
    stream = generator.stream(prompt, GREEDY)
    pieces = list(stream)
    assert len(pieces) > 1
    whole = generator.generate(prompt, GREEDY)
    assert "".join(pieces) == stream.completion.text == whole.text != ""
    assert stream.completion.completion_tokens == whole.completion_tokens
    if whole.completion_tokens == GREEDY.max_new_tokens:
        assert whole.finish_reason == "length"


def test_closing_a_stream_stops_the_generation_early(generator):
    prompt = generator.prompt([{"role": "user", "content": "Go on for a long time."}])
    long = SamplingOptions(max_new_tokens=200, temperature=0)
    assert generator.generate(prompt, long).completion_tokens == 200  # left alone, it runs to the limit
    stream = generator.stream(prompt, long)
    iterator = iter(stream)
    next(iterator)
    stream.close()
    list(iterator)
    assert stream.completion.completion_tokens < 100
