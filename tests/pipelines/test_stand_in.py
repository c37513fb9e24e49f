"""The pipeline-benchmark stand-in: deterministic, near-free vectors from the token ids, with the embedder's
contract, loaded by `backend: stand-in`, without torch on the backfill actor's path."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from pipelines.backends import load_embedder
from pipelines.config import EmbedderConfig
from pipelines.stand_in import TRACE_ENV, StandInEmbedder


@pytest.fixture(scope="module")
def stand_in(tiny_model_dir):
    return load_embedder(EmbedderConfig(model=str(tiny_model_dir), backend="stand-in"))


def test_the_stand_in_backend_loads_the_stand_in_with_the_checkpoints_vector_size(stand_in):
    assert isinstance(stand_in, StandInEmbedder)
    assert stand_in.get_embedding_dimension() == 64  # the tiny checkpoint's hidden size


def test_the_same_text_gets_the_same_unit_vector_alone_and_in_any_batch(stand_in):
    alone = stand_in.embed_batch(["a text about cats"])[0]
    batch = stand_in.embed_batch(["something else entirely", "a text about cats", "and more"])
    assert np.array_equal(alone, batch[1])
    assert np.allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-6)
    assert not np.allclose(batch[0], batch[1])


def test_the_vector_is_computed_from_the_prepared_token_ids(stand_in, tiny_model_dir):
    other = StandInEmbedder.from_config(EmbedderConfig(model=str(tiny_model_dir), backend="stand-in"))
    prepared = stand_in.prepare("the same text on another process")
    expected = stand_in.table[prepared.input_ids % len(stand_in.table)].mean(axis=0)
    vector = other.try_embed_prepared([prepared]).vectors[0]
    assert np.allclose(vector, expected / np.linalg.norm(expected), atol=1e-6)


def test_images_get_vectors_that_depend_on_their_pixels(stand_in):
    from tests.conftest import image_bytes

    vectors = stand_in.embed_batch([{"image": image_bytes(1)}, {"image": image_bytes(2)}])
    assert vectors.shape == (2, 64) and not np.allclose(vectors[0], vectors[1])


def test_dimensions_truncates_then_renormalises(tiny_model_dir):
    full = load_embedder(EmbedderConfig(model=str(tiny_model_dir), backend="stand-in"))
    short = load_embedder(EmbedderConfig(model=str(tiny_model_dir), backend="stand-in", dimensions=16))
    a, b = full.embed_batch(["matryoshka"])[0], short.embed_batch(["matryoshka"])[0]
    assert short.get_embedding_dimension() == 16 and b.shape == (16,)
    assert np.allclose(b, a[:16] / np.linalg.norm(a[:16]), atol=1e-6)


def test_an_item_without_tokens_is_an_error_and_the_others_keep_their_vectors(stand_in):
    good = stand_in.prepare("a good one")
    empty = type(good)(input_ids=np.zeros(0, np.int64), position_ids=np.zeros((3, 0), np.int64))
    result = stand_in.try_embed_prepared([good, empty, good])
    assert result.indices == [0, 2] and [e.index for e in result.errors] == [1]
    assert result.per_item(3)[1].startswith("forward_failed")


def test_the_trace_hook_appends_a_line_per_embedded_batch(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(TRACE_ENV, str(tmp_path / "trace"))
    traced = StandInEmbedder.from_config(EmbedderConfig(model=str(tiny_model_dir), backend="stand-in"))
    traced.embed_batch(["one", "two"])
    traced.embed_batch(["three"])
    (trace,) = (tmp_path / "trace").iterdir()
    lines = [line.split() for line in trace.read_text().splitlines()]
    assert [int(n) for _, n in lines] == [2, 1] and float(lines[0][0]) <= float(lines[1][0])


def test_the_backfill_actors_path_never_imports_torch(tiny_model_dir):
    code = (
        "import sys; import numpy as np\n"
        "from pipelines.backends import load_embedder\n"
        "from pipelines.config import EmbedderConfig\n"
        "from pipelines.prepare import PreparedItem\n"
        f"e = load_embedder(EmbedderConfig(model={str(tiny_model_dir)!r}, backend='stand-in'))\n"
        "item = PreparedItem(np.arange(5), np.zeros((3, 5), np.int64))\n"
        "assert e.try_embed_prepared([item]).vectors.shape == (1, 64)\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "False"
