"""The sentence-transformers backend with the real all-MiniLM-L6-v2: its vectors are the library's own, through
the embedder's prepare/forward/finish contract; images and Qwen3-VL options are refused clearly."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from pydantic import ValidationError

from pipelines.backends import embedding_dimension, load_embedder, load_preparer
from pipelines.config import EmbedderConfig
from pipelines.items import EmptyTextError
from pipelines.loading import ModelLoadError
from pipelines.prepare import PreparedItem
from pipelines.sentence_embedder import SentenceEmbedder
from pipelines.sentence_model import SentencePreparer, UnsupportedModalityError, resolve_sentence_model
from tests.minilm import minilm_config, minilm_dir

TEXTS = [
    "a red circle",
    "Bread rises because yeast eats sugars in the dough and releases carbon dioxide gas.",
    "Glaciers are rivers of ice that slowly flow downhill and carve deep U-shaped valleys into mountains.",
    "ok",
]


@pytest.fixture(scope="module")
def minilm():
    return load_embedder(minilm_config())


def test_the_backend_loads_a_sentence_embedder(minilm):
    assert isinstance(minilm, SentenceEmbedder)
    assert minilm.get_embedding_dimension() == 384


def test_vectors_are_the_librarys_own_for_a_padded_batch(minilm):
    ours = minilm.embed_batch(TEXTS)  # four lengths: one padded batch
    theirs = minilm.model.encode(TEXTS, convert_to_numpy=True)
    assert ours.shape == (4, 384) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, theirs, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)


def test_similar_texts_are_closer_than_unrelated_ones(minilm):
    bread, dough, ice = minilm.embed_batch(
        ["how does yeast make bread rise", TEXTS[1], "ice flowing down mountain valleys"]
    )
    assert bread @ dough > 0.5 > bread @ ice


def test_queries_and_documents_get_the_models_own_prompts(minilm):
    model = minilm.model
    saved = dict(model.prompts)
    model.prompts = {"query": "query: ", "document": "passage: "}
    try:
        preparer = SentencePreparer(model, minilm.config)
        query = minilm.embed_prepared([preparer.prepare("yeast and bread", query=True)])[0]
        document = minilm.embed_prepared([preparer.prepare("yeast and bread")])[0]
        np.testing.assert_allclose(query, model.encode_query("yeast and bread"), atol=1e-6)
        np.testing.assert_allclose(document, model.encode_document("yeast and bread"), atol=1e-6)
        assert float(query @ document) < 0.999  # the prompts made a difference
    finally:
        model.prompts = saved


def test_a_prepared_item_survives_the_backfills_arrow_row(minilm):
    prepared = minilm.prepare(TEXTS[2])
    again = PreparedItem.from_row(prepared.to_row())
    np.testing.assert_array_equal(again.input_ids, prepared.input_ids)
    np.testing.assert_allclose(
        minilm.embed_prepared([again]), minilm.model.encode(TEXTS[2:3], convert_to_numpy=True), atol=1e-6
    )


def test_a_text_past_max_seq_length_is_truncated_as_the_library_truncates(minilm):
    long_text = "mountains and rivers " * 300
    prepared = minilm.prepare(long_text)
    assert prepared.truncated and prepared.num_tokens == 256
    assert not minilm.prepare("short").truncated
    np.testing.assert_allclose(
        minilm.embed_batch([long_text]), minilm.model.encode([long_text], convert_to_numpy=True), atol=1e-6
    )


def test_dimensions_keep_the_first_components_renormalised(minilm):
    short = load_embedder(minilm_config(dimensions=64))
    full = minilm.embed_batch(TEXTS[:2])
    cut = full[:, :64] / np.linalg.norm(full[:, :64], axis=1, keepdims=True)
    np.testing.assert_allclose(short.embed_batch(TEXTS[:2]), cut, atol=1e-6)
    assert short.get_embedding_dimension() == 64


def test_an_image_item_is_refused_naming_the_backend_and_the_others_still_embed(minilm):
    result = minilm.try_embed_batch(
        ["fine", {"image": b"\x89PNG..."}, {"text": "a caption", "image": b"x"}, " "]
    )
    assert result.indices == [0]
    kinds = {e.index: e.kind for e in result.errors}
    assert kinds == {1: "unsupported_modality", 2: "unsupported_modality", 3: EmptyTextError.kind}
    assert "the sentence-transformers backend" in str(result.errors[0]) and "texts only" in str(
        result.errors[0]
    )
    with pytest.raises(UnsupportedModalityError, match="sentence-transformers backend"):
        minilm.embed_image(b"\x89PNG")


def test_a_per_item_instruction_is_refused(minilm):
    with pytest.raises(UnsupportedModalityError, match="no per-item instruction"):
        minilm.prepare({"text": "a text", "instruction": "Represent it."})


def test_the_preparer_without_an_embedder_gives_the_same_tokens(minilm):
    preparer = load_preparer(minilm.config)
    assert isinstance(preparer, SentencePreparer)
    np.testing.assert_array_equal(preparer.prepare(TEXTS[1]).input_ids, minilm.prepare(TEXTS[1]).input_ids)


def test_the_vector_size_is_read_from_the_module_configs_without_torch():
    code = (
        "import sys; from pipelines.backends import embedding_dimension; from tests.minilm import minilm_config;"
        "print(embedding_dimension(minilm_config()), embedding_dimension(minilm_config(dimensions=128)),"
        "'torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.split() == ["384", "128", "False"]
    with pytest.raises(ValueError, match="larger than the model's embedding size 384"):
        embedding_dimension(minilm_config(dimensions=500))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"model": "tiny"}, "not the built-in Qwen3-VL checkpoint 'tiny'"),
        ({"pooling": "cls"}, "takes no pooling"),
        ({"layer": -2}, "takes no layer"),
        ({"recipe": "qwen3-vl-embedding"}, "takes no recipe"),
        ({"min_pixels": 1024, "max_pixels": 4096}, "takes no min_pixels, max_pixels"),
        ({"quantization": "4bit"}, "takes no quantization"),
        ({"attention_layout": "packed"}, "takes no attention_layout=packed"),
    ],
)
def test_qwen3_vl_options_are_refused_for_this_backend(options, message):
    settings = {"backend": "sentence-transformers", "model": str(minilm_dir()), **options}
    with pytest.raises(ValidationError, match=message):
        EmbedderConfig(**settings)


def test_the_signature_names_the_backend_and_no_recipe():
    signature = minilm_config().signature()
    assert signature == {
        "backend": "sentence-transformers",
        "model": str(minilm_dir()),
        "normalize": True,
        "dimensions": None,
        "max_length": 8192,
    }
    recorded = json.loads(json.dumps(minilm_config().model_dump(mode="json")))
    assert EmbedderConfig.model_validate(recorded).signature() == signature  # a table's record reloads


def test_a_directory_without_modules_json_is_refused(tmp_path, tiny_model_dir):
    with pytest.raises(ModelLoadError, match="no modules.json"):
        resolve_sentence_model(str(tiny_model_dir))
    assert resolve_sentence_model("sentence-transformers/all-MiniLM-L6-v2") == (
        "sentence-transformers/all-MiniLM-L6-v2"
    )
