"""Errors in each API family's own shape, mapped in one place."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pensieve.errors import PensieveError

log = logging.getLogger("pensieve.api")


def openai_error(status: int, message: str, *, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


def error_body(exc: PensieveError) -> dict[str, object]:
    return {"error": {"message": exc.message, "type": exc.error_type, "param": exc.param,
                      "code": exc.code}}


def error_from_exception(exc: PensieveError) -> JSONResponse:
    return JSONResponse(error_body(exc), status_code=exc.status_code)


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
    async def _on_validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = describe_validation_error(exc)
        return openai_error(400, message, param=param, code="invalid_value")

    @app.exception_handler(PensieveError)
    async def _on_pensieve(_request: Request, exc: PensieveError) -> JSONResponse:
        if exc.status_code >= 500:
            log.error("request failed: %s", exc.message)
        return error_from_exception(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return openai_error(exc.status_code, str(exc.detail), code=code)

    @app.exception_handler(Exception)
    async def _on_unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return openai_error(500, f"Internal error: {type(exc).__name__}", type_="server_error")
