"""Ollama request models (pydantic, strict types), translated to a `GenerationRequest`."""

from __future__ import annotations

import json
import logging
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pensieve.api.base import StrictBody
from pensieve.api.generation import GenerationRequest, Prompt, ResponseFormat, Turn
from pensieve.api.ollama.capabilities import can_think
from pensieve.api.sampling_fields import RepetitionFields, sent_fields
from pensieve.api.tools import ToolCall, ToolDef, ToolSpec
from pensieve.api.tools import validate as validate_tools
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
        if self.logprobs or self.top_logprobs:
            raise InvalidRequest("logprobs are not supported on the Ollama API here; use "
                                 "/v1/chat/completions", param="logprobs",
                                 code="unsupported_feature")

    @property
    def response_format(self) -> ResponseFormat | None:
        return parse_format(self.format)

    def check_thinking(self, template: str | None) -> None:
        """`think` asks for reasoning: a 400 for a model whose template knows none (as Ollama
        answers)."""
        if self.think not in (None, False) and not can_think(template):
            raise InvalidRequest(f"{self.model!r} does not support thinking", param="think",
                                 code="unsupported_feature")

    def template_kwargs(self) -> dict[str, Any]:
        """`think` for the chat template: `enable_thinking`, and a level as
        `reasoning_effort`."""
        if self.think is None:
            return {}
        if isinstance(self.think, str):
            return {"enable_thinking": True, "reasoning_effort": self.think}
        return {"enable_thinking": self.think}

    def tool_spec(self) -> ToolSpec | None:
        return None

    def to_generate(self, prompt: Prompt, n_ctx: int, id_prefix: str) -> GenerationRequest:
        """The request for `prompt`; `n_ctx` (the model's per-sequence context) sizes
        `repeat_last_n: -1`."""
        return GenerationRequest(self.model, self.options.to_sampling_params(n_ctx), (prompt,),
                                 self.options.sent(), self.response_format, self.tool_spec(),
                                 keep_alive=self.keep_alive, id_prefix=id_prefix,
                                 template_kwargs=self.template_kwargs())



def refuse_images(images: list[Any] | None, param: str) -> None:
    if images:
        raise InvalidRequest("This model is text-only: it cannot read images. Send text only.",
                             param=param, code="unsupported_content")


class OllamaFunction(StrictBody):
    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class OllamaTool(StrictBody):
    type: Literal["function"] = "function"
    function: OllamaFunction


class CalledFunction(StrictBody):
    name: str = Field(min_length=1, max_length=128)
    arguments: dict[str, Any] | str = Field(default_factory=dict)  # Ollama's: an object
    index: int | None = None


class OllamaToolCall(StrictBody):
    id: str | None = Field(None, max_length=256)
    type: Literal["function"] | None = None
    function: CalledFunction

    def to_call(self, default_id: str) -> ToolCall:
        args = self.function.arguments
        text = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
        return ToolCall(self.id or default_id, self.function.name, text)


class OllamaMessage(StrictBody):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = Field("", max_length=1 << 24)
    images: list[Any] | None = None
    tool_calls: list[OllamaToolCall] | None = Field(None, max_length=256)
    thinking: str | None = None  # past reasoning: dropped from the prompt
    tool_name: str | None = None
    tool_call_id: str | None = Field(None, max_length=256)


def chat_turns(messages: list[OllamaMessage]) -> tuple[Turn, ...]:
    """The conversation. Ollama's calls often carry no ids: such a call gets `call_<m>_<k>`,
    and a result without `tool_call_id` answers the first unanswered call of the last
    assistant turn that has its `tool_name` (or the first unanswered one)."""
    turns: list[Turn] = []
    waiting: list[ToolCall] = []  # calls of the last assistant turn not yet answered
    for i, m in enumerate(messages):
        refuse_images(m.images, f"messages.{i}.images")
        if m.tool_calls and m.role != "assistant":
            raise InvalidRequest("Only assistant messages can hold tool_calls.",
                                 param=f"messages.{i}.tool_calls")
        if m.tool_calls:
            calls = tuple(c.to_call(f"call_{i}_{k}") for k, c in enumerate(m.tool_calls))
            waiting = list(calls)
            turns.append(Turn("assistant", m.content, calls))
        elif m.role == "tool":
            call_id = m.tool_call_id or _answered(waiting, m.tool_name)
            turns.append(Turn("tool", m.content, tool_call_id=call_id))
        else:
            turns.append(Turn(m.role, m.content))
    return tuple(turns)


def _answered(waiting: list[ToolCall], name: str | None) -> str | None:
    for k, call in enumerate(waiting):
        if name is None or call.name == name:
            return waiting.pop(k).id
    return None


class ChatRequest(_GenerateFields):
    messages: list[OllamaMessage] = Field(default_factory=list, max_length=4096)
    tools: list[OllamaTool] | None = Field(None, max_length=512)

    def tool_spec(self) -> ToolSpec | None:
        """The offered tools; Ollama has no tool_choice: the model may call them or answer."""
        defs = tuple(ToolDef(t.function.name, t.function.description or "",
                             t.function.parameters) for t in self.tools or ())
        validate_tools(defs, "tools")
        return ToolSpec(defs) if defs else None


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
