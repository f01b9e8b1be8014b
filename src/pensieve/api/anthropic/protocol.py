"""Anthropic Messages request models (pydantic, strict types), translated to a
`GenerationRequest`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from pensieve.api.anthropic.content import (
    MAX_TEXT,
    Block,
    TextBlock,
    assistant_turn,
    blocks_text,
    merge_same_role,
    user_turns,
)
from pensieve.api.base import StrictBody
from pensieve.api.generation import GenerationRequest, Prompt, ResponseFormat, Turn
from pensieve.api.sampling_fields import RepetitionFields, sent_fields
from pensieve.api.tools import ToolDef, ToolSpec
from pensieve.api.tools import validate as validate_tools
from pensieve.engine.types import SamplingParams
from pensieve.errors import InvalidRequest
from pensieve.sampling import BOUNDS

# Request fields that set a SamplingParams field of another name.
_RENAMES = {"stop_sequences": "stop"}
MAX_STOP_SEQUENCES = 16
MAX_STOP_LENGTH = 256
MIN_THINKING_BUDGET = 1024  # Anthropic's floor for budget_tokens
# Anthropic's effort levels, as the reasoning_effort a chat template knows.
_EFFORTS = {"low": "low", "medium": "medium", "high": "high", "xhigh": "high", "max": "high"}


class Message(StrictBody):
    role: Literal["user", "assistant"]
    content: str | list[Block] = Field(max_length=MAX_TEXT)


class ToolParam(StrictBody):
    """A client tool: the model calls it, the client runs it. Server tools (web search, code
    execution, ...) would run on Anthropic's side: refused."""

    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None
    cache_control: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _refuse_server_tools(cls, data: Any) -> Any:
        kind = data.get("type") if isinstance(data, dict) else None
        if kind not in (None, "custom"):
            raise ValueError(f"tools of type {kind!r} run on Anthropic's servers and are not "
                             "available here; send client tools (name, description, "
                             "input_schema)")
        return data


class ToolChoice(StrictBody):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False


class Thinking(StrictBody):
    """Extended thinking: `enabled` (with a budget), `adaptive` (the model decides) or
    `disabled`; passed to the chat template as `enable_thinking`."""

    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(None, ge=MIN_THINKING_BUDGET, le=1 << 20)

    @model_validator(mode="after")
    def _check_budget(self) -> Thinking:
        if self.type == "enabled" and self.budget_tokens is None:
            raise ValueError("thinking of type 'enabled' needs budget_tokens (at least "
                             f"{MIN_THINKING_BUDGET})")
        return self


class _MessagesFields(StrictBody):
    """What /v1/messages and /v1/messages/count_tokens share: the prompt."""

    model: str = Field(min_length=1, max_length=512)
    messages: list[Message] = Field(min_length=1, max_length=4096)
    system: str | list[TextBlock] | None = None
    tools: list[ToolParam] | None = Field(None, max_length=512)
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None

    @model_validator(mode="after")
    def _check_conversation(self) -> _MessagesFields:
        if self.messages[0].role != "user":
            raise ValueError("the first message must use the 'user' role")
        choice = self.tool_choice
        if choice is not None and choice.type in ("any", "tool") and not self.tools:
            raise ValueError(f"tool_choice {choice.type!r} needs tools")
        names = [t.name for t in self.tools or ()]
        if choice is not None and choice.type == "tool" and choice.name not in names:
            raise ValueError(f"tool_choice names {choice.name!r}, which is not among the tools")
        return self

    def prompt(self) -> Prompt:
        """The conversation; a trailing assistant turn (text only) starts the answer."""
        system = blocks_text(self.system, "system") if self.system is not None else ""
        turns = [Turn("system", system)] if system else []
        for i, m in enumerate(self.messages):
            param = f"messages.{i}.content"
            if m.role == "user":
                turns.extend(user_turns(m.content, param))
            else:
                turns.append(assistant_turn(m.content, param))
        merged = merge_same_role(turns)
        last = merged[-1]
        if last.role == "assistant" and last.tool_calls:
            raise InvalidRequest("The last assistant message calls tools: send their results "
                                 "as tool_result blocks in a user message after it.",
                                 param=f"messages.{len(self.messages) - 1}.content")
        if last.role == "assistant" and self.thinking and self.thinking.type != "disabled":
            raise InvalidRequest("A trailing assistant message (a prefilled answer) cannot be "
                                 "combined with thinking; disable thinking or end with a user "
                                 "message.", param="thinking")
        if last.role == "assistant":
            return Prompt(messages=tuple(merged[:-1]), prefill=last.content.rstrip())
        return Prompt(messages=tuple(merged))

    def tool_spec(self) -> ToolSpec | None:
        """The offered tools (validated even when tool_choice hides them)."""
        defs = tuple(ToolDef(t.name, t.description or "", t.input_schema)
                     for t in self.tools or ())
        validate_tools(defs, "tools")
        choice = self.tool_choice or ToolChoice(type="auto")
        if not defs or choice.type == "none":
            return None
        name = {"auto": "auto", "any": "required"}.get(choice.type, choice.name or "")
        return ToolSpec(defs, name, not choice.disable_parallel_tool_use)

    def template_kwargs(self) -> dict[str, Any]:
        if self.thinking is None:
            return {}
        return {"enable_thinking": self.thinking.type != "disabled"}

    def count_request(self) -> GenerationRequest:
        return GenerationRequest(self.model, SamplingParams(), (self.prompt(),),
                                 tools=self.tool_spec(), template_kwargs=self.template_kwargs())


class JsonOutputFormat(StrictBody):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema", min_length=1)


class OutputConfig(StrictBody):
    # Given to the chat template as reasoning_effort (xhigh and max as "high").
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None
    format: JsonOutputFormat | None = None


class Metadata(StrictBody):
    user_id: str | None = Field(None, max_length=512)


class MessagesRequest(_MessagesFields, RepetitionFields):
    """Anthropic's Messages request; beyond its spec, llama-server's sampling extensions
    (min_p, repeat and presence/frequency penalties, repeat_last_n, dry_*)."""

    max_tokens: int = Field(ge=1, le=1 << 20)
    stop_sequences: list[str] | None = Field(None, max_length=MAX_STOP_SEQUENCES)
    temperature: float | None = Field(None, ge=0.0, le=1.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, le=1 << 20)
    min_p: float | None = Field(None, **BOUNDS["min_p"].field_limits())
    repeat_penalty: float | None = Field(None, **BOUNDS["repeat_penalty"].field_limits())
    presence_penalty: float | None = Field(None, **BOUNDS["presence_penalty"].field_limits())
    frequency_penalty: float | None = Field(None, **BOUNDS["frequency_penalty"].field_limits())
    stream: bool = False
    metadata: Metadata | None = None
    service_tier: str | None = None
    output_config: OutputConfig | None = None

    @model_validator(mode="after")
    def _check_stops_and_budget(self) -> MessagesRequest:
        stops = self.stop_sequences or []
        if any(not s or len(s) > MAX_STOP_LENGTH for s in stops):
            raise ValueError(f"stop sequences must hold 1 to {MAX_STOP_LENGTH} characters")
        budget = self.thinking.budget_tokens if self.thinking else None
        if budget is not None and budget >= self.max_tokens:
            raise ValueError(f"thinking.budget_tokens ({budget}) must be less than max_tokens "
                             f"({self.max_tokens}), which counts thinking and answer together")
        return self

    def template_kwargs(self) -> dict[str, Any]:
        kwargs = super().template_kwargs()
        effort = self.output_config.effort if self.output_config else None
        if effort is not None:
            kwargs["reasoning_effort"] = _EFFORTS[effort]
        return kwargs

    def to_generate(self) -> GenerationRequest:
        params = SamplingParams(
            max_tokens=self.max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            min_p=self.min_p or 0.0,
            repeat_penalty=1.0 if self.repeat_penalty is None else self.repeat_penalty,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            stop=tuple(self.stop_sequences or ()),
            **self.repetition_params(),
        )
        fmt = self.output_config.format if self.output_config else None
        response_format = ResponseFormat("json_schema", fmt.schema_) if fmt else None
        sent = sent_fields(self.model_fields_set, _RENAMES)  # max_tokens: always sent
        return GenerationRequest(self.model, params, (self.prompt(),), sent,
                                 response_format, self.tool_spec(), id_prefix="msg_",
                                 template_kwargs=self.template_kwargs(),
                                 session_id=self.metadata.user_id if self.metadata else None)


class CountTokensRequest(_MessagesFields):
    pass
