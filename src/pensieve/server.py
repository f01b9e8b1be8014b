"""`pensieve serve`: resolve the model, build the app, run uvicorn."""

from __future__ import annotations

import logging
import math
import re
import signal
from pathlib import Path

import uvicorn
from rich.console import Console

from pensieve.api.access import is_loopback
from pensieve.api.app import create_app
from pensieve.api.limits import guarded_h11_protocol
from pensieve.api.safety import SafetyConfig
from pensieve.config import Settings
from pensieve.engine.client import EngineClient
from pensieve.logs import setup_logging
from pensieve.runtime import ModelRuntime
from pensieve.store.default_model import (
    DEFAULT_MODEL_NAME,
    DefaultModelUnavailable,
    ensure_default_model,
)
from pensieve.store.digest import file_digest

log = logging.getLogger("pensieve")
console = Console(stderr=True)


def model_name_for(path: Path) -> str:
    stem = path.name.removesuffix(".gguf")
    return re.sub(r"[^a-z0-9._:-]+", "-", stem.lower()).strip("-") or "model"


def resolve_model(settings: Settings) -> tuple[str, Path]:
    if settings.model is None:
        path = ensure_default_model(settings.data_dir)
        return settings.model_alias or DEFAULT_MODEL_NAME, path
    path = Path(settings.model).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    return settings.model_alias or model_name_for(path), path


def check_exposure(settings: Settings) -> str | None:
    """Why the server must not start as configured, or None."""
    if settings.ssl_certfile is None and settings.ssl_keyfile is not None:
        return "--ssl-keyfile needs --ssl-certfile"
    if is_loopback(settings.host) or settings.allow_unauthenticated_remote:
        return None
    if not settings.all_api_keys():
        return (f"refusing to listen on {settings.host} (reachable from other machines) "
                "without API keys: set --api-keys or --api-key-file, or pass "
                "--allow-unauthenticated-remote")
    return None


def serve(settings: Settings) -> int:
    setup_logging(settings.log_level, settings.log_format)
    try:
        refusal = check_exposure(settings)
        name, path = resolve_model(settings)
    except (FileNotFoundError, DefaultModelUnavailable, OSError) as exc:
        console.print(f"[red]Cannot start:[/red] {exc}")
        return 2
    if refusal is not None:
        console.print(f"[red]Cannot start:[/red] {refusal}")
        return 2
    runtime = ModelRuntime()
    level = logging.getLevelName(settings.log_level.upper())
    digest = file_digest(path, settings.data_dir / "digests.json")
    config = settings.engine_config(str(path), digest)
    runtime.add(name, EngineClient(name, config, log_level=level,
                                   limits=settings.client_limits()))
    safety = SafetyConfig(settings.access_config(), settings.limits_config())
    app = create_app(runtime, safety)
    _print_banner(settings, name)
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then re-raises the signal against the
    # handler it found; a no-op handler makes that a clean exit 0 instead of death by signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                log_config=None, access_log=False,
                timeout_graceful_shutdown=int(math.ceil(settings.shutdown_timeout)),
                http=guarded_h11_protocol(settings.read_timeout),
                h11_max_incomplete_event_size=settings.max_header_bytes,
                limit_concurrency=settings.max_connections,
                ssl_certfile=settings.ssl_certfile, ssl_keyfile=settings.ssl_keyfile)
    log.info("stopped")
    return 0


def _print_banner(settings: Settings, name: str) -> None:
    scheme = "https" if settings.ssl_certfile else "http"
    url = f"{scheme}://{settings.host}:{settings.port}"
    console.print(
        f"[bold]Pensieve[/bold] serving [cyan]{name}[/cyan] at {url} once loaded\n"
        f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json' "
        f"-d '{{\"model\": \"{name}\", \"messages\": [{{\"role\": \"user\", "
        f"\"content\": \"Hello\"}}]}}'\n"
        f"  python: OpenAI(base_url=\"{url}/v1\", api_key=\"none\")",
        highlight=False,
    )
