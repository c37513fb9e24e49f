"""Every kind of bad request gets its status and a message naming what is wrong; nothing crashes or hangs."""

from __future__ import annotations

import base64

import pytest

from tests.conftest import image_bytes
from tests.pipelines.test_image_decoding import png_with_rows
from tests.serve.conftest import LIMITS, b64_image

LONG_TEXT = "word " * (LIMITS["max_text_chars"] // 5 + 1)
BIG_IMAGE = b64_image(1, (200, 200))  # 40,000 pixels, over the 160 x 160 limit, yet small in bytes

BAD_EMBEDDING_REQUESTS = [
    # (what is wrong, body, status, param, words in the message)
    (
        "too many items",
        {"input": ["x"] * (LIMITS["max_items_per_request"] + 1)},
        413,
        "input",
        "over the limit",
    ),
    ("text too long", {"input": ["ok", LONG_TEXT]}, 422, "input[1]", "characters long"),
    ("image too large", {"input": [{"image": BIG_IMAGE}]}, 422, "input[0].image", "over the limit"),
    ("input of a wrong type", {"input": 123}, 422, "input", "must be a string or a list"),
    ("item of a wrong type", {"input": ["ok", 4.5]}, 422, "input[1]", "got a number"),
    ("text of a wrong type", {"input": [{"text": ["a"]}]}, 422, "input[0].text", "must be a string"),
    ("token ids", {"input": [[1, 2, 3]]}, 422, "input", "token-id input is not supported"),
    ("an empty list", {"input": []}, 422, "input", "empty list"),
    ("blank text", {"input": ["fine", "  \n "]}, 422, "input[1]", "empty or only whitespace"),
    (
        "an item without text or image",
        {"input": [{"instruction": "x"}]},
        422,
        "input[0]",
        "needs 'text' or 'image'",
    ),
    ("unknown item keys", {"input": [{"text": "a", "url": "b"}]}, 422, "input[0].url", "unknown keys"),
    ("input missing", {"model": "x"}, 422, "input", "Field required"),
    ("unknown top-level field", {"input": "a", "temperature": 1}, 422, "temperature", "Extra inputs"),
    ("dimensions of a wrong type", {"input": "a", "dimensions": "16"}, 422, "dimensions", "valid integer"),
    ("dimensions below 1", {"input": "a", "dimensions": 0}, 422, "dimensions", "greater than or equal to 1"),
    ("dimensions over the model's", {"input": "a", "dimensions": 100_000}, 422, "dimensions", "larger than"),
    (
        "an unknown encoding",
        {"input": "a", "encoding_format": "int8"},
        422,
        "encoding_format",
        "'float' or 'base64'",
    ),
    ("bad base64", {"input": [{"image": "not base64 at all!"}]}, 422, "input[0].image", "not valid base64"),
    (
        "bytes that are not an image",
        {"input": [{"image": base64.b64encode(b"hello, not an image").decode()}]},
        422,
        "input[0].image",
        "not a readable image",
    ),
    (
        "a truncated image",
        {"input": [{"image": base64.b64encode(image_bytes(0)[:60]).decode()}]},
        422,
        "input[0].image",
        "image",
    ),
    (
        "a PNG whose header says 160x160 and that holds one row",
        {"input": ["ok", {"image": base64.b64encode(png_with_rows(160, 160, 1, color_type=2)).decode()}]},
        422,
        "input[1].image",
        "is truncated: its header says 160x160 but its pixel data holds 1 of 160 rows",
    ),
    ("an image URL", {"input": [{"image": "https://example.com/cat.png"}]}, 422, "input[0].image", "inline"),
    ("a server path", {"input": [{"image": "/etc/hostname"}]}, 422, "input[0].image", "inline"),
    ("a non-base64 data URL", {"input": [{"image": "data:image/png,abc"}]}, 422, "input[0].image", "base64"),
    ("an unknown model", {"input": "a", "model": "gpt-4"}, 404, "model", "not served here"),
]


@pytest.mark.parametrize(
    ("body", "status", "param", "words"),
    [case[1:] for case in BAD_EMBEDDING_REQUESTS],
    ids=[case[0] for case in BAD_EMBEDDING_REQUESTS],
)
def test_a_bad_embedding_request_gets_its_status_and_names_the_field(client, body, status, param, words):
    response = client.post("/v1/embeddings", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert words in error["message"]


def test_a_body_over_the_size_limit_gets_413_before_it_is_parsed(client):
    body = b'{"input": "' + b"a" * LIMITS["max_body_bytes"] + b'"}'
    response = client.post("/v1/embeddings", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert "max_body_bytes" in response.json()["error"]["message"]


def test_a_chunked_body_over_the_size_limit_gets_413_too(client):
    def chunks():
        yield b'{"input": "'
        for _ in range(LIMITS["max_body_bytes"] // 16384 + 2):
            yield b"a" * 16384
        yield b'"}'

    response = client.post("/v1/embeddings", content=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413


@pytest.mark.parametrize(
    ("content", "status", "words"),
    [
        (b'{"input": ["a", }', 400, "not valid JSON"),
        (b"", 400, "empty"),
        (b"\xff\xfe{}", 400, "not"),
        (b'["a", "b"]', 422, "must be a JSON object"),
    ],
    ids=["malformed", "empty", "not utf-8", "not an object"],
)
def test_a_body_that_is_not_a_json_object_is_refused_with_a_message(client, content, status, words):
    response = client.post("/v1/embeddings", content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    assert words in response.json()["error"]["message"]


def test_a_server_path_that_exists_is_never_read(client, tmp_path):
    image = tmp_path / "secret.png"
    image.write_bytes(image_bytes(9))
    for value in (str(image), f"file://{image}", "./secret.png"):
        response = client.post("/v1/embeddings", json={"input": [{"image": value}]})
        assert response.status_code == 422, value
        assert "inline" in response.json()["error"]["message"]


def test_one_bad_item_refuses_the_request_and_the_next_request_still_works(client):
    bad = client.post(
        "/v1/embeddings", json={"input": ["fine", {"image": base64.b64encode(b"junk").decode()}]}
    )
    assert bad.status_code == 422
    good = client.post("/v1/embeddings", json={"input": ["fine", {"image": b64_image(3)}]})
    assert good.status_code == 200 and len(good.json()["data"]) == 2


def test_an_unknown_route_is_404_and_a_wrong_method_405(client):
    assert client.get("/v1/nothing-here").status_code == 404
    assert client.get("/v1/embeddings").status_code == 405


def test_raw_base64_of_a_jpeg_starts_with_a_slash_and_is_still_an_image(client, embedder):
    jpeg = image_bytes(4, (64, 48), "JPEG")
    encoded = base64.b64encode(jpeg).decode()
    assert encoded.startswith("/9j/")
    response = client.post("/v1/embeddings", json={"input": [{"image": encoded}]})
    assert response.status_code == 200, response.text
    expected = embedder.embed_batch([{"image": jpeg}])[0]
    assert (
        abs(sum(a * b for a, b in zip(response.json()["data"][0]["embedding"], expected, strict=True)) - 1)
        < 1e-5
    )
