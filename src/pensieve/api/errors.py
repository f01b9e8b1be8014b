"""Errors in each API family's own shape, mapped in one place.

The family is chosen by the route's path, so middleware (auth, limits) and exception handlers answer
an Ollama client in Ollama's shape and an Anthropic client in Anthropic's without knowing the route:

    /api/...          Ollama     {"error": "message"}
    /v1/messages...   Anthropic  {"type": "error", "error": {"type": ..., "message": ...}}
    anything else     OpenAI     {"error": {"message", "type", "param", "code"}}
"""

from __future__ import annotations

import enum
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pensieve.errors import PensieveError

log = logging.getLogger("pensieve.api")


class ApiFamily(enum.StrEnum):
    OPENAI = "openai"
    OLLAMA = "ollama"
    ANTHROPIC = "anthropic"


def family_for_path(path: str) -> ApiFamily:
    if path.startswith("/api/"):
        return ApiFamily.OLLAMA
    if path == "/v1/messages" or path.startswith("/v1/messages/"):
        return ApiFamily.ANTHROPIC
    return ApiFamily.OPENAI


# Anthropic's error types by HTTP status (https://docs.anthropic.com/en/api/errors).
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                    403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                    429: "rate_limit_error", 503: "overloaded_error", 529: "overloaded_error"}


def error_payload(family: ApiFamily, status: int, message: str, *,
                  type_: str = "invalid_request_error", param: str | None = None,
                  code: str | None = None) -> dict[str, object]:
    """The JSON body of an error in `family`'s shape (also used for in-stream error events)."""
    if family is ApiFamily.OLLAMA:
        return {"error": message}
    if family is ApiFamily.ANTHROPIC:
        kind = _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500
                                    else "invalid_request_error")
        return {"type": "error", "error": {"type": kind, "message": message}}
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(path: str, status: int, message: str, *,
                   type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """An error response in the shape of the API family that `path` belongs to."""
    body = error_payload(family_for_path(path), status, message, type_=type_, param=param,
                         code=code)
    return JSONResponse(body, status_code=status, headers=headers)


def error_body(exc: PensieveError) -> dict[str, object]:
    return {"error": {"message": exc.message, "type": exc.error_type, "param": exc.param,
                      "code": exc.code}}


def describe_validation_error(exc: RequestValidationError) -> tuple[str, str | None]:
    """One readable sentence and the offending parameter, from pydantic's error list."""
    errors = exc.errors()
    if not errors:
        return "Invalid request.", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _is_type_tag(p)]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return f"The request body is not valid JSON: {first.get('msg')}", None
    if first.get("type") == "missing" and not loc:
        return "The request needs a JSON object body.", None
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    where = f" at '{param}'" if param else ""
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return f"Invalid value{where}: {msg}{more}", param


def _is_type_tag(part: object) -> bool:
    """pydantic puts union member names ('str', 'list[int]', ...) into error locations."""
    return isinstance(part, str) and (
        "[" in part or part in {"str", "int", "float", "bool", "function-after"}
    )


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = describe_validation_error(exc)
        return error_response(request.url.path, 400, message, param=param, code="invalid_value")

    @app.exception_handler(PensieveError)
    async def _on_pensieve(request: Request, exc: PensieveError) -> JSONResponse:
        if exc.status_code >= 500:
            log.error("request failed: %s", exc.message)
        return error_response(request.url.path, exc.status_code, exc.message,
                              type_=exc.error_type, param=exc.param, code=exc.code,
                              headers=getattr(exc, "headers", None))

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(request.url.path, exc.status_code, str(exc.detail), code=code,
                              headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return error_response(request.url.path, 500, f"Internal error: {type(exc).__name__}",
                              type_="server_error")
