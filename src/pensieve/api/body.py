"""Request bodies parsed as JSON whatever their Content-Type, as Ollama and Anthropic do: their
documented `curl -d '{...}'` examples send no JSON content type."""

from __future__ import annotations

from typing import TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


async def parse_body(request: Request, model: type[M]) -> M:
    """Validate the raw body against `model`; errors become the usual 400 in the route's shape."""
    raw = await request.body()
    try:
        return model.model_validate_json(raw or b"null", strict=None)
    except ValidationError as exc:
        errors = [{**e, "loc": ("body", *e.get("loc", ()))} for e in exc.errors()]
        raise RequestValidationError(errors) from exc
