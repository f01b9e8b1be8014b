"""The FastAPI application: app factory, lifespan (start and stop the model workers), routes."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from pensieve import __version__
from pensieve.api import admin, web
from pensieve.api.anthropic import routes as anthropic
from pensieve.api.errors import install_error_handlers
from pensieve.api.middleware import metrics
from pensieve.api.middleware.access import AccessConfig
from pensieve.api.middleware.safety import SafetyConfig, install_safety
from pensieve.api.ollama import embed as ollama_embed
from pensieve.api.ollama import models as ollama_models
from pensieve.api.ollama import routes as ollama
from pensieve.api.openai import embeddings, responses
from pensieve.api.openai import routes as openai
from pensieve.api.openai.responses_store import ResponseStore, ResponseStoreConfig
from pensieve.engine.backend import EngineBackend
from pensieve.runtime import ModelRuntime

log = logging.getLogger("pensieve.api")


def create_app(runtime: ModelRuntime, safety: SafetyConfig | None = None,
               responses_store: ResponseStoreConfig | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.runtime = runtime
        runtime.observer = app.state.metrics  # for models loaded later, from the store
        for served in runtime.models():
            served.client.observer = app.state.metrics
        await runtime.start_all()
        log.info("ready: serving %s", ", ".join(runtime.names()))
        try:
            yield
        finally:
            await runtime.stop_all()

    # FastAPI's own /docs loads Swagger UI from a CDN; web.router serves an offline page instead.
    app = FastAPI(title="Pensieve", version=__version__, lifespan=lifespan,
                  description="A local LLM server with continuous batching and memory.",
                  docs_url=None, redoc_url=None)
    install_error_handlers(app)
    # Stored responses of /v1/responses; without a config (tests), kept in memory only.
    app.state.responses = ResponseStore(responses_store or ResponseStoreConfig(None))
    # Without a config (tests, embedding) any Host is accepted; `pensieve serve` always passes
    # one built from the settings, which checks Host against the loopback names by default.
    install_safety(app, runtime, safety or SafetyConfig(AccessConfig(allowed_hosts=("*",))))
    app.include_router(openai.router)
    app.include_router(responses.router)
    app.include_router(admin.router)
    app.include_router(ollama.router)
    app.include_router(anthropic.router)
    app.include_router(embeddings.router)
    app.include_router(ollama_embed.router)
    app.include_router(web.router)
    app.include_router(ollama_models.router)
    app.include_router(metrics.router)

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        models = request.app.state.runtime.models()
        ready = any(m.client.is_running for m in models)
        status = {"status": "ok" if ready else "loading",
                  "models": {m.name: _model_status(m.client) for m in models}}
        return JSONResponse(status, status_code=200)

    @app.get("/ready")
    async def ready(request: Request) -> JSONResponse:
        """200 when at least one model can serve now, else 503 (loading, crashed)."""
        models = request.app.state.runtime.models()
        serving = [m.name for m in models if m.client.is_running]
        body = {"status": "ready" if serving else "not ready", "models": serving}
        return JSONResponse(body, status_code=200 if serving else 503)

    return app


def _model_status(client: EngineBackend) -> dict[str, object]:
    stats = client.stats
    status: dict[str, object] = {
        "state": "ready" if client.is_running else "not loaded", "pid": client.pid,
        "num_running": stats.num_running, "num_waiting": stats.num_waiting,
        "num_restarts": stats.num_restarts, "memory": stats.memory,
        "hardware": _hardware(client)}
    if stats.replicas is not None:  # a cluster: each replica's node, pid, load, memory
        status["replicas"] = stats.replicas
    return status


def _hardware(client: EngineBackend) -> dict[str, object]:
    """Where the model runs (once loaded) and its KV cache types."""
    ctx = client.config.context
    hardware: dict[str, object] = {"cache_type_k": ctx.type_k, "cache_type_v": ctx.type_v}
    offload = client.info.offload if client.info is not None else None
    if offload is not None:
        hardware.update(backend=offload.backend, devices=list(offload.devices),
                        gpu_layers=offload.num_gpu_layers, layers=offload.num_layers,
                        cpu_reason=offload.cpu_reason)
    return hardware
