"""Property-based tests (hypothesis) of what a client may send: random JSON shapes, unicode, sizes at and past
every limit. Whatever arrives, the answer is a value or an `ApiError` with a 4xx status naming a field; never
another exception (which Serve would turn into a 500).

The pure-parsing properties run without a server; `test_random_requests_to_a_real_server_...` sends a modest
number of them to the real Serve app on 127.0.0.1 and checks every answer and one good request after them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serve.errors import ApiError
from serve.inputs import ITEM_KEYS, InputLimits, decode_image, parse_inputs
from serve.routes import read_json, validate
from serve.schemas import EmbeddingRequest, SearchRequest
from tests.conftest import image_bytes
from tests.pipelines.test_image_decoding import png_with_rows
from tests.serve.conftest import LIMITS, b64_image

LIMITS_ = InputLimits(LIMITS["max_items_per_request"], LIMITS["max_text_chars"])
MAX_TEXT, MAX_ITEMS = LIMITS["max_text_chars"], LIMITS["max_items_per_request"]

# -- strategies ------------------------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=12), children, max_size=6)
    ),
    max_leaves=25,
)
# texts around the length limit, blank ones, unicode of every plane (surrogates excluded: not valid UTF-8)
texts = st.one_of(
    st.text(max_size=50),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=50),
    st.sampled_from([" ", "\n\t", "\x00", "a\x00b", "\u200b", "\ufeff", "🙂" * 3, "é" * 10]),
    st.integers(MAX_TEXT - 2, MAX_TEXT + 2).map(lambda n: "x" * n),
)
images = (
    st.sampled_from(
        [
            base64.b64encode(image_bytes(0, (32, 24))).decode(),
            base64.b64encode(image_bytes(1, (24, 24), "JPEG")).decode(),
            "data:image/png;base64," + base64.b64encode(image_bytes(2, (16, 16))).decode(),
            base64.b64encode(image_bytes(3, (200, 200))).decode(),  # over the pixel limit
            base64.b64encode(png_with_rows(64, 64, 1)).decode(),  # truncated
            base64.b64encode(image_bytes(4, (32, 32))[:100]).decode(),  # cut short
            base64.b64encode(b"not an image").decode(),
            "",
            "=",
            "not base64!",
            "https://example.com/a.png",
            "/etc/passwd",
            "file:///etc/passwd",
            "data:image/png,abc",
        ]
    )
    | st.text(max_size=30)
)
items = st.fixed_dictionaries(
    {},
    optional={
        "text": texts | json_scalars,
        "image": images | json_scalars,
        "instruction": texts | json_scalars,
        "caption": json_scalars,
    },
)
inputs = st.one_of(
    texts,
    st.lists(texts | items, min_size=0, max_size=4),
    st.integers(MAX_ITEMS - 1, MAX_ITEMS + 1).map(lambda n: ["a text"] * n),
    st.lists(st.integers(0, 100), min_size=1, max_size=4),  # token ids
    json_values,
)
embedding_bodies = st.fixed_dictionaries(
    {"input": inputs},
    optional={
        "model": json_scalars,
        "dimensions": st.integers(-2, 10_000) | json_scalars,
        "encoding_format": st.sampled_from(["float", "base64", "int8", ""]) | json_scalars,
        "user": json_scalars,
        "temperature": json_scalars,
    },
) | st.dictionaries(st.text(max_size=12), json_values, max_size=4)
search_bodies = st.fixed_dictionaries(
    {},
    optional={
        "text": texts | json_scalars,
        "image": images | json_scalars,
        "top_k": st.integers(-1, 10_000) | json_scalars,
        "filter": st.sampled_from(
            [
                "modality = 'image'",
                "modality = 'image'; DROP TABLE vectors",
                "x garbage",
                "",
                "lang IN ('en')",
            ]
        )
        | st.text(max_size=40),
        "instruction": texts | json_scalars,
        "model": json_scalars,
    },
)


def assert_refusal(exc: ApiError, *fields: str) -> None:
    """A refusal a client can act on: a 4xx status, a message, and the field at fault."""
    assert 400 <= exc.status < 500, exc.status
    body = exc.body()["error"]
    assert body["message"] and isinstance(body["message"], str)
    assert body["param"] is None or isinstance(body["param"], str)
    if fields:
        assert body["param"] is not None and body["param"].startswith(fields), body


# -- pure parsing ----------------------------------------------------------------------------------------

SETTINGS = settings(max_examples=200, deadline=None, database=None)


@SETTINGS
@given(inputs)
def test_any_input_becomes_items_within_the_limits_or_a_4xx_naming_input(raw):
    try:
        parsed = parse_inputs(raw, LIMITS_)
    except ApiError as exc:
        assert_refusal(exc, "input")
        return
    assert 1 <= len(parsed) <= MAX_ITEMS
    for item in parsed:
        if isinstance(item, str):
            assert item.strip() and len(item) <= MAX_TEXT
        else:
            assert set(item) <= set(ITEM_KEYS) and ("text" in item or "image" in item)
            assert isinstance(item.get("image", b"x"), bytes)
            assert all(len(item[key]) <= MAX_TEXT for key in ("text", "instruction") if key in item)


@SETTINGS
@given(st.integers(MAX_TEXT - 3, MAX_TEXT + 3), st.integers(MAX_ITEMS - 2, MAX_ITEMS + 2))
def test_limits_hold_exactly_at_the_boundary(length, count):
    text_ok, count_ok = length <= MAX_TEXT, count <= MAX_ITEMS
    try:
        parse_inputs(["y" * length] * count, LIMITS_)
        assert text_ok and count_ok
    except ApiError as exc:
        assert not (text_ok and count_ok)
        assert (exc.status, exc.code) == ((413, "too_many_items") if not count_ok else (422, "text_too_long"))


@SETTINGS
@given(images | st.binary(max_size=64).map(lambda b: b.decode("latin-1")))
def test_an_image_field_decodes_to_bytes_or_is_a_4xx_naming_it(value):
    try:
        assert decode_image(value, "input[0].image")
    except ApiError as exc:
        assert_refusal(exc, "input[0].image")


@SETTINGS
@given(embedding_bodies)
def test_an_embedding_request_body_validates_or_is_a_4xx_naming_a_field(body):
    try:
        request = validate(EmbeddingRequest, body)
    except ApiError as exc:
        assert_refusal(exc)
        assert exc.status == 422 and exc.param
        return
    assert set(body) <= set(EmbeddingRequest.model_fields)
    assert request.encoding_format in ("float", "base64")


@SETTINGS
@given(search_bodies)
def test_a_search_request_body_validates_or_is_a_4xx_naming_a_field(body):
    try:
        request = validate(SearchRequest, body)
    except ApiError as exc:
        assert_refusal(exc)
        assert exc.status == 422 and exc.param
        return
    assert request.top_k >= 1


# printable ASCII without surrounding whitespace: what an HTTP client can send as a header value at all
header_text = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30).filter(
    lambda value: value == value.strip()
)
content_types = (
    st.sampled_from(
        [
            "application/json",
            "application/json; charset=utf-8",
            "text/plain",
            "application/x-www-form-urlencoded",
        ]
    )
    | st.none()
    | header_text
)
raw_bodies = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    embedding_bodies.map(lambda v: json.dumps(v, ensure_ascii=False).encode()),
    embedding_bodies.map(lambda v: json.dumps(v).encode()).flatmap(
        lambda b: st.integers(0, len(b)).map(lambda n: b[:n])  # cut anywhere
    ),
    st.sampled_from([b"NaN", b'{"input": NaN}', b'{"a": 1, "a": 2}', b"\xef\xbb\xbf{}", b"[" * 5000]),
    st.integers(1, 60_000).map(lambda depth: b'{"input": ' + b"[" * depth + b"]" * depth + b"}"),  # nesting
)
BODY_LIMIT = LIMITS["max_body_bytes"]


def run_read_json(body: bytes, content_type: str | None, limit: int = BODY_LIMIT):
    from starlette.requests import Request

    headers = [] if content_type is None else [(b"content-type", content_type.encode("latin-1", "replace"))]
    scope = {"type": "http", "method": "POST", "path": "/v1/embeddings", "headers": headers}
    chunks = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        return chunks.pop(0) if chunks else {"type": "http.disconnect"}

    return asyncio.run(read_json(Request(scope, receive), limit))


@SETTINGS
@given(raw_bodies, content_types)
def test_any_body_and_content_type_is_a_json_object_or_a_4xx(body, content_type):
    try:
        parsed = run_read_json(body, content_type)
    except ApiError as exc:
        assert_refusal(exc)
        assert exc.status in (400, 413, 415, 422)
        return
    assert isinstance(parsed, dict) and len(body) <= BODY_LIMIT
    assert content_type is not None and content_type.split(";")[0].strip().lower() == "application/json"


# -- against the real server -----------------------------------------------------------------------------

LIVE_EXAMPLES = 100
ANSWER_WITHIN_S = 30


live_requests = st.one_of(
    st.tuples(st.just("/v1/embeddings"), embedding_bodies.map(lambda v: json.dumps(v).encode())),
    st.tuples(st.just("/search"), search_bodies.map(lambda v: json.dumps(v).encode())),
).flatmap(lambda pair: st.tuples(st.just(pair[0]), st.just(pair[1]), st.just("application/json")))
live_requests = live_requests | st.tuples(
    st.sampled_from(["/v1/embeddings", "/search"]), raw_bodies, content_types
)


def test_random_requests_to_a_real_server_get_2xx_or_a_well_formed_4xx_in_time(client):
    """LIVE_EXAMPLES random requests, one after another, each answered within ANSWER_WITHIN_S with a 2xx or
    an OpenAI-shaped 4xx (never a 5xx); then a good request still gets its vectors."""
    statuses: dict[int, int] = {}

    @settings(
        max_examples=LIVE_EXAMPLES, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
    )
    @given(live_requests)
    def answer(request_):
        path, body, content_type = request_
        headers = {} if content_type is None else {"Content-Type": content_type}
        start = time.monotonic()
        response = client.post(path, content=body, headers=headers, timeout=ANSWER_WITHIN_S)
        took = time.monotonic() - start
        assert took < ANSWER_WITHIN_S, f"{path} took {took:.1f} s"
        assert response.status_code < 500, response.text
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        if response.status_code >= 400:
            error = response.json()["error"]
            assert isinstance(error["message"], str) and error["message"]
            assert set(error) == {"message", "type", "param", "code"}

    answer()
    assert sum(statuses.values()) >= LIVE_EXAMPLES // 2 and any(400 <= s < 500 for s in statuses), statuses
    good = client.post("/v1/embeddings", json={"input": ["a red circle", {"image": b64_image(5)}]})
    assert good.status_code == 200 and len(good.json()["data"]) == 2
