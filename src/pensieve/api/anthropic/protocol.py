"""Anthropic Messages request models (pydantic, strict types), translated to a
`GenerationRequest`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from pensieve.api.base import StrictBody
from pensieve.api.generation import GenerationRequest, Prompt, ResponseFormat, Turn
from pensieve.api.sampling_fields import RepetitionFields, sent_fields
from pensieve.engine.types import SamplingParams
from pensieve.errors import InvalidRequest
from pensieve.sampling import BOUNDS

# Request fields that set a SamplingParams field of another name.
_RENAMES = {"stop_sequences": "stop"}
MAX_STOP_SEQUENCES = 16
MAX_STOP_LENGTH = 256
MAX_TEXT = 1 << 24


class TextBlock(StrictBody):
    type: Literal["text"]
    text: str = Field(max_length=MAX_TEXT)
    cache_control: dict[str, Any] | None = None  # Pensieve remembers every prompt anyway


class OtherBlock(StrictBody):
    """Blocks a text-only model without tools cannot take; refused with a clear message."""

    type: Literal["image", "document", "tool_use", "tool_result", "thinking",
                  "redacted_thinking", "server_tool_use", "web_search_tool_result",
                  "search_result", "container_upload"]


Block = Annotated[TextBlock | OtherBlock, Field(discriminator="type")]


def _blocks_text(content: str | Sequence[Block], param: str) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for block in content:
        if not isinstance(block, TextBlock):
            raise InvalidRequest(f"Content blocks of type {block.type!r} are not supported: "
                                 "this model reads text only and no tools are served. Send "
                                 "text blocks.", param=param, code="unsupported_content")
        parts.append(block.text)
    return "".join(parts)


class Message(StrictBody):
    role: Literal["user", "assistant"]
    content: str | list[Block] = Field(max_length=MAX_TEXT)


class _MessagesFields(StrictBody):
    """What /v1/messages and /v1/messages/count_tokens share: the prompt."""

    model: str = Field(min_length=1, max_length=512)
    messages: list[Message] = Field(min_length=1, max_length=4096)
    system: str | list[TextBlock] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _check_unsupported(self) -> _MessagesFields:
        if self.tools:
            raise ValueError("tool use is not supported yet; send no tools")
        if self.thinking and self.thinking.get("type") not in (None, "disabled"):
            raise ValueError("extended thinking is not supported by this model; leave it "
                             "disabled")
        if self.messages[0].role != "user":
            raise ValueError("the first message must use the 'user' role")
        return self

    def prompt(self) -> Prompt:
        """The conversation; a trailing assistant turn is the start of the answer."""
        system = _blocks_text(self.system, "system") if self.system is not None else ""
        turns = [Turn("system", system)] if system else []
        for i, m in enumerate(self.messages):
            turns.append(Turn(m.role, _blocks_text(m.content, f"messages.{i}.content")))
        merged = _merge_same_role(turns)
        if merged[-1].role == "assistant":
            return Prompt(messages=tuple(merged[:-1]), prefill=merged[-1].content.rstrip())
        return Prompt(messages=tuple(merged))

    def count_request(self) -> GenerationRequest:
        return GenerationRequest(self.model, SamplingParams(), (self.prompt(),))


def _merge_same_role(turns: list[Turn]) -> list[Turn]:
    """Consecutive turns of one role become one, as the Messages API specifies."""
    merged: list[Turn] = []
    for turn in turns:
        if merged and merged[-1].role == turn.role:
            merged[-1] = Turn(turn.role, merged[-1].content + "\n\n" + turn.content)
        else:
            merged.append(turn)
    return merged


class JsonOutputFormat(StrictBody):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema", min_length=1)


class OutputConfig(StrictBody):
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None  # no effect here
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
    def _check_stops(self) -> MessagesRequest:
        stops = self.stop_sequences or []
        if any(not s or len(s) > MAX_STOP_LENGTH for s in stops):
            raise ValueError(f"stop sequences must hold 1 to {MAX_STOP_LENGTH} characters")
        return self

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
                                 response_format, id_prefix="msg_")


class CountTokensRequest(_MessagesFields):
    pass
