"""Start-up stays fast only while the model worker and the command line import little: the worker
is spawned first and loads the model while the API server imports its stack, and a worker
spawned from the `pensieve` script re-runs the script, so it imports `pensieve.cli.main` too."""

from __future__ import annotations

import json
import subprocess
import sys

NOT_IN_WORKER = ("jinja2", "llama_cpp.llama", "llama_cpp.llama_chat_format", "diskcache")
HTTP_STACK = ("fastapi", "starlette", "uvicorn", "pydantic", "pydantic_settings", "rich",
              "httpx", "huggingface_hub", "prometheus_client", "pensieve.api", "pensieve.config")


def modules_after(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running `code`."""
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, check=True)
    return set(json.loads(out.stdout.splitlines()[-1]))


def heavy(modules: set[str], names: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == n or m.startswith(n + ".") for n in names))


def test_the_worker_imports_the_engine_and_not_the_http_stack() -> None:
    modules = modules_after("from pensieve.engine.worker import import_engine\n"
                            "import_engine()")
    assert {"pensieve.engine.engine", "llama_cpp.llama_cpp"} <= modules  # the engine is there
    assert heavy(modules, (*HTTP_STACK, *NOT_IN_WORKER)) == []


def test_the_worker_loads_the_bindings_the_engine_uses() -> None:
    # llama_cpp without its package __init__ still offers every low-level name
    modules = modules_after("from pensieve.engine.worker import import_engine\n"
                            "import_engine()\n"
                            "import llama_cpp, llama_cpp.llama_cpp as low\n"
                            "assert llama_cpp.llama_decode is low.llama_decode\n"
                            "assert llama_cpp.llama_batch is low.llama_batch")
    assert "llama_cpp.llama_cpp" in modules


def test_spawning_a_worker_imports_no_engine_in_the_parent() -> None:
    # `pensieve serve` spawns the worker before it reads its settings: that must stay cheap
    modules = modules_after("import pensieve.engine.worker")
    assert heavy(modules, (*HTTP_STACK, "llama_cpp", "numpy", "pensieve.engine.engine")) == []


def test_the_command_line_entry_point_is_light() -> None:
    modules = modules_after("import pensieve.cli.main")
    assert heavy(modules, (*HTTP_STACK, "llama_cpp", "numpy", "pensieve.engine")) == []


def test_client_commands_do_not_import_the_server() -> None:
    # `pensieve run|ps|cache` talk to a server over HTTP: no settings, engine or FastAPI
    modules = modules_after("from pensieve.cli.main import build_parser\n"
                            "build_parser(serve_flags=False)")
    assert "pensieve.cli.run" in modules
    assert heavy(modules, ("fastapi", "uvicorn", "pydantic_settings", "pensieve.config",
                           "pensieve.engine", "llama_cpp", "numpy")) == []


def test_the_api_process_builds_its_settings_without_llama_cpp_or_numpy() -> None:
    # the server's imports up to handing the worker its model, and the HTTP app itself, run
    # while the model loads: llama.cpp and numpy belong to the worker (and a GPU listing)
    modules = modules_after("import pensieve.cli.serve, pensieve.api.app")
    assert heavy(modules, ("llama_cpp", "numpy", "pensieve.engine.engine",
                           "pensieve.memory.tiered")) == []


def test_the_default_server_imports_no_cluster_package() -> None:
    # ray and redis are the cluster extra's: imported only by cluster mode and --memory-shared
    modules = modules_after("import pensieve.api.app, pensieve.config, pensieve.memory.tiered\n"
                            "from pensieve.engine.worker import import_engine\n"
                            "import_engine()")
    assert "pensieve.memory.shared" in modules
    assert heavy(modules, ("ray", "redis")) == []
