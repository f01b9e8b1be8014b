"""`pensieve serve`: resolve the model, build the app, run uvicorn."""

from __future__ import annotations

import json
import logging
import re
import signal
from pathlib import Path

import uvicorn
from rich.console import Console
from rich.markup import escape

from pensieve import __version__
from pensieve.api.app import create_app
from pensieve.config import Settings
from pensieve.engine.client import EngineClient
from pensieve.runtime import ModelRuntime
from pensieve.store.default_model import (
    DEFAULT_MODEL_NAME,
    DefaultModelUnavailable,
    ensure_default_model,
)
from pensieve.store.digest import file_digest

log = logging.getLogger("pensieve")
console = Console(stderr=True)


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")


def model_name_for(path: Path) -> str:
    stem = path.name.removesuffix(".gguf")
    return re.sub(r"[^a-z0-9._:-]+", "-", stem.lower()).strip("-") or "model"


def resolve_model(settings: Settings) -> tuple[str, Path]:
    if settings.model is None:
        path = ensure_default_model(settings.data_dir)
        return settings.model_alias or DEFAULT_MODEL_NAME, path
    path = Path(settings.model).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"model file not found: {path}. Pass --model the path of a .gguf file (or leave "
            "--model out to serve the embedded default model).")
    return settings.model_alias or model_name_for(path), path


def serve(settings: Settings) -> int:
    setup_logging(settings.log_level)
    try:
        name, path = resolve_model(settings)
    except (FileNotFoundError, DefaultModelUnavailable) as exc:
        console.print(f"[red]Cannot start:[/red] {exc}")
        return 2
    runtime = ModelRuntime()
    level = logging.getLevelName(settings.log_level.upper())
    digest = file_digest(path, settings.data_dir / "digests.json")
    config = settings.engine_config(str(path), digest)
    runtime.add(name, EngineClient(name, config, log_level=level))
    app = create_app(runtime)
    _print_banner(settings, name)
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then re-raises the signal against the
    # handler it found; a no-op handler makes that a clean exit 0 instead of death by signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                access_log=False, timeout_graceful_shutdown=30)
    log.info("stopped")
    return 0


def _print_banner(settings: Settings, name: str) -> None:
    console.print(banner_text(settings, name), highlight=False, soft_wrap=True)


def banner_text(settings: Settings, name: str) -> str:
    """What `pensieve serve` prints on start: where it listens, the model, how to connect."""
    listen = f"http://{settings.host}:{settings.port}"
    connect_host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    url = f"http://{connect_host}:{settings.port}"
    body = json.dumps({"model": name, "max_tokens": 64,
                       "messages": [{"role": "user", "content": "Hello"}]})
    return "\n".join([
        f"[bold]Pensieve {__version__}[/bold] serving [cyan]{name}[/cyan] on {listen} "
        "(ready once the model is loaded)",
        f"  browser   {url}/",
        f"  terminal  pensieve run {name} --url {url}",
        f"  curl      curl {url}/v1/chat/completions -H 'Content-Type: application/json' "
        f"-d '{escape(body)}'",
        f"  openai    OpenAI(base_url=\"{url}/v1\", api_key=\"none\")",
        f"  ollama    OLLAMA_HOST={url} ollama run {name}   |   ollama.Client(host=\"{url}\")",
        f"  API       {url}/docs",
    ])
