"""API errors as OpenAI-style JSON bodies: {"error": {"message", "type", "param", "code"}}."""
from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from starlette.responses import JSONResponse

from .protocol import error_body

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | int | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error" if status < 500 else "internal_error")
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_response(status: int, message: str, **kwargs: Any) -> JSONResponse:
    return APIError(status, message, **kwargs).response()


_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _loc_param(loc: tuple) -> str | None:
    """('messages', 0, 'role') -> 'messages.0.role'; union-member tags such as 'list[int]' are dropped."""
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(str(item))
        elif isinstance(item, str) and "[" not in item and "-" not in item and item not in _UNION_TAGS:
            parts.append(item)
    return ".".join(parts) or None


def validation_error(e: ValidationError) -> APIError:
    """The first problem of a pydantic ValidationError as a 400 naming the field."""
    errors = e.errors(include_url=False)
    if not errors:
        return APIError(400, "invalid request body")
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", first.get("msg", ""))
        return APIError(400, f"the request body is not valid JSON: {detail}", code="invalid_json")
    loc = tuple(first.get("loc", ()))
    param = _loc_param(loc)
    if not loc and first.get("type") in ("model_type", "model_attributes_type"):
        return APIError(400, "the request body must be a JSON object", code="invalid_json")
    # a union field produces one error per member; name the field once
    if param and len(errors) > 1 and all(_loc_param(tuple(x.get("loc", ()))[:1]) == param.split(".")[0] for x in errors):
        kinds = sorted({x.get("msg", "") for x in errors})
        if len(kinds) > 1 and param.count(".") == 0:
            return APIError(400, f"{param}: invalid value ({'; '.join(kinds[:3])})", param=param)
    msg = first.get("msg", "invalid value")
    return APIError(400, f"{param}: {msg}" if param else msg, param=param)
