"""What a client may send as inputs, checked against the limits before anything is decoded or tokenized.

An input is a string or an item `{"text": ..., "image": ..., "instruction": ...}`; its shape is checked by
`pipelines.items.parse_item`, the one item validator, whose errors name the key reported here as the field.
What only HTTP adds is checked here: the length limits, and images accepted inline only, as base64 or a
`data:` URL, handed to the embedder as bytes: the server never opens a path or fetches a URL named by a
client. Every refusal names the field (`input[2].image`).
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Any

from pipelines.items import ITEM_KEYS, ItemError, type_name
from pipelines.items import parse_item as check_item
from serve.errors import ApiError, item_error

__all__ = [
    "ITEM_KEYS",
    "InputLimits",
    "check_text",
    "decode_image",
    "json_type",
    "parse_inputs",
    "parse_item",
]
json_type = type_name  # the JSON name of a value's type, for messages
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_DATA_URL = re.compile(r"^data:([^;,]*)((?:;[^;,]*)*),", re.DOTALL)
_PATH_PREFIXES = ("/", "./", "../", "~", "\\")


@dataclass(frozen=True)
class InputLimits:
    """The per-request bounds (from `ServeConfig`)."""

    max_items: int
    max_text_chars: int


def parse_inputs(raw: Any, limits: InputLimits, field: str = "input") -> list[str | dict[str, Any]]:
    """OpenAI's `input` (a string or a list) as embedder items, images decoded to bytes."""
    if isinstance(raw, str):
        return [check_text(raw, limits, field)]
    if not isinstance(raw, list):
        raise ApiError(
            422,
            f"{field} must be a string or a list of strings and items, got {json_type(raw)}",
            param=field,
            code="invalid_type",
        )
    if not raw:
        raise ApiError(422, f"{field} is an empty list: nothing to embed", param=field, code="empty_input")
    if len(raw) > limits.max_items:
        raise ApiError(
            413,
            f"{field} has {len(raw)} items, over the limit of {limits.max_items} per request",
            param=field,
            code="too_many_items",
        )
    if all(_is_token_ids(x) for x in raw):
        raise ApiError(
            422, f"{field}: token-id input is not supported; send text", param=field, code="invalid_type"
        )
    return [parse_item(value, limits, f"{field}[{index}]") for index, value in enumerate(raw)]


def input_fields(raw: Any, field: str = "input") -> list[str]:
    """The name of each input in messages: `input` for a lone string, else `input[i]`."""
    return [field] if isinstance(raw, str) else [f"{field}[{index}]" for index in range(len(raw))]


def parse_item(value: Any, limits: InputLimits, field: str) -> str | dict[str, Any]:
    """One input: a string, or an item with `text` and/or `image` (and optionally `instruction`).

    `field` names the input in messages (`input[2]`); an empty `field` means the item's keys are the
    request's own top-level fields (as in /search).
    """
    # an image's own checks are HTTP's (inline base64, `decode_image`): the shape check sees a placeholder
    probe = {**value, "image": b"\0"} if isinstance(value, dict) and value.get("image") is not None else value
    try:
        check_item(probe)
    except ItemError as exc:
        if not field and exc.key is None:  # /search: the request's fields are the item's
            exc.key = "text"
        raise item_error(exc, field, value) from exc
    if isinstance(value, str):
        return check_text(value, limits, field or "text")
    item: dict[str, Any] = {}
    for key in ("text", "instruction"):
        if value.get(key) is not None:
            item[key] = check_text(value[key], limits, join_field(field, key))
    if value.get("image") is not None:
        item["image"] = decode_image(value["image"], join_field(field, "image"))
    return item


def join_field(base: str, key: str | None) -> str:
    """`input[2]` + `image` -> `input[2].image`; with no base the key is a top-level field."""
    if not key:
        return base or "body"
    return f"{base}.{key}" if base else key


def check_text(text: str, limits: InputLimits, field: str) -> str:
    if len(text) > limits.max_text_chars:
        raise ApiError(
            422,
            f"{field} is {len(text):,} characters long, over the limit of {limits.max_text_chars:,}",
            param=field,
            code="text_too_long",
        )
    if not text.strip():
        raise ApiError(422, f"{field} is empty or only whitespace", param=field, code="empty_text")
    return text


def decode_image(value: Any, field: str) -> bytes:
    """Inline image bytes from base64 or a `data:` URL; URLs and paths are refused, never followed."""
    if not isinstance(value, str):
        raise ApiError(
            422,
            f"{field} must be a base64 string or a data URL, got {json_type(value)}",
            param=field,
            code="invalid_type",
        )
    data = value
    match = _DATA_URL.match(value)
    if match:
        if ";base64" not in match.group(2):
            raise ApiError(
                422, f"{field}: only base64 data URLs are accepted", param=field, code="invalid_image"
            )
        data = value[match.end() :]
    elif _URL.match(value):
        raise _not_inline(field)
    compact = "".join(data.split())
    try:
        altchars = b"-_" if "-" in compact or "_" in compact else None
        raw = base64.b64decode(compact, altchars=altchars, validate=True)
    except (binascii.Error, ValueError) as exc:
        # base64 may start with "/" (every JPEG does: "/9j/"), so a path is only named as one when it fails
        if not match and value.startswith(_PATH_PREFIXES):
            raise _not_inline(field) from exc
        raise ApiError(
            422, f"{field} is not valid base64 ({exc})", param=field, code="invalid_base64"
        ) from exc
    if not raw:
        raise ApiError(422, f"{field} is empty", param=field, code="invalid_image")
    return raw


def _not_inline(field: str) -> ApiError:
    return ApiError(
        422,
        f"{field}: images must be sent inline (base64 or a data URL); the server does not fetch URLs or read files",
        param=field,
        code="image_not_inline",
    )


def _is_token_ids(value: Any) -> bool:
    if isinstance(value, list):
        return bool(value) and all(isinstance(x, int) and not isinstance(x, bool) for x in value)
    return isinstance(value, int) and not isinstance(value, bool)
