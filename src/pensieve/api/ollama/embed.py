"""Ollama's embedding routes: /api/embed (`input`: one text or several) and the older
/api/embeddings (`prompt`: one text). Both go through `EngineClient.embed`."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from pydantic import Field

from pensieve.api.base import StrictBody
from pensieve.api.generation import open_model

router = APIRouter()


class EmbedBody(StrictBody):
    model: str
    input: str | list[str] = Field(min_length=1)
    truncate: bool = True
    options: dict[str, Any] | None = None
    keep_alive: str | int | None = None
    dimensions: int | None = Field(None, ge=1)


class EmbeddingsBody(StrictBody):
    model: str
    prompt: str = Field(min_length=1)
    options: dict[str, Any] | None = None
    keep_alive: str | int | None = None


@router.post("/api/embed")
async def embed(body: EmbedBody, request: Request) -> dict[str, Any]:
    started = time.perf_counter_ns()
    served, _ = await open_model(request.app.state.runtime, body.model, body.keep_alive)
    inputs = [body.input] if isinstance(body.input, str) else list(body.input)
    result = await served.client.embed(inputs, truncate=body.truncate)
    vectors = result.embeddings
    if body.dimensions is not None:  # Ollama truncates and renormalizes
        vectors = [_renormalized(v[: body.dimensions]) for v in vectors]
    return {"model": served.name, "embeddings": vectors,
            "total_duration": time.perf_counter_ns() - started, "load_duration": 0,
            "prompt_eval_count": result.num_prompt_tokens}


@router.post("/api/embeddings")
async def embeddings(body: EmbeddingsBody, request: Request) -> dict[str, Any]:
    served, _ = await open_model(request.app.state.runtime, body.model, body.keep_alive)
    result = await served.client.embed([body.prompt])
    return {"embedding": result.embeddings[0]}


def _renormalized(vector: list[float]) -> list[float]:
    norm = sum(x * x for x in vector) ** 0.5
    return [x / norm for x in vector] if norm > 0 else vector
