"""OpenAI Responses API request models (pydantic, strict types), translated to a
`GenerationRequest` over the conversation's items (`responses_items`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, model_validator

from pensieve.api import generation as gen
from pensieve.api.base import StrictBody
from pensieve.api.openai import responses_items as items
from pensieve.api.sampling_fields import sent_fields
from pensieve.api.tools import ToolDef, ToolSpec, template_kwargs
from pensieve.api.tools import validate as validate_tools
from pensieve.engine.types import SamplingParams
from pensieve.errors import InvalidRequest
from pensieve.sampling import BOUNDS

MAX_METADATA = 16

# `include` values of OpenAI's that are accepted and have no effect here: Pensieve returns no
# encrypted reasoning, no logprobs, and runs none of the built-in tools these name.
KNOWN_INCLUDES = frozenset({
    "file_search_call.results", "web_search_call.results", "web_search_call.action.sources",
    "message.input_image.image_url", "computer_call_output.output.image_url",
    "code_interpreter_call.outputs", "reasoning.encrypted_content",
    "message.output_text.logprobs"})

# --- input items -----------------------------------------------------------------------------


class TextPart(StrictBody):
    type: Literal["input_text", "output_text"]
    text: str


class RefusalPart(StrictBody):
    type: Literal["refusal"]
    refusal: str


class MediaPart(StrictBody):
    type: Literal["input_image", "input_file", "input_audio"]


ContentPart = Annotated[TextPart | RefusalPart | MediaPart, Field(discriminator="type")]


def _text(content: str | list[ContentPart], param: str) -> str:
    if isinstance(content, str):
        return content
    for part in content:
        if isinstance(part, MediaPart):
            raise InvalidRequest(
                f"This model is text-only: content parts of type {part.type!r} are not "
                "supported. Send input_text parts only.", param=param,
                code="unsupported_content")
    return "".join(p.text if isinstance(p, TextPart) else p.refusal  # type: ignore[union-attr]
                   for p in content)


class MessageItem(StrictBody):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[ContentPart]
    id: str | None = None

    def to_item(self, param: str) -> items.Item:
        return items.message_item(self.role, _text(self.content, param), self.id)


class FunctionCallItem(StrictBody):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1, max_length=256)
    name: str = Field(min_length=1, max_length=256)
    arguments: str
    id: str | None = None

    def to_item(self, param: str) -> items.Item:
        return {"id": self.id or items.new_id("function_call"), "type": "function_call",
                "status": "completed", "call_id": self.call_id, "name": self.name,
                "arguments": self.arguments}


class FunctionCallOutputItem(StrictBody):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1, max_length=256)
    output: str | list[ContentPart]
    id: str | None = None

    def to_item(self, param: str) -> items.Item:
        return {"id": self.id or items.new_id("function_call_output"),
                "type": "function_call_output", "status": "completed",
                "call_id": self.call_id, "output": _text(self.output, f"{param}.output")}


class ReasoningText(StrictBody):
    type: Literal["reasoning_text", "summary_text"]
    text: str


class ReasoningItem(StrictBody):
    """Reasoning a client sends back (Codex does): kept in the conversation, not rendered."""

    type: Literal["reasoning"]
    id: str | None = None
    summary: list[ReasoningText] = Field(default_factory=list)
    content: list[ReasoningText] | None = None

    def to_item(self, param: str) -> items.Item:
        return {"id": self.id or items.new_id("reasoning"), "type": "reasoning",
                "summary": [p.model_dump() for p in self.summary],
                "content": [p.model_dump() for p in self.content or ()]}


class OtherItem(StrictBody):
    type: str

    def to_item(self, param: str) -> items.Item:
        raise InvalidRequest(
            f"Input items of type {self.type!r} are not supported: send message, "
            "function_call, function_call_output or reasoning items.", param=param,
            code="unsupported_item")


def _item_tag(value: Any) -> str:
    kind = value.get("type", "message") if isinstance(value, dict) else \
        getattr(value, "type", None)
    return kind if kind in ("message", "function_call", "function_call_output",
                            "reasoning") else "other"


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")] | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[ReasoningItem, Tag("reasoning")] | Annotated[OtherItem, Tag("other")],
    Discriminator(_item_tag)]

# --- tools, formats --------------------------------------------------------------------------


class FunctionTool(StrictBody):
    type: Literal["function"]
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    def echo(self) -> dict[str, Any]:
        return {"type": "function", "name": self.name, "description": self.description,
                "parameters": self.parameters, "strict": self.strict}


class OtherTool(StrictBody):
    type: str


def _tool_tag(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return "function" if kind == "function" else "other"


ToolItem = Annotated[Annotated[FunctionTool, Tag("function")] | Annotated[OtherTool, Tag("other")],
                     Discriminator(_tool_tag)]


class FunctionChoice(StrictBody):
    type: Literal["function"]
    name: str


class TextFormat(StrictBody):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    def to_format(self) -> gen.ResponseFormat | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return gen.ResponseFormat("json")
        if self.schema_ is None:
            raise InvalidRequest("text.format of type 'json_schema' needs a 'schema'.",
                                 param="text.format.schema")
        return gen.ResponseFormat("json_schema", self.schema_, bool(self.strict))

    def echo(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type}
        if self.type == "json_schema":
            out.update(name=self.name or "response", schema=self.schema_,
                       description=self.description, strict=self.strict)
        return out


class TextConfig(StrictBody):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ReasoningConfig(StrictBody):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None


# --- the request -----------------------------------------------------------------------------


class ResponsesRequest(StrictBody):
    model: str
    input: str | list[InputItem]
    instructions: str | None = None
    previous_response_id: str | None = None
    tools: list[ToolItem] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool = True
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    max_output_tokens: int | None = Field(None, ge=1, le=1 << 20)
    temperature: float | None = Field(None, **BOUNDS["temperature"].field_limits())
    top_p: float | None = Field(None, **BOUNDS["top_p"].field_limits())
    stream: bool = False
    store: bool = True
    metadata: dict[str, str] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    include: list[str] | None = None
    user: str | None = None
    # Refused when used (below), so that a client relying on them hears it.
    background: bool | None = None
    conversation: str | dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None
    top_logprobs: int | None = None
    # Extension, as on /v1/chat/completions: more variables for the chat template.
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _check(self) -> ResponsesRequest:
        if self.metadata is not None and (
                len(self.metadata) > MAX_METADATA
                or any(len(k) > 64 or len(v) > 512 for k, v in self.metadata.items())):
            raise ValueError(f"metadata takes at most {MAX_METADATA} pairs, keys of up to 64 "
                             "characters and values of up to 512")
        unknown = sorted(set(self.include or ()) - KNOWN_INCLUDES)
        if unknown:
            raise ValueError(f"unknown include value {unknown[0]!r}")
        return self

    def check_supported(self) -> None:
        """400 for what Pensieve does not do, naming it."""
        refused = {"background": bool(self.background),
                   "conversation": self.conversation is not None,
                   "prompt": self.prompt is not None,
                   "top_logprobs": bool(self.top_logprobs)}
        for name, used in refused.items():
            if used:
                raise InvalidRequest(f"{name!r} is not supported on /v1/responses.",
                                     param=name, code="unsupported_parameter")
        if isinstance(self.input, list) and not self.input and not self.previous_response_id:
            raise InvalidRequest("input is empty: send a message.", param="input")

    def input_items(self) -> list[items.Item]:
        """The new input as stored items (each with an id)."""
        if isinstance(self.input, str):
            return [items.message_item("user", self.input)]
        return [item.to_item(f"input[{i}]") for i, item in enumerate(self.input)]

    def tool_spec(self) -> ToolSpec | None:
        defs = []
        for i, tool in enumerate(self.tools or ()):
            if not isinstance(tool, FunctionTool):
                raise InvalidRequest(
                    f"Tools of type {tool.type!r} are not supported: Pensieve runs function "
                    "tools (type 'function') only.", param=f"tools[{i}]",
                    code="unsupported_tool")
            defs.append(ToolDef(tool.name, tool.description or "", tool.parameters))
        validate_tools(defs)
        choice = self.tool_choice
        if isinstance(choice, FunctionChoice) and choice.name not in {d.name for d in defs}:
            raise InvalidRequest(f"tool_choice names {choice.name!r}, which is not among the "
                                 "tools.", param="tool_choice")
        if choice in ("auto", "required") and not defs:
            raise InvalidRequest(f"tool_choice {choice!r} needs tools.", param="tool_choice")
        if not defs or choice == "none":
            return None
        name = choice.name if isinstance(choice, FunctionChoice) else choice
        return ToolSpec(tuple(defs), name or "auto", self.parallel_tool_calls)

    def to_generate(self, turns: tuple[gen.Turn, ...]) -> gen.GenerationRequest:
        """The generation over `turns` (the whole conversation, rendered by `to_turns`)."""
        params = SamplingParams(
            max_tokens=self.max_output_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p)
        sent = sent_fields(self.model_fields_set, {"max_output_tokens": "max_tokens"})
        fmt = self.text.format.to_format() if self.text and self.text.format else None
        kwargs = template_kwargs(self.chat_template_kwargs, "chat_template_kwargs")
        if self.reasoning is not None and self.reasoning.effort is not None:
            kwargs["reasoning_effort"] = self.reasoning.effort
        return gen.GenerationRequest(self.model, params, (gen.Prompt(messages=turns),), sent,
                                     fmt, self.tool_spec(), id_prefix="resp_",
                                     template_kwargs=kwargs)

    def echo(self) -> dict[str, Any]:
        """The request's settings as the Response object repeats them."""
        choice = self.tool_choice
        fmt = self.text.format if self.text and self.text.format else None
        return {
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "metadata": self.metadata or {},
            "parallel_tool_calls": self.parallel_tool_calls,
            "previous_response_id": self.previous_response_id,
            "reasoning": {"effort": self.reasoning.effort if self.reasoning else None,
                          "summary": self.reasoning.summary if self.reasoning else None},
            "store": self.store,
            "temperature": self.temperature,
            "text": {"format": fmt.echo() if fmt else {"type": "text"}},
            "tool_choice": choice.model_dump() if isinstance(choice, FunctionChoice)
            else (choice or "auto"),
            "tools": [t.echo() for t in self.tools or () if isinstance(t, FunctionTool)],
            "top_p": self.top_p,
            "truncation": self.truncation or "disabled",
            "user": self.user,
        }
