"""Installs the route-agnostic middleware stack that makes the server safe to leave running.

    RequestContext  request id, access log, request metrics       (outermost)
    CORS            only with --cors-origins: preflights, response headers
    Access          Host, Origin, API key                         (middleware/access.py)
    BodyLimit       body size and read deadline                   (api/limits.py)
    the routes
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from pensieve.api.middleware.access import AccessConfig, AccessMiddleware
from pensieve.api.middleware.limits import BodyLimitMiddleware, LimitsConfig
from pensieve.api.middleware.metrics import Metrics
from pensieve.api.middleware.request_context import RequestContextMiddleware
from pensieve.runtime import ModelRuntime


@dataclass(frozen=True, slots=True)
class SafetyConfig:
    access: AccessConfig = field(default_factory=AccessConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)


def install_safety(app: FastAPI, runtime: ModelRuntime, config: SafetyConfig) -> None:
    metrics = Metrics(runtime)
    app.state.metrics = metrics
    # add_middleware puts each new one outside the ones before it: add innermost first.
    app.add_middleware(BodyLimitMiddleware, config=config.limits)
    app.add_middleware(AccessMiddleware, config=config.access)
    if config.access.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(config.access.cors_origins),
                           allow_methods=["*"], allow_headers=["*"],
                           expose_headers=["X-Request-Id"], allow_credentials=False)
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
