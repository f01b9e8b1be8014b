"""Ollama's model-management routes over the store and the runtime: /api/tags, /api/show,
/api/pull (NDJSON progress), /api/delete, /api/copy, /api/ps, /api/create and
/api/blobs. Errors come out in Ollama's
shape (`{"error": "..."}`) through api/errors.py."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import Field
from starlette.requests import ClientDisconnect

from pensieve.api.base import StrictBody, parse_body
from pensieve.api.ollama.capabilities import capabilities
from pensieve.errors import InvalidRequest, NotFound, PensieveError
from pensieve.runtime import ModelRuntime, ServedModel, resident_bytes
from pensieve.store import describe
from pensieve.store.gguf import GgufInfo, read_gguf
from pensieve.store.names import parse_digest, parse_name
from pensieve.store.pull import PullProgress, check_source, pull
from pensieve.store.store import Manifest, ModelDefaults, ModelStore
from pensieve.templates import ChatTemplate

router = APIRouter()
log = logging.getLogger("pensieve.models")
class ModelBody(StrictBody):
    model: str | None = Field(None, max_length=1000)
    name: str | None = Field(None, max_length=1000)  # older clients say `name`
    verbose: bool = False

    def target(self) -> str:
        target = self.model or self.name
        if not target:
            raise InvalidRequest("The request needs a `model`.", param="model")
        return target


class PullBody(ModelBody):
    stream: bool = True
    insecure: bool = False
    sha256: str | None = Field(None, max_length=80)  # extension: pin a URL's digest
    as_name: str | None = Field(None, max_length=300)  # extension: store under this name


class CreateBody(ModelBody):
    from_: str | None = Field(None, alias="from", max_length=1000)
    files: dict[str, str] | None = Field(None, max_length=16)
    template: str | None = Field(None, max_length=1 << 16)
    system: str | None = Field(None, max_length=1 << 16)
    parameters: dict[str, Any] | None = Field(None, max_length=64)
    license: str | list[str] | None = None  # kept by Ollama; the GGUF's own license shows here
    adapters: dict[str, str] | None = None
    messages: list[Any] | None = None
    quantize: str | None = None
    stream: bool = True


class CopyBody(StrictBody):
    source: str = Field(max_length=300)
    destination: str = Field(max_length=300)


def _runtime(request: Request) -> ModelRuntime:
    runtime: ModelRuntime = request.app.state.runtime
    return runtime


def _store(request: Request) -> ModelStore:
    store = _runtime(request).store
    if store is None:
        raise NotFound("This server has no model store.")
    return store


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z")


def _model_file(served: ServedModel | None, manifest: Manifest | None,
                store: ModelStore | None) -> str:
    if served is not None:
        return served.client.config.model_path
    assert manifest is not None and store is not None
    return str(store.blob_path(manifest.digest))


@router.get("/api/tags")
async def tags(request: Request) -> dict[str, Any]:
    runtime = _runtime(request)
    return {"models": await asyncio.to_thread(_tag_rows, runtime)}


def _tag_rows(runtime: ModelRuntime) -> list[dict[str, Any]]:
    rows = []
    for name, served, manifest in runtime.listing():
        try:
            info = read_gguf(_model_file(served, manifest, runtime.store))
        except PensieveError:
            continue  # a broken file is not listed (show/load name the problem)
        digest = manifest.digest if manifest else (served.digest if served else None)
        created = manifest.created if manifest else float(served.created if served else 0)
        rows.append({"name": name, "model": name, "modified_at": _iso(created),
                     "size": info.file_size, "digest": digest or "",
                     "details": describe.details(info)})
    return rows


@router.post("/api/show")
async def show(request: Request) -> dict[str, Any]:
    body = await parse_body(request, ModelBody, b"{}")
    runtime = _runtime(request)
    served = runtime.get(body.target())
    manifest = runtime.store.find(served.name) if runtime.store else None
    info = await asyncio.to_thread(read_gguf, served.client.config.model_path)
    return _show_payload(served, manifest, info)


def _show_payload(served: ServedModel, manifest: Manifest | None,
                  info: GgufInfo) -> dict[str, Any]:
    license_ = info.metadata.get("general.license")
    template = served.defaults.template or info.chat_template or ""
    created = manifest.created if manifest else float(served.created)
    return {"license": license_ if isinstance(license_, str) else "",
            "modelfile": describe.modelfile(served.name, served.defaults, info),
            "parameters": describe.parameters_text(served.defaults), "template": template,
            "system": served.defaults.system or "", "details": describe.details(info),
            "model_info": describe.model_info(info),
            "capabilities": capabilities(template, info.metadata),
            "modified_at": _iso(created), "summary": describe.summary(info)}


@router.post("/api/pull", response_model=None)
async def pull_model(request: Request) -> JSONResponse | StreamingResponse:
    body = await parse_body(request, PullBody, b"{}")
    store, policy = _store(request), _runtime(request).pull_policy
    await asyncio.to_thread(check_source, body.target(), policy)  # a 400 before any stream
    events: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    loop = asyncio.get_running_loop()

    def report(p: PullProgress) -> None:
        event = {k: v for k, v in (("status", p.status), ("digest", p.digest),
                                   ("total", p.total), ("completed", p.completed))
                 if v is not None}
        loop.call_soon_threadsafe(events.put_nowait, event)

    job = asyncio.create_task(asyncio.to_thread(
        pull, store, body.target(), name=body.as_name, sha256=body.sha256,
        progress=_throttled(report), policy=policy))
    if not body.stream:
        await job
        return JSONResponse({"status": "success"})
    return StreamingResponse(_ndjson(job, events), media_type="application/x-ndjson")


def _throttled(report: Callable[[PullProgress], None]) -> Callable[[PullProgress], None]:
    """Byte progress at most ten times a second; status changes always."""
    last_time, last_status = 0.0, ""

    def throttled(p: PullProgress) -> None:
        nonlocal last_time, last_status
        now = time.monotonic()
        if p.status != last_status or now - last_time >= 0.1 or p.completed == p.total:
            last_time, last_status = now, p.status
            report(p)

    return throttled


async def _ndjson(job: asyncio.Task[Manifest],
                  events: asyncio.Queue[dict[str, Any] | None]) -> AsyncIterator[bytes]:
    job.add_done_callback(lambda _t: events.put_nowait(None))
    while (event := await events.get()) is not None:
        yield (json.dumps(event) + "\n").encode()
    while not events.empty():  # progress that arrived after the job ended
        if (event := events.get_nowait()) is not None:
            yield (json.dumps(event) + "\n").encode()
    exc = job.exception()
    if exc is not None:
        message = exc.message if isinstance(exc, PensieveError) else str(exc)
        yield (json.dumps({"error": message}) + "\n").encode()


@router.delete("/api/delete")
async def delete(request: Request) -> Response:
    body = await parse_body(request, ModelBody, b"{}")
    store, runtime = _store(request), _runtime(request)
    manifest = await asyncio.to_thread(store.remove, body.target())
    runtime.forget(str(manifest.name))
    return Response(status_code=200)


@router.post("/api/copy")
async def copy(request: Request) -> Response:
    body = await parse_body(request, CopyBody, b"{}")
    await asyncio.to_thread(_store(request).copy, body.source, body.destination)
    return Response(status_code=200)


# --- create and blobs ------------------------------------------------------------------------
_UPLOAD_IDLE_S = 60.0  # an upload that sends nothing for this long is dropped


@router.head("/api/blobs/{digest}")
async def blob_exists(digest: str, request: Request) -> Response:
    path = _store(request).blob_path(parse_digest(digest))
    return Response(status_code=200 if await asyncio.to_thread(path.is_file) else 404)


@router.post("/api/blobs/{digest}")
async def upload_blob(digest: str, request: Request) -> Response:
    """Receive a GGUF file for a later /api/create: written to disk as it arrives, then
    checked (sha256, GGUF structure) before it becomes a blob."""
    expected = parse_digest(digest)
    store = _store(request)
    if await asyncio.to_thread(store.blob_path(expected).is_file):
        return Response(status_code=200)
    store.partial.mkdir(parents=True, exist_ok=True)
    tmp = store.partial / f"upload-{os.getpid()}-{time.monotonic_ns()}"
    hasher = hashlib.sha256()
    try:
        with open(tmp, "wb") as f:
            chunks = request.stream().__aiter__()
            while True:
                try:
                    async with asyncio.timeout(_UPLOAD_IDLE_S):
                        chunk = await anext(chunks)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    raise InvalidRequest(f"The upload sent nothing for {_UPLOAD_IDLE_S:g} s.",
                                         code="request_timeout") from None
                except ClientDisconnect:
                    log.info("an upload of sha256:%s stopped: the client went away", expected)
                    return Response(status_code=400)
                hasher.update(chunk)
                await asyncio.to_thread(f.write, chunk)
        await asyncio.to_thread(store.commit_blob, tmp, hasher.hexdigest(), expected)
    finally:
        tmp.unlink(missing_ok=True)
    return Response(status_code=201)


@router.post("/api/create", response_model=None)
async def create(request: Request) -> JSONResponse | StreamingResponse:
    """Ollama's create: a new model from an existing one (`from`) or from an uploaded GGUF blob
    (`files`), with its own system prompt, template and parameters."""
    body = await parse_body(request, CreateBody, b"{}")
    store, runtime = _store(request), _runtime(request)
    name = parse_name(body.target())
    for field_ in ("adapters", "messages", "quantize"):
        if getattr(body, field_):
            raise InvalidRequest(f"`{field_}` is not supported by /api/create on this server.",
                                 param=field_)
    if (body.from_ is None) == (body.files is None):
        raise InvalidRequest("Give either `from` (an existing model) or `files` (one uploaded "
                             "GGUF blob).", param="from")
    overrides: dict[str, object] = dict(body.parameters or {})
    if body.system is not None:
        overrides["system"] = body.system
    if body.template is not None:
        _check_template(body.template)
        overrides["template"] = body.template
    statuses: list[str] = []
    if body.from_ is not None:
        base = runtime.get(body.from_)
        manifest = await asyncio.to_thread(store.find, base.name)
        if manifest is not None:
            digest, size = manifest.digest, manifest.size
        else:  # served from a path given at startup: take the file in
            digest, size = await asyncio.to_thread(
                store.add_file, Path(base.client.config.model_path), link=True)
        source = f"from:{base.name}"
        defaults = {**base.defaults.to_dict(), **overrides}
        statuses.append(f"using existing layer sha256:{digest}")
    else:
        digest, size = await asyncio.to_thread(_uploaded_model, store, body.files or {})
        source, defaults = "upload", overrides
        statuses.append(f"using uploaded layer sha256:{digest}")
    created = Manifest(name, digest, size, source, time.time(), ModelDefaults.from_dict(defaults))
    statuses.append("writing manifest")
    await asyncio.to_thread(store.write_manifest, created)
    if not body.stream:
        return JSONResponse({"status": "success"})
    lines = [json.dumps({"status": s}) + "\n" for s in [*statuses, "success"]]
    return StreamingResponse(iter(lines), media_type="application/x-ndjson")


def _uploaded_model(store: ModelStore, files: dict[str, str]) -> tuple[str, int]:
    if len(files) != 1:
        raise InvalidRequest("`files` must name exactly one GGUF model file (adapters and "
                             "projectors are not supported).", param="files")
    (filename, value), = files.items()
    digest = parse_digest(value)
    path = store.blob_path(digest)
    if not path.is_file():
        raise InvalidRequest(f"The blob for {filename!r} (sha256:{digest[:12]}...) has not been "
                             f"uploaded: POST it to /api/blobs/sha256:{digest} first.",
                             param="files")
    return digest, path.stat().st_size


def _check_template(template: str) -> None:
    try:
        ChatTemplate(template, "<s>", "</s>").render([{"role": "user", "content": "Hi."}])
    except InvalidRequest as exc:
        raise InvalidRequest(f"{exc.message} Pensieve's templates are Jinja chat templates, as "
                             "in GGUF files, not Ollama's Go templates.",
                             param="template", code="invalid_template") from None


@router.get("/api/ps")
async def ps(request: Request) -> dict[str, Any]:
    rows = []
    for served in _runtime(request).models():
        client = served.client
        if not client.is_running:
            continue
        expires = served.expires_at()
        info = client.info
        rows.append({
            "name": served.name, "model": served.name, "digest": served.digest or "",
            "size": served.num_budget_bytes, "size_vram": served.num_device_bytes,
            "expires_at": _iso(expires) if expires else "0001-01-01T00:00:00Z",
            "context_length": info.n_ctx if info else None,
            "details": {"format": "gguf"},
            # Pensieve's own: measured, not estimated
            "load_seconds": client.load_seconds, "resident_bytes": resident_bytes(client.pid),
            "pid": client.pid, "num_running": client.stats.num_running,
        })
    return {"models": rows}
