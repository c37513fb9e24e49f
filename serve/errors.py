"""HTTP errors with a clear message, in the OpenAI error shape, so OpenAI clients surface them as they are.

Every refusal is an `ApiError`: a status, a message, the request field it is about (`param`, e.g.
`input[2].image`) and a stable `code`. The body is `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    503: "overloaded_error",
}


class ApiError(Exception):
    """A request the server refuses, with the HTTP status and a message naming the field at fault."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": ERROR_TYPES.get(
                    self.status, "server_error" if self.status >= 500 else "invalid_request_error"
                ),
                "param": self.param,
                "code": self.code,
            }
        }


def field_path(loc: tuple | list, root: str | None = None) -> str:
    """A pydantic error location as a field path: ('input', 2, 'image') -> 'input[2].image'."""
    path = root or ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part and not _is_union_tag(str(part)):
            path += f".{part}" if path else str(part)
    return path or "body"


def _is_union_tag(part: str) -> bool:
    """Pydantic names union members in locations (`str`, `list[...]`, `function-after[...]`): not fields."""
    return part in {"str", "int", "float", "bool", "dict", "list"} or "[" in part


def from_validation_error(exc: Any) -> ApiError:
    """The first problem of a pydantic `ValidationError` as a 422 naming its field (all of them in the message)."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    messages = []
    for error in errors[:5]:
        messages.append(f"{field_path(error['loc'])}: {_clean(error['msg'])}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return ApiError(422, "; ".join(messages) + more, param=field_path(first["loc"]), code="invalid_value")


def _clean(message: str) -> str:
    return message.removeprefix("Value error, ")


def overloaded(message: str, retry_after_s: int) -> ApiError:
    return ApiError(503, message, code="overloaded", headers={"Retry-After": str(retry_after_s)})


def item_error(exc: Any, field: str, item: Any) -> ApiError:
    """A 422 for an `ItemError` of the input named `field` (`input[2]`), pointing at the key it is about
    (`ItemError.key`: `input[2].image`); a string input's error is about the input itself."""
    key = exc.key if isinstance(item, dict) or not field else None
    param = (f"{field}.{key}" if field else key) if key else (field or "body")
    return ApiError(422, f"{field or key}: {exc.reason}", param=param, code=exc.kind)


def raise_forward_errors(errors: dict[int, str], fields: list[str]) -> None:
    """422 naming the first input the model could not embed (the others of its batch were served)."""
    if errors:
        index = min(errors)
        raise ApiError(
            422,
            f"{fields[index]}: the model could not embed it ({errors[index]})",
            param=fields[index],
            code="forward_failed",
        )


@contextlib.asynccontextmanager
async def answered_within(timeout_s: float, retry_after_s: int, what: str = "embedding"):
    """503 with Retry-After when the body does not finish within `timeout_s`, when the model replicas'
    queues are full, or when a model replica died with the request."""
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError

    try:
        async with asyncio.timeout(timeout_s):
            yield
    except TimeoutError:
        raise overloaded(
            f"the request was not answered within {timeout_s:g} s: the server is overloaded, retry later",
            retry_after_s,
        ) from None
    except BackPressureError:
        raise overloaded("the model replicas' queues are full: retry later", retry_after_s) from None
    except RayActorError:
        raise overloaded(f"a model replica stopped while {what} this request: retry", retry_after_s) from None
