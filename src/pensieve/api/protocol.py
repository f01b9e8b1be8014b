"""The base of the HTTP request models: strict types (`"1"` is not a number), unknown fields kept
so they can be logged and ignored, as the APIs we follow ignore them."""

from __future__ import annotations

import logging

from pydantic import BaseModel, ConfigDict

log = logging.getLogger("pensieve.api")


class StrictBody(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    def warn_unknown_fields(self) -> None:
        if self.model_extra:
            log.info("ignoring unknown request fields: %s", ", ".join(sorted(self.model_extra)))
