"""`pensieve serve`: read the settings, resolve the model and start loading it, then build the
app and run uvicorn. The API (FastAPI, the routes, uvicorn's server) is imported only once the
model's worker is loading, so the two happen at the same time."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import re
import signal
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from pensieve import __version__
from pensieve.config import (
    Settings,
    device_budget_bytes,
    load_settings,
    memory_budget_bytes,
    store_dir,
)
from pensieve.engine.backend import BackendFactory, EngineBackend
from pensieve.engine.client import EngineClient
from pensieve.engine.config import ClientLimits, EngineConfig
from pensieve.engine.devices import kv_type_problem, plan_for, summary
from pensieve.errors import PensieveError
from pensieve.logs import setup_logging
from pensieve.runtime import LifecycleConfig, ModelRuntime
from pensieve.store.default_model import (
    DEFAULT_MODEL_NAME,
    RECOMMENDED_DEFAULTS,
    DefaultModelUnavailable,
    ensure_default_model,
)
from pensieve.store.default_model import SHA256 as DEFAULT_MODEL_SHA256
from pensieve.store.digest import file_digest
from pensieve.store.durations import parse_keep_alive
from pensieve.store.gguf import read_gguf
from pensieve.store.store import ModelDefaults, ModelStore

if TYPE_CHECKING:
    from pensieve.engine.worker import WorkerProcess

log = logging.getLogger("pensieve")
console = Console(stderr=True)


def model_name_for(path: Path) -> str:
    stem = path.name.removesuffix(".gguf")
    return re.sub(r"[^a-z0-9._:-]+", "-", stem.lower()).strip("-") or "model"


def resolve_model(settings: Settings) -> tuple[str, Path]:
    if settings.model is None:
        path = ensure_default_model(settings.data_dir, lambda p: _digest(settings, p))
        return settings.model_alias or DEFAULT_MODEL_NAME, path
    path = Path(settings.model).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"model file not found: {path}. Pass --model the path of a .gguf file (or leave "
            "--model out to serve the embedded default model).")
    return settings.model_alias or model_name_for(path), path


def _digest(settings: Settings, path: Path) -> str:
    """A model file's sha256, remembered across starts by (path, size, mtime)."""
    return file_digest(path, settings.data_dir / "digests.json")


def check_exposure(settings: Settings) -> str | None:
    """Why the server must not start as configured, or None."""
    from pensieve.api.middleware.access import is_loopback  # the HTTP stack: imported late

    if settings.ssl_certfile is None and settings.ssl_keyfile is not None:
        return "--ssl-keyfile needs --ssl-certfile"
    if is_loopback(settings.host) or settings.allow_unauthenticated_remote:
        return None
    if not settings.all_api_keys():
        return (f"refusing to listen on {settings.host} (reachable from other machines) "
                "without API keys: set --api-keys or --api-key-file, or pass "
                "--allow-unauthenticated-remote")
    return None


def serve_command(args: argparse.Namespace, worker: WorkerProcess | None = None) -> int:
    """`pensieve serve` from its parsed flags; `worker`, when given, is already started."""
    overrides = {k: v for k, v in vars(args).items()
                 if k in Settings.model_fields and v is not None}
    try:
        settings = load_settings(overrides, args.config)
    except (ValidationError, FileNotFoundError, ValueError) as exc:
        console.print(f"[red]Invalid configuration:[/red] {exc}\nEvery setting, its flag, "
                      "variable and allowed values: `pensieve serve --help` or "
                      "docs/configuration.md.", highlight=False)
        return 2
    return serve(settings, worker)


def serve(settings: Settings, worker: WorkerProcess | None = None) -> int:
    setup_logging(settings.log_level, settings.log_format)
    level = logging.getLevelName(settings.log_level.upper())
    try:
        name, path = resolve_model(settings)
        gguf = read_gguf(path)  # a corrupt file is refused here, before llama.cpp sees it
        refusal = check_exposure(settings) or kv_type_problem(
            gguf, settings.cache_type_k, settings.cache_type_v)
        digest = _digest(settings, path)
        config = settings.engine_config(str(path), digest)
        if refusal is None and settings.cluster is not None:
            make_backend = cluster_backends(settings)  # joins the cluster, or refuses
            client = make_backend(name, config, level, settings.client_limits())
        else:
            make_backend = None
            client = EngineClient(name, config, log_level=level,
                                  limits=settings.client_limits())
            if worker is not None and refusal is None:
                client.adopt(worker)  # the model loads from here on, while the API imports
        hardware = summary(plan_for(gguf, config.context, settings.gpu_config())[1])
    except (FileNotFoundError, DefaultModelUnavailable, PensieveError, OSError,
            ClusterUnavailable) as exc:
        console.print(f"[red]Cannot start:[/red] {exc}")
        return 2
    if refusal is not None:
        console.print(f"[red]Cannot start:[/red] {refusal}")
        return 2
    store = ModelStore(store_dir(settings))
    store.prune()  # as Ollama does at startup: unused blobs and crashed uploads
    runtime = build_runtime(settings, store, level, make_backend)
    defaults = _register_default_model(store, path, name) if settings.model is None else None
    runtime.add(name, client, digest=digest, defaults=defaults)
    return _run_http(settings, runtime, name, hardware)


def _run_http(settings: Settings, runtime: ModelRuntime, name: str, hardware: str) -> int:
    import uvicorn

    from pensieve.api.app import create_app
    from pensieve.api.middleware.limits import guarded_h11_protocol
    from pensieve.api.middleware.safety import SafetyConfig

    safety = SafetyConfig(settings.access_config(), settings.limits_config())
    app = create_app(runtime, safety, settings.responses_config())
    _print_banner(settings, name, hardware)
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


class ClusterUnavailable(Exception):
    """--cluster names a Ray cluster that cannot be joined (or Ray is not installed)."""


def cluster_backends(settings: Settings) -> BackendFactory:
    """Join the Ray cluster of --cluster; every model then runs as Serve replicas there.
    Ray is imported here and nowhere on the default path."""
    try:
        from pensieve.cluster.backend import RayBackend
        from pensieve.cluster.deployment import ClusterUnavailable as RayUnreachable
        from pensieve.cluster.deployment import connect
    except ImportError as exc:
        raise ClusterUnavailable(
            f"--cluster needs Ray ({exc.name} is not installed): pip install "
            "'pensieve-server[cluster]'") from None
    options = settings.cluster_options()
    try:
        connect(options)
    except RayUnreachable as exc:
        raise ClusterUnavailable(str(exc)) from None

    def make(name: str, config: EngineConfig, log_level: int,
             limits: ClientLimits | None) -> EngineBackend:
        return RayBackend(name, config, options, log_level=log_level, limits=limits)

    return make


def build_runtime(settings: Settings, store: ModelStore, log_level: int,
                  make_backend: BackendFactory | None = None) -> ModelRuntime:
    def make_config(path: str, digest: str, defaults: ModelDefaults) -> EngineConfig:
        config = settings.engine_config(path, digest)
        if defaults.num_ctx is None:
            return config
        context = dataclasses.replace(config.context, n_ctx=defaults.num_ctx)
        return dataclasses.replace(config, context=context)

    lifecycle = LifecycleConfig(memory_budget_bytes(settings), settings.max_loaded_models,
                                parse_keep_alive(settings.keep_alive), log_level,
                                settings.client_limits(), device_budget_bytes(settings))
    return ModelRuntime(store, make_config, lifecycle, settings.pull_policy(), make_backend)


def _register_default_model(store: ModelStore, path: Path, name: str) -> ModelDefaults:
    """List the embedded default model in the store too (hard-linked by digest where the
    file system allows, else copied once), with its recommended sampling; an entry made before
    there were recommendations gets them. Returns the entry's defaults."""
    manifest = store.find(name)
    if manifest is not None and (manifest.digest != DEFAULT_MODEL_SHA256
                                 or manifest.defaults != ModelDefaults()):
        return manifest.defaults  # the user's own entry, or one already set up
    try:
        if manifest is None:
            store.import_file(path, name, defaults=RECOMMENDED_DEFAULTS, link=True)
        else:
            store.write_manifest(dataclasses.replace(manifest, defaults=RECOMMENDED_DEFAULTS))
    except (OSError, PensieveError) as exc:
        log.warning("could not add the default model to the store: %s", exc)
    return RECOMMENDED_DEFAULTS


def _print_banner(settings: Settings, name: str, hardware: str | None = None) -> None:
    console.print(banner_text(settings, name, hardware), highlight=False, soft_wrap=True)


def banner_text(settings: Settings, name: str, hardware: str | None = None) -> str:
    """What `pensieve serve` prints on start: where it listens, the model, how to connect."""
    scheme = "https" if settings.ssl_certfile else "http"
    listen = f"{scheme}://{settings.host}:{settings.port}"
    connect_host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    url = f"{scheme}://{connect_host}:{settings.port}"
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
        *([f"  hardware  {hardware}; KV cache {settings.kv_type_label}"] if hardware else []),
        *([f"  cluster   Ray at {settings.cluster}: {_replica_count(settings)} engine "
           "replicas (Ray Serve), this server the ingress"] if settings.cluster else []),
    ])


def _replica_count(settings: Settings) -> str:
    low, high = settings.replicas_min, settings.replicas_max
    if low is None and high is None:
        return str(settings.replicas)
    return f"{settings.replicas} (autoscaled {low if low is not None else 1}-{high or '...'})"
