"""Response bodies: vectors leave as float32 numbers that read back exactly, or as OpenAI's base64."""

from __future__ import annotations

import base64
import json

import numpy as np

from serve.schemas import embedding_response, json_bytes


def vectors(n: int = 3, dim: int = 2048) -> np.ndarray:
    v = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_float_vectors_read_back_as_the_same_float32_values():
    v = vectors()
    body = json.loads(json_bytes(embedding_response(v, "float", "m", 7)))
    back = np.array([row["embedding"] for row in body["data"]], dtype=np.float32)
    assert np.array_equal(back, v)
    assert [row["index"] for row in body["data"]] == [0, 1, 2]
    assert body["usage"] == {"prompt_tokens": 7, "total_tokens": 7} and body["model"] == "m"


def test_float_vectors_are_written_as_float32_not_as_longer_float64_text():
    v = vectors(1)
    ours = json_bytes(embedding_response(v, "float", "m", 1))
    as_python_floats = json.dumps({"embedding": v[0].tolist()}).encode()
    assert len(ours) < 0.7 * len(as_python_floats)


def test_a_column_slice_and_a_float64_input_are_written_like_float32_rows():
    wide = vectors(2, 64).astype(np.float64)
    sliced = wide[:, :16]  # not contiguous: what `dimensions` truncation starts from
    body = json.loads(json_bytes(embedding_response(sliced, "float", "m", 1)))
    assert np.array_equal(
        np.array([r["embedding"] for r in body["data"]], np.float32), sliced.astype(np.float32)
    )


def test_base64_is_little_endian_float32_as_openai_sends_it():
    v = vectors(2, 32)
    body = json.loads(json_bytes(embedding_response(v, "base64", "m", 1)))
    decoded = [np.frombuffer(base64.b64decode(r["embedding"]), dtype="<f4") for r in body["data"]]
    assert np.array_equal(np.stack(decoded), v)
