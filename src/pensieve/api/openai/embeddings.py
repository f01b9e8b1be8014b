"""OpenAI's /v1/embeddings: text, lists of texts, token arrays; float or base64 vectors."""

from __future__ import annotations

import base64
import struct
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import Field, model_validator

from pensieve.api.base import StrictBody
from pensieve.api.generation import open_model
from pensieve.errors import InvalidRequest

router = APIRouter()

MAX_INPUTS = 2048

EmbeddingInput = str | list[str] | list[int] | list[list[int]]


class EmbeddingRequest(StrictBody):
    model: str
    input: EmbeddingInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None
    keep_alive: int | float | str | None = None  # Ollama's: how long the model stays loaded

    @model_validator(mode="after")
    def _check_inputs(self) -> EmbeddingRequest:
        inputs = self.inputs()
        if not inputs or len(inputs) > MAX_INPUTS:
            raise ValueError(f"input must hold between 1 and {MAX_INPUTS} items")
        if any(len(x) == 0 for x in inputs):
            raise ValueError("input must not contain empty strings or empty token arrays")
        return self

    def inputs(self) -> list[str | list[int]]:
        x = self.input
        if isinstance(x, str):
            return [x]
        tokens = [t for t in x if isinstance(t, int)]
        if x and len(tokens) == len(x):  # one input of token ids (pydantic: never mixed)
            return [tokens]
        return [t for t in x if not isinstance(t, int)]


def encode_vector(vector: list[float], encoding_format: str) -> list[float] | str:
    """OpenAI's base64 is the little-endian float32 bytes of the vector."""
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, request: Request) -> dict[str, Any]:
    served, info = await open_model(request.app.state.runtime, body.model, body.keep_alive)
    result = await served.client.embed(body.inputs())
    size = len(result.embeddings[0])
    if body.dimensions is not None and body.dimensions != size:
        raise InvalidRequest(
            f"dimensions={body.dimensions} is not available: {info.description} gives "
            f"{size}-dimensional embeddings and was not trained to be truncated. Leave "
            "dimensions out or send the model's own size.", param="dimensions")
    data = [{"object": "embedding", "index": i,
             "embedding": encode_vector(v, body.encoding_format)}
            for i, v in enumerate(result.embeddings)]
    usage = {"prompt_tokens": result.num_prompt_tokens, "total_tokens": result.num_prompt_tokens}
    return {"object": "list", "data": data, "model": served.name, "usage": usage}
