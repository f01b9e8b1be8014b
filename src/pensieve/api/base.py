"""The base of the HTTP request models and their parsing.

Strict types (`"1"` is not a number); unknown fields are kept so they can be logged and ignored,
as the APIs we follow ignore them. Bodies parse as JSON whatever their Content-Type, as Ollama
and Anthropic do: their documented `curl -d '{...}'` examples send no JSON content type.
"""

from __future__ import annotations

import logging
from typing import TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, ValidationError

log = logging.getLogger("pensieve.api")

M = TypeVar("M", bound=BaseModel)


class StrictBody(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    def warn_unknown_fields(self) -> None:
        if self.model_extra:
            log.info("ignoring unknown request fields: %s", ", ".join(sorted(self.model_extra)))


async def parse_body(request: Request, model: type[M], empty: bytes = b"null") -> M:
    """Validate the raw body (`empty` when there is none) against `model`; errors become the
    usual 400 in the route's shape."""
    raw = await request.body()
    try:
        return model.model_validate_json(raw or empty, strict=None)
    except ValidationError as exc:
        errors = [{**e, "loc": ("body", *e.get("loc", ()))} for e in exc.errors()]
        raise RequestValidationError(errors) from exc
