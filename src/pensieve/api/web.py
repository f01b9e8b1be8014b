"""The browser chat page at `/` and its static files, plus an offline API browser at `/docs`.

Ollama clients probe `GET /` (and `HEAD /`) and expect the plain text `Ollama is running`, so the
page is served only to requests that accept HTML (browsers); everything else gets that text.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, PlainTextResponse, Response

from pensieve.errors import NotFound

router = APIRouter(include_in_schema=False)

OLLAMA_PROBE_TEXT = "Ollama is running"
_MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
_STATIC_FILES = ("app.js", "markdown.js", "style.css", "docs.js", "icon.svg")


def _read(name: str) -> str:
    return resources.files("pensieve.web").joinpath(name).read_text(encoding="utf-8")


def _wants_html(request: Request) -> bool:
    return "text/html" in request.headers.get("accept", "")


@router.api_route("/", methods=["GET", "HEAD"], response_model=None)
async def index(request: Request) -> Response:
    if _wants_html(request):
        return HTMLResponse(_read("index.html"))
    return PlainTextResponse(OLLAMA_PROBE_TEXT)


@router.get("/docs")
async def api_docs() -> HTMLResponse:
    return HTMLResponse(_read("docs.html"))


@router.get("/web/{name}")
async def static_file(name: str) -> Response:
    if name not in _STATIC_FILES:
        raise NotFound(f"No web file named {name!r}. The chat page is at /.")
    suffix = name[name.rfind("."):]
    return Response(_read(name), media_type=_MEDIA_TYPES[suffix],
                    headers={"Cache-Control": "no-cache"})
