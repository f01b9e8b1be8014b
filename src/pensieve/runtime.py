"""The models this server serves, by name, each behind its own worker process."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from pensieve.engine.client import EngineClient
from pensieve.errors import ModelNotFound

log = logging.getLogger("pensieve.runtime")


@dataclass(slots=True)
class ServedModel:
    name: str
    client: EngineClient
    created: int = field(default_factory=lambda: int(time.time()))


class ModelRuntime:
    def __init__(self) -> None:
        self._models: dict[str, ServedModel] = {}

    def add(self, name: str, client: EngineClient) -> None:
        self._models[name] = ServedModel(name, client)

    def names(self) -> list[str]:
        return list(self._models)

    def models(self) -> list[ServedModel]:
        return list(self._models.values())

    def get(self, name: str) -> ServedModel:
        served = self._models.get(name)
        if served is None:
            raise ModelNotFound(name, self.names())
        return served

    async def start_all(self) -> None:
        for served in self._models.values():
            await served.client.ensure_started()

    async def stop_all(self) -> None:
        for served in self._models.values():
            await served.client.stop()
