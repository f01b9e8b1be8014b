"""OpenAI request models (pydantic, strict types), translated to a `GenerationRequest`."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from pensieve.api import generation as gen
from pensieve.api.base import StrictBody
from pensieve.api.sampling_fields import RepetitionFields, sent_fields
from pensieve.api.tools import ToolCall as CallRecord
from pensieve.api.tools import ToolDef, ToolSpec, template_kwargs
from pensieve.api.tools import validate as validate_tools
from pensieve.engine.types import SamplingParams
from pensieve.errors import InvalidRequest
from pensieve.sampling import BOUNDS
from pensieve.structured import check_gbnf

MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
MAX_LOGIT_BIAS = 1024


# Request fields that set a SamplingParams field of another name.
_RENAMES = {"max_completion_tokens": "max_tokens"}


class TextPart(StrictBody):
    type: Literal["text"]
    text: str


class ImagePart(StrictBody):
    type: Literal["image_url", "input_audio", "file"]


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class FunctionCall(StrictBody):
    name: str
    arguments: str


class ToolCall(StrictBody):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(StrictBody):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if not isinstance(part, TextPart):
                raise InvalidRequest(
                    f"This model is text-only: content parts of type {part.type!r} are not "
                    "supported. Send text parts only.",
                    param="messages", code="unsupported_content")
            parts.append(part.text)
        return "".join(parts)

    def to_message(self) -> gen.Turn:
        calls = tuple(CallRecord(c.id, c.function.name, c.function.arguments)
                      for c in self.tool_calls or ())
        return gen.Turn(self.role, self.text(), calls, self.tool_call_id)


class StreamOptions(StrictBody):
    include_usage: bool = False


class JsonSchemaFormat(StrictBody):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(StrictBody):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # llama-server's json_object

    def to_format(self) -> gen.ResponseFormat | None:
        """The format to enforce (None: free text)."""
        if self.type == "text":
            return None
        spec = self.json_schema
        schema = spec.schema_ if spec is not None else self.schema_
        if self.type == "json_schema" and spec is None:
            raise InvalidRequest("response_format of type 'json_schema' needs a 'json_schema' "
                                 "object with a 'schema'.", param="response_format")
        if schema is None:
            return gen.ResponseFormat("json")
        return gen.ResponseFormat("json_schema", schema, bool(spec and spec.strict))


class _SamplingFields(StrictBody, RepetitionFields):
    """Sampling fields shared by chat and legacy completions (with llama-server's extensions:
    min_p, top_k, repeat_penalty, repeat_last_n, dry_*)."""

    model: str
    max_tokens: int | None = Field(None, ge=1, le=1 << 20)
    temperature: float | None = Field(None, **BOUNDS["temperature"].field_limits())
    top_p: float | None = Field(None, **BOUNDS["top_p"].field_limits())
    top_k: int | None = Field(None, **BOUNDS["top_k"].field_limits())
    min_p: float | None = Field(None, **BOUNDS["min_p"].field_limits())
    seed: int | None = Field(None, **BOUNDS["seed"].field_limits())
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(None, **BOUNDS["presence_penalty"].field_limits())
    frequency_penalty: float | None = Field(None, **BOUNDS["frequency_penalty"].field_limits())
    repeat_penalty: float | None = Field(None, **BOUNDS["repeat_penalty"].field_limits())
    logit_bias: dict[str, float] | None = None
    n: int = Field(1, ge=1, le=64)
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    cache_prompt: bool = True  # llama-server's name: reuse KV of earlier requests' prefixes
    response_format: ResponseFormat | None = None
    grammar: str | None = None  # raw GBNF, as llama-server takes it
    keep_alive: int | float | str | None = None  # Ollama's: how long the model stays loaded

    @model_validator(mode="after")
    def _check_stop_and_bias(self) -> _SamplingFields:
        stops = self.stop_list()
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed")
        if any(len(s) > MAX_STOP_LENGTH for s in stops):
            raise ValueError(f"stop strings may be at most {MAX_STOP_LENGTH} characters long")
        if self.logit_bias and len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias may have at most {MAX_LOGIT_BIAS} entries")
        for key, value in (self.logit_bias or {}).items():
            if not key.lstrip("-").isdigit():
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
            if not -100.0 <= value <= 100.0:
                raise ValueError("logit_bias values must be between -100 and 100")
        return self

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def generate_request(self, prompts: tuple[gen.Prompt, ...], params: SamplingParams,
                         id_prefix: str, spec: ToolSpec | None = None
                         ) -> gen.GenerationRequest:
        if self.grammar is not None:
            check_gbnf(self.grammar)
        fmt = self.response_format.to_format() if self.response_format else None
        sent = sent_fields(self.model_fields_set, _RENAMES)
        return gen.GenerationRequest(self.model, params, prompts, sent, fmt, spec,
                                   self.keep_alive, self.cache_prompt, id_prefix,
                                   session_id=self.user)

    def sampling_params(self, *, max_tokens: int | None, logprobs: bool,
                        top_logprobs: int) -> SamplingParams:
        bias = tuple((int(k), _clamp_bias(v)) for k, v in (self.logit_bias or {}).items())
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            min_p=self.min_p or 0.0,
            seed=None if self.seed is None else self.seed & 0xFFFFFFFF,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repeat_penalty=1.0 if self.repeat_penalty is None else self.repeat_penalty,
            logit_bias=bias,
            stop=tuple(self.stop_list()),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            n=self.n,
            grammar=self.grammar,
            **self.repetition_params(),
        )


def _clamp_bias(value: float) -> float:
    # OpenAI: -100 bans a token and 100 forces it; llama.cpp adds the bias to the logit.
    if value <= -100.0:
        return float("-inf")
    return value


class FunctionDef(StrictBody):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(StrictBody):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(StrictBody):
    name: str


class NamedToolChoice(StrictBody):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=1 << 20)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    # llama-server's: "none" keeps <think>...</think> in the content; the others split it into
    # reasoning_content.
    reasoning_format: Literal["none", "auto", "deepseek", "deepseek-legacy"] | None = None
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _check_unsupported(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        if isinstance(self.tool_choice, NamedToolChoice):
            names = [t.function.name for t in self.tools or []]
            if self.tool_choice.function.name not in names:
                raise ValueError(f"tool_choice names {self.tool_choice.function.name!r}, which "
                                 "is not among the tools")
        elif self.tool_choice in ("auto", "required") and not self.tools:
            raise ValueError(f"tool_choice {self.tool_choice!r} needs tools")
        return self

    def tool_spec(self) -> ToolSpec | None:
        defs = tuple(ToolDef(t.function.name, t.function.description or "",
                             t.function.parameters) for t in self.tools or ())
        validate_tools(defs)
        if not defs or self.tool_choice == "none":
            return None
        choice = self.tool_choice
        name = choice.function.name if isinstance(choice, NamedToolChoice) else choice
        return ToolSpec(defs, name or "auto", self.parallel_tool_calls)

    def to_generate(self) -> gen.GenerationRequest:
        params = self.sampling_params(max_tokens=self.max_completion_tokens or self.max_tokens,
                                      logprobs=self.logprobs,
                                      top_logprobs=self.top_logprobs or 0)
        prompt = gen.Prompt(messages=tuple(m.to_message() for m in self.messages))
        request = self.generate_request((prompt,), params, "chatcmpl-", self.tool_spec())
        kwargs = template_kwargs(self.chat_template_kwargs, "chat_template_kwargs")
        if self.reasoning_effort is not None:
            kwargs["reasoning_effort"] = self.reasoning_effort
        return dataclasses.replace(request, template_kwargs=kwargs,
                                   split_reasoning=self.reasoning_format != "none")


PromptInput = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_SamplingFields):
    prompt: PromptInput
    max_tokens: int | None = Field(16, ge=1, le=1 << 20)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=64)

    @model_validator(mode="after")
    def _check_unsupported(self) -> CompletionRequest:
        if self.suffix:
            raise ValueError("suffix (fill-in-the-middle) is not supported yet")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of different from n is not supported")
        prompts = self.prompts()
        if not prompts or len(prompts) > 64:
            raise ValueError("prompt must hold between 1 and 64 prompts")
        if self.echo and any(not isinstance(p, str) for p in prompts):
            raise ValueError("echo is supported for text prompts only")
        return self

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        tokens = [x for x in p if isinstance(x, int)]
        if p and len(tokens) == len(p):  # one prompt of token ids (pydantic: never mixed)
            return [tokens]
        return [x for x in p if not isinstance(x, int)]

    def to_generate(self) -> gen.GenerationRequest:
        params = self.sampling_params(max_tokens=self.max_tokens,
                                      logprobs=self.logprobs is not None,
                                      top_logprobs=self.logprobs or 0)
        prompts = tuple(gen.Prompt(text=p) if isinstance(p, str) else gen.Prompt(tokens=tuple(p))
                        for p in self.prompts())
        return self.generate_request(prompts, params, "cmpl-")
