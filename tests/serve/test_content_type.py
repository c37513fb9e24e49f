"""POST bodies must be sent as application/json (415 otherwise), and no CORS headers are sent.

A web page may send a "simple" cross-origin POST (text/plain, form-encoded, or no type) to an endpoint on
127.0.0.1 without a preflight; refusing every other content type, and never allowing other origins, keeps a
page from using a local server the browser's user can reach.
"""

from __future__ import annotations

import json

import pytest

BODIES = {
    "/v1/embeddings": {"input": ["a red circle"]},
    "/search": {"text": "a red circle", "top_k": 1},
}

REFUSED = [
    "text/plain",
    "text/plain; charset=utf-8",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "text/json",
    "application/jsonp",
    "application/json-seq",
    "application/json garbage",
    "application/json; charset=latin-1",
    None,  # no Content-Type at all
]


@pytest.mark.parametrize("path", list(BODIES))
@pytest.mark.parametrize("content_type", REFUSED, ids=[str(c) for c in REFUSED])
def test_a_json_body_sent_as_anything_but_application_json_is_415(client, path, content_type):
    headers = {} if content_type is None else {"Content-Type": content_type}
    response = client.post(path, content=json.dumps(BODIES[path]).encode(), headers=headers)
    assert response.status_code == 415, response.text
    error = response.json()["error"]
    assert error["code"] == "unsupported_media_type" and error["param"] == "Content-Type"
    assert error["type"] == "invalid_request_error"
    assert "application/json" in error["message"]
    if content_type is not None:
        assert content_type.split(";")[0] in error["message"]


@pytest.mark.parametrize(
    "content_type", ["application/json", "application/json; charset=utf-8", "Application/JSON;Charset=UTF-8"]
)
def test_application_json_with_or_without_a_utf8_charset_is_accepted(client, content_type):
    body = json.dumps(BODIES["/v1/embeddings"]).encode()
    response = client.post("/v1/embeddings", content=body, headers={"Content-Type": content_type})
    assert response.status_code == 200, response.text


def test_no_cors_headers_are_sent_to_another_origin(client):
    origin = {"Origin": "http://attacker.example"}
    response = client.post("/v1/embeddings", json=BODIES["/v1/embeddings"], headers=origin)
    assert response.status_code == 200
    preflight = client.options(
        "/v1/embeddings",
        headers={
            **origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    for answer in (response, preflight):
        assert not [name for name in answer.headers if name.lower().startswith("access-control-")]
    assert preflight.status_code >= 400
