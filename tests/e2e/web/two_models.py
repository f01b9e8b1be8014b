"""A test server that serves the default model under two names, each in its own worker, so the
browser test can switch models. Usage: two_models.py PORT DATA_DIR MODEL_PATH NAME NAME"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import uvicorn

from pensieve.api.app import create_app
from pensieve.config import Settings
from pensieve.engine.client import EngineClient
from pensieve.runtime import ModelRuntime


def main(port: str, data_dir: str, model_path: str, *names: str) -> None:
    settings = Settings(port=int(port), data_dir=Path(data_dir), ctx_size=2048, parallel=2,
                        memory_disk_mb=0)
    runtime = ModelRuntime()
    for name in names:
        runtime.add(name, EngineClient(name, settings.engine_config(model_path),
                                       log_level=logging.WARNING))
    uvicorn.run(create_app(runtime), host="127.0.0.1", port=settings.port, log_level="warning")


if __name__ == "__main__":
    main(*sys.argv[1:])
