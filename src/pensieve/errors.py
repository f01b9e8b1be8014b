"""Typed exceptions raised below the HTTP edge. Each API family maps them to its own error shape
in one place (api/errors.py)."""

from __future__ import annotations


class PensieveError(Exception):
    status_code = 500
    error_type = "server_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class InvalidRequest(PensieveError):
    status_code = 400
    error_type = "invalid_request_error"


class NotFound(PensieveError):
    status_code = 404
    error_type = "invalid_request_error"


class ModelNotFound(PensieveError):
    status_code = 404
    error_type = "invalid_request_error"

    def __init__(self, name: str, available: list[str]):
        listing = ", ".join(available) or "none"
        super().__init__(
            f"The model {name!r} does not exist. Models served here: {listing}. Put one of "
            "those names in the request's `model` field (GET /v1/models lists them).",
            param="model",
            code="model_not_found",
        )


class InvalidModelFile(InvalidRequest):
    """A model file that is not a well-formed GGUF (refused before llama.cpp sees it)."""

    def __init__(self, message: str):
        super().__init__(message, code="invalid_model_file")


class ModelLoadError(PensieveError):
    status_code = 500
    error_type = "server_error"


class WorkerCrashed(PensieveError):
    """The worker process died while this request was in flight."""

    status_code = 503
    error_type = "server_error"


class EngineError(PensieveError):
    """The engine failed this request (for example llama_decode returned an error)."""

    status_code = 500
    error_type = "server_error"


class Overloaded(PensieveError):
    """Too many requests are queued for a model; the client should retry after a while."""

    status_code = 503
    error_type = "server_error"

    def __init__(self, message: str, *, code: str | None = None, retry_after_s: int = 1):
        super().__init__(message, code=code)
        self.headers = {"Retry-After": str(retry_after_s)}


class DeadlineExceeded(PensieveError):
    """The request ran past the server's per-request deadline (--request-timeout)."""

    status_code = 504
    error_type = "server_error"
