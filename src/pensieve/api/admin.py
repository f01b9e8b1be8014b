"""Admin routes for Pensieve's memory: list, inspect and delete remembered conversations.

Entries are named by a hash of their token ids; no prompt text ever leaves the worker here.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from pensieve.errors import NotFound
from pensieve.runtime import ModelRuntime, ServedModel

router = APIRouter(prefix="/admin/memory", tags=["admin"])


def _served(request: Request, model: str | None) -> ServedModel:
    runtime: ModelRuntime = request.app.state.runtime
    return runtime.get_or_first(model)


@router.get("")
async def list_memory(request: Request, model: str | None = None) -> dict[str, Any]:
    served = _served(request, model)
    result = await served.client.memory()
    return {"model": served.name, "entries": result.entries,
            "stats": served.client.stats.memory}


@router.get("/{key}")
async def show_memory(key: str, request: Request, model: str | None = None) -> dict[str, Any]:
    served = _served(request, model)
    for entry in (await served.client.memory()).entries:
        if entry["key"] == key:
            return {"model": served.name, **entry}
    raise NotFound(f"No remembered conversation has key {key!r}.", param="key",
                         code="not_found")


@router.delete("/{key}")
async def delete_memory(key: str, request: Request, model: str | None = None) -> dict[str, Any]:
    served = _served(request, model)
    result = await served.client.memory(delete=True, key=key)
    return {"model": served.name, "key": key, "deleted": result.num_deleted}


@router.delete("")
async def clear_memory(request: Request, model: str | None = None) -> dict[str, Any]:
    served = _served(request, model)
    result = await served.client.memory(delete=True)
    return {"model": served.name, "deleted": result.num_deleted}
