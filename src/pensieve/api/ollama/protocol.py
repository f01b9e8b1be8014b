"""Ollama request models (pydantic, strict types), translated to a `GenerationRequest`."""

from __future__ import annotations

import json
import logging
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pensieve.api.base import StrictBody
from pensieve.api.generation import GenerationRequest, Prompt, ResponseFormat, Turn
from pensieve.api.sampling_fields import RepetitionFields, sent_fields
from pensieve.engine.types import SamplingParams
from pensieve.errors import InvalidRequest
from pensieve.store.durations import parse_keep_alive

log = logging.getLogger("pensieve.api")

MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
MAX_SCHEMA_CHARS = 1 << 16
# Options that size or place the model at load time: one server-wide setting each in Pensieve.
# Options that set a SamplingParams field of another name (store defaults fill the unset).
_RENAMES = {"num_predict": "max_tokens"}
_LOAD_OPTIONS = {"numa", "num_batch", "num_gpu", "main_gpu", "low_vram", "f16_kv", "logits_all",
                 "vocab_only", "use_mmap", "use_mlock", "embedding_only", "num_thread",
                 "num_keep", "penalize_newline", "tfs_z"}


class Options(StrictBody, RepetitionFields):
    """Ollama's `options`, the runtime ones mapped onto `SamplingParams` (with llama-server's
    dry_* names for llama.cpp's DRY sampler)."""

    # a limit on prompt + answer within the server's context (more than it: a 400)
    num_ctx: int | None = Field(None, ge=1, le=1 << 24)
    num_predict: int | None = Field(None, ge=-2, le=1 << 20)
    temperature: float | None = Field(None, ge=0.0, le=100.0)
    top_k: int | None = Field(None, ge=0, le=1 << 20)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    typical_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=-(1 << 63), le=(1 << 64) - 1)
    stop: list[str] | None = None
    repeat_penalty: float | None = Field(None, gt=0.0, le=10.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    mirostat: int | None = Field(None, ge=0, le=2)
    mirostat_tau: float | None = None
    mirostat_eta: float | None = None

    @model_validator(mode="after")
    def _check(self) -> Options:
        if self.num_predict == 0:
            raise ValueError("num_predict must be positive, -1 (no limit) or -2 (fill the "
                             "context)")
        if self.mirostat:
            raise ValueError("mirostat sampling is not supported; use mirostat 0")
        stops = self.stop or []
        if len(stops) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_LENGTH for s in stops):
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings of at most "
                             f"{MAX_STOP_LENGTH} characters are allowed")
        return self

    def sent(self) -> frozenset[str]:
        return sent_fields(self.model_fields_set, _RENAMES)

    def to_sampling_params(self, n_ctx: int) -> SamplingParams:
        """Ollama's defaults, except no repeat penalty unless asked for (as in Ollama's own
        engine), so that greedy answers match the other APIs'."""
        extra = set(self.model_extra or ())
        if extra - _LOAD_OPTIONS:
            log.info("ignoring unknown options: %s", ", ".join(sorted(extra - _LOAD_OPTIONS)))
        if self.typical_p not in (None, 1.0):
            log.info("typical_p is not supported; sampling without it")
        if self.num_ctx is not None and self.num_ctx > n_ctx:
            raise InvalidRequest(
                f"options.num_ctx={self.num_ctx} is more than this server's context of {n_ctx} "
                "tokens per conversation: send num_ctx of at most that, or none, or start the "
                "server with a larger --ctx-size.", param="options.num_ctx",
                code="context_length_exceeded")
        n_ctx = self.num_ctx or n_ctx  # a per-request limit within the server's context
        seed = self.seed
        return SamplingParams(
            max_tokens=self.num_predict if self.num_predict and self.num_predict > 0 else None,
            temperature=0.8 if self.temperature is None else self.temperature,
            top_k=40 if self.top_k is None else self.top_k,
            top_p=0.9 if self.top_p is None else self.top_p,
            min_p=self.min_p or 0.0,
            seed=None if seed is None or seed < 0 else seed & 0xFFFFFFFF,
            repeat_penalty=1.0 if self.repeat_penalty is None else self.repeat_penalty,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            stop=tuple(self.stop or ()),
            max_context=self.num_ctx,
            **{**self.repetition_params(), "penalty_last_n": _last_n(self.repeat_last_n, n_ctx)},
        )


def _last_n(value: int | None, n_ctx: int) -> int:
    if value is None:
        return 64
    return n_ctx if value == -1 else value


def parse_format(value: str | dict[str, Any] | None) -> ResponseFormat | None:
    if value is None or value == "":
        return None
    if value == "json":
        return ResponseFormat("json")
    if isinstance(value, str):
        raise ValueError(f"format must be 'json' or a JSON schema object, got {value!r}")
    if not value or len(json.dumps(value)) > MAX_SCHEMA_CHARS:
        raise ValueError(f"format must be a non-empty JSON schema of at most "
                         f"{MAX_SCHEMA_CHARS} characters")
    return ResponseFormat("json_schema", value)


class _GenerateFields(StrictBody):
    """Fields shared by /api/chat and /api/generate."""

    model: str = Field(min_length=1, max_length=512)
    stream: bool = True
    options: Options = Field(default_factory=Options)
    format: str | dict[str, Any] | None = None
    keep_alive: float | int | str | None = None
    think: bool | Literal["low", "medium", "high"] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @field_validator("format")
    @classmethod
    def _check_format(cls, value: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        parse_format(value)
        return value

    @field_validator("keep_alive")
    @classmethod
    def _check_keep_alive(cls, value: float | int | str | None) -> float | int | str | None:
        if value is not None:
            try:
                parse_keep_alive(value)
            except InvalidRequest as exc:
                raise ValueError(exc.message) from None
        return value

    def check_supported(self) -> None:
        if self.think not in (None, False):
            raise InvalidRequest(f"{self.model!r} does not support thinking", param="think",
                                 code="unsupported_feature")
        if self.logprobs or self.top_logprobs:
            raise InvalidRequest("logprobs are not supported on the Ollama API here; use "
                                 "/v1/chat/completions", param="logprobs",
                                 code="unsupported_feature")

    @property
    def response_format(self) -> ResponseFormat | None:
        return parse_format(self.format)

    def to_generate(self, prompt: Prompt, n_ctx: int, id_prefix: str) -> GenerationRequest:
        """The request for `prompt`; `n_ctx` (the model's per-sequence context) sizes
        `repeat_last_n: -1`."""
        return GenerationRequest(self.model, self.options.to_sampling_params(n_ctx), (prompt,),
                               self.options.sent(), self.response_format,
                               keep_alive=self.keep_alive, id_prefix=id_prefix)



def refuse_images(images: list[Any] | None, param: str) -> None:
    if images:
        raise InvalidRequest("This model is text-only: it cannot read images. Send text only.",
                             param=param, code="unsupported_content")


class OllamaMessage(StrictBody):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = Field("", max_length=1 << 24)
    images: list[Any] | None = None
    tool_calls: list[Any] | None = None
    thinking: str | None = None
    tool_name: str | None = None

    def to_message(self) -> Turn:
        refuse_images(self.images, "messages.images")
        if self.tool_calls:
            raise InvalidRequest("Tool calls are not supported yet.",
                                 param="messages.tool_calls", code="unsupported_feature")
        return Turn(self.role, self.content)


class ChatRequest(_GenerateFields):
    messages: list[OllamaMessage] = Field(default_factory=list, max_length=4096)
    tools: list[dict[str, Any]] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.tools:
            raise InvalidRequest("Tool calling is not supported yet; send no tools.",
                                 param="tools", code="unsupported_feature")


class GenerateRequest(_GenerateFields):
    prompt: str = Field("", max_length=1 << 24)
    suffix: str | None = Field(None, max_length=1 << 24)
    system: str | None = Field(None, max_length=1 << 24)
    template: str | None = Field(None, max_length=1 << 16)
    context: list[int] | None = Field(None, max_length=1 << 20)
    raw: bool = False
    images: list[Any] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        refuse_images(self.images, "images")
        if self.raw and (self.system or self.template):
            raise InvalidRequest("raw prompts take no system prompt or template; send one or "
                                 "the other", param="raw")
        if self.context and any(t < 0 for t in self.context):
            raise InvalidRequest("context holds token ids, which are never negative",
                                 param="context")
