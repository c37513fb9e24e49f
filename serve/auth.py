"""The optional API key: read from the environment of the replica, compared in constant time."""

from __future__ import annotations

import hmac
import os

from serve.errors import ApiError


def api_key_from_env(variable: str) -> str | None:
    """The key in `variable`, or None (no key needed) when it is unset or empty."""
    return os.environ.get(variable) or None


def check_api_key(expected: str | None, authorization: str | None, x_api_key: str | None = None) -> None:
    """Accept `Authorization: Bearer <key>` (what OpenAI clients send) or `X-API-Key: <key>`; else 401."""
    if expected is None:
        return
    given = x_api_key
    if authorization:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "bearer":
            given = token.strip()
    if given is None:
        raise ApiError(
            401,
            "an API key is required: send 'Authorization: Bearer <key>'",
            code="missing_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise ApiError(
            401, "the API key is not valid", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
        )
