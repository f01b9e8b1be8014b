"""The one path from every API family to the engine.

Each family translates its protocol into a `GenerationRequest` and renders the events of the
resulting `Generation` in its own wire format (SSE chunks, NDJSON lines, Anthropic events):

    family protocol --to_generate()--> GenerationRequest --start()--> Generation
                                                          .events()   TextDelta* ToolCall* Finish
                                                          .collect()  one Choice per choice
                                                          .usage, .timings (filled as it runs)

`start` does the same for every family, in this order: find the model and apply keep_alive,
fill what the request left unset from the store model's defaults, build the output grammar
(response format, tools), render the chat template, submit, and wait until the worker has
accepted the prompt, so that a bad request is an HTTP error and never a half-sent stream.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pensieve.api import reply, routing_hints, tool_formats, tools
from pensieve.api.model_defaults import fill_defaults, with_system_prompt
from pensieve.engine.backend import EngineBackend
from pensieve.engine.types import (
    EngineRequest,
    FinishReason,
    ModelInfo,
    RequestAccepted,
    SamplingParams,
    SeqOutput,
    TokenLogprob,
)
from pensieve.errors import InvalidRequest
from pensieve.runtime import ModelRuntime, ServedModel
from pensieve.store.store import ModelDefaults
from pensieve.structured import JSON_OBJECT_GRAMMAR, grammar_for_json_schema
from pensieve.templates import ChatTemplate

# --- the request ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Turn:
    """One chat turn, family-neutral. `tool_calls` on assistant turns, `tool_call_id` on the
    results of calls (role "tool")."""

    role: str
    content: str
    tool_calls: tuple[tools.ToolCall, ...] = ()
    tool_call_id: str | None = None


@dataclass(frozen=True, slots=True)
class Prompt:
    """What the model continues: exactly one of chat `messages` (rendered with the model's
    template), a `text` sent as is, or `tokens`. `prefill` starts the answer (Anthropic's
    trailing assistant turn); `context` holds token ids that come before `text` (Ollama)."""

    messages: tuple[Turn, ...] | None = None
    text: str | None = None
    tokens: tuple[int, ...] | None = None
    prefill: str = ""

    def __post_init__(self) -> None:
        sources = (self.messages, self.text, self.tokens)
        assert sum(s is not None for s in sources) == 1, "exactly one prompt source"


@dataclass(frozen=True, slots=True)
class ResponseFormat:
    """A requested output format, enforced by a grammar in the engine's sampler."""

    kind: Literal["json", "json_schema"]
    schema: dict[str, Any] | None = None
    strict: bool = True

    def grammar(self) -> str:
        if self.kind == "json" or self.schema is None:
            return JSON_OBJECT_GRAMMAR
        return grammar_for_json_schema(self.schema, self.strict)  # 400 when not enforceable


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One family-neutral generation request.

    `params` holds the family's own defaults for what the client left out; `sent` names the
    `SamplingParams` fields the client did set, so a store model's defaults fill the others.
    Several `prompts` (OpenAI's legacy completions) give `params.n` choices each, numbered
    prompt by prompt.
    """

    model: str
    params: SamplingParams
    prompts: tuple[Prompt, ...]
    sent: frozenset[str] = frozenset()
    response_format: ResponseFormat | None = None
    tools: tools.ToolSpec | None = None
    keep_alive: object | None = None
    use_cache: bool = True
    id_prefix: str = "gen-"
    # Variables for the chat template beyond the messages (`enable_thinking`,
    # `reasoning_effort`, a request's `chat_template_kwargs`).
    template_kwargs: Mapping[str, Any] = field(default_factory=dict)
    # Split reasoning (`<think>...</think>`) from the answer; False keeps it in the text.
    split_reasoning: bool = True
    # The conversation this continues (a family's own field: OpenAI's `user`, a Responses
    # chain); an `X-Session-Id` header wins over it. A cluster routes by it (routing_hints).
    session_id: str | None = None
    # With no session named, the request's own id names one (a Responses chain's first turn,
    # so its follow-ups go where its KV is).
    starts_session: bool = False


# --- the events --------------------------------------------------------------------------------


class Finish(enum.StrEnum):
    """Why a choice ended, in family-neutral terms; each family maps these in one table."""

    END = "end"  # the model's end-of-generation token
    STOP_STRING = "stop_string"  # one of the request's stop strings
    LENGTH = "length"  # max_tokens or the context limit
    TOOL_CALLS = "tool_calls"  # the answer is tool calls
    ABORT = "abort"
    ERROR = "error"


@dataclass(slots=True)
class TextDelta:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None


@dataclass(slots=True)
class ReasoningDelta:
    index: int
    text: str


@dataclass(frozen=True, slots=True)
class ToolCallStart:
    """A call's id and name, as soon as the model has written the name."""

    index: int  # the choice
    position: int  # the call's place among this choice's calls
    id: str
    name: str


@dataclass(frozen=True, slots=True)
class ToolArgsDelta:
    """More of a started call's arguments (raw JSON text, as generated)."""

    index: int
    position: int
    text: str


@dataclass(frozen=True, slots=True)
class ToolCallEvent:
    """A call, complete (after its start and argument deltas)."""

    index: int  # the choice
    position: int  # the call's place among this choice's calls
    call: tools.ToolCall


@dataclass(frozen=True, slots=True)
class Finished:
    index: int
    reason: Finish
    stop_string: str | None = None


Event = TextDelta | ReasoningDelta | ToolCallStart | ToolArgsDelta | ToolCallEvent | Finished


@dataclass(slots=True)
class Usage:
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens whose KV came from Pensieve's memory
    num_output_tokens: int = 0
    num_reasoning_tokens: int = 0  # output tokens generated inside a reasoning block

    @property
    def num_uncached_tokens(self) -> int:
        return self.num_prompt_tokens - self.num_cached_tokens

    @property
    def num_total_tokens(self) -> int:
        return self.num_prompt_tokens + self.num_output_tokens


@dataclass(slots=True)
class Timings:
    """Wall-clock measurements of one request, in nanoseconds from `perf_counter_ns`."""

    started_ns: int = field(default_factory=time.perf_counter_ns)
    loaded_ns: int = 0  # the model was ready (loading it, when needed, took loaded - started)
    accepted_ns: int = 0  # the worker tokenized and queued the prompt
    first_token_ns: int = 0  # the prompt was evaluated and the first token sampled
    finished_ns: int = 0

    @property
    def load_ns(self) -> int:
        return max(0, self.loaded_ns - self.started_ns)

    @property
    def prompt_eval_ns(self) -> int:
        return max(0, (self.first_token_ns or self.finished_ns) - self.loaded_ns)

    @property
    def eval_ns(self) -> int:
        return max(0, self.finished_ns - self.first_token_ns) if self.first_token_ns else 0

    @property
    def total_ns(self) -> int:
        return max(0, (self.finished_ns or time.perf_counter_ns()) - self.started_ns)


@dataclass(slots=True)
class Choice:
    """One choice, collected whole."""

    text: str = ""
    reasoning: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    tool_calls: list[tools.ToolCall] = field(default_factory=list)
    finish: Finish | None = None
    stop_string: str | None = None


# --- the path ----------------------------------------------------------------------------------


async def open_model(runtime: ModelRuntime, name: str,
                     keep_alive: object | None = None) -> tuple[ServedModel, ModelInfo]:
    """The named model, loaded, with the request's keep_alive applied (every route that names
    a model comes through here)."""
    served = runtime.get(name)
    runtime.apply_keep_alive(served, keep_alive)
    return served, await served.client.ensure_started()


async def start(runtime: ModelRuntime, request: GenerationRequest) -> Generation:
    """Load the model if needed, build the prompts and submit them; raises on a rejected one."""
    timings = Timings()
    served, info = await open_model(runtime, request.model, request.keep_alive)
    timings.loaded_ns = time.perf_counter_ns()
    template = chat_template(info, served.defaults)
    fmt = tool_formats.detect(template.source) if request.tools else None
    params = _final_params(request, served.defaults, fmt)
    rid = f"{request.id_prefix}{uuid.uuid4().hex}"
    session = routing_hints.header_session() or request.session_id \
        or (rid if request.starts_session else None)
    think = reply.think_markers(template.source) if request.split_reasoning else None
    engine_reqs, opened = [], []
    for i, prompt in enumerate(request.prompts):
        text = None if prompt.tokens is not None else \
            render_prompt(info, prompt, request.tools, served.defaults, request.template_kwargs)
        engine_reqs.append(_engine_request(f"{rid}-{i}" if i else rid, prompt, text, params,
                                           request, session))
        opened.append(bool(think and text and prompt.messages is not None
                           and reply.opens_reasoning(text, think)))
    streams = await _submit_all(served.client, engine_reqs)
    timings.accepted_ns = time.perf_counter_ns()
    routing_hints.note_replica(streams[0].replica)
    parsers = _Parsers(fmt, think if any(p.messages is not None for p in request.prompts)
                       else None, opened, request.params.n)
    generation = Generation(rid, served, request, streams, timings, parsers)
    generation.session_id = session
    return generation


async def count_prompt_tokens(runtime: ModelRuntime, request: GenerationRequest) -> int:
    """How many tokens the request's first prompt takes, tokenized exactly as `start` would."""
    served, info = await open_model(runtime, request.model, request.keep_alive)
    prompt = request.prompts[0]
    if prompt.tokens is not None:
        return len(prompt.tokens)
    text = render_prompt(info, prompt, request.tools, served.defaults, request.template_kwargs)
    return len(await served.client.tokenize(text, add_special=True))


def _final_params(request: GenerationRequest, defaults: ModelDefaults,
                  fmt: tool_formats.ToolFormat | None) -> SamplingParams:
    params = fill_defaults(request.params, request.sent, defaults)
    grammar, triggers = _output_grammar(request, params.grammar, fmt)
    if grammar == params.grammar and not triggers:
        return params
    return dataclasses.replace(params, grammar=grammar, grammar_triggers=triggers)


def _output_grammar(request: GenerationRequest, raw: str | None,
                    fmt: tool_formats.ToolFormat | None) -> tuple[str | None, tuple[str, ...]]:
    """At most one of: a raw grammar, a response format, offered tools; with the patterns
    that start a lazy grammar (tools under `auto` in a native format: the text is free, a call
    is kept valid once it opens)."""
    fmt_ = request.response_format
    spec = request.tools
    if spec is not None and fmt is not None:
        if raw is not None or fmt_ is not None:
            raise InvalidRequest("grammar and JSON response_format cannot be combined with "
                                 "tools: send one or the other.", param="tools")
        lazy = spec.may_answer and fmt.native
        return fmt.grammar(spec), fmt.triggers() if lazy else ()
    if raw is not None and fmt_ is not None:
        raise InvalidRequest("Send either grammar or a JSON response_format, not both.",
                             param="grammar")
    return (fmt_.grammar() if fmt_ is not None else raw), ()


def chat_template(info: ModelInfo, defaults: ModelDefaults | None = None) -> ChatTemplate:
    """The model's chat template, or the store model's override of it."""
    source = (defaults.template if defaults else None) or info.chat_template
    return ChatTemplate.for_model(source, info.bos_token, info.eos_token)


def render_prompt(info: ModelInfo, prompt: Prompt, spec: tools.ToolSpec | None = None,
                  defaults: ModelDefaults | None = None,
                  template_kwargs: Mapping[str, Any] | None = None) -> str:
    """The prompt text: chat messages through the model's template (with a store model's
    system prompt and template override, and offered tools), or the text as given.

    A template with its own tool syntax gets the tools, past calls and their results in the
    shape Hugging Face templates expect; any other gets Pensieve's generic convention."""
    if prompt.messages is None:
        return (prompt.text or "") + prompt.prefill
    template = chat_template(info, defaults)
    fmt = tool_formats.detect(template.source)
    extra = dict(template_kwargs or {})
    if fmt.native:
        messages = _native_messages(prompt.messages)
        if spec is not None:
            extra["tools"] = tool_formats.template_tools(spec)
    else:
        messages = [_generic_message(m) for m in prompt.messages]
        if spec is not None:
            messages = tools.with_instructions(messages, spec)
    if defaults is not None:
        messages = with_system_prompt(messages, defaults)
    rendered = template.render(messages, add_generation_prompt=True, **extra)
    return rendered + prompt.prefill


def _generic_message(m: Turn) -> dict[str, Any]:
    if m.tool_calls or m.role == "tool":
        return tools.render_turn(m.role, m.content, m.tool_calls, m.tool_call_id)
    return {"role": m.role, "content": m.content}


def _native_messages(turns: tuple[Turn, ...]) -> list[dict[str, Any]]:
    names: dict[str, str] = {}  # call id -> tool name, for results that name their tool
    out: list[dict[str, Any]] = []
    for m in turns:
        message: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.tool_calls:
            message["tool_calls"] = tool_formats.template_calls(m.tool_calls)
            names.update((c.id, c.name) for c in m.tool_calls)
        if m.role == "tool":
            message["tool_call_id"] = m.tool_call_id or ""
            message["name"] = names.get(m.tool_call_id or "", "")
        out.append(message)
    return out


def _engine_request(rid: str, prompt: Prompt, text: str | None, params: SamplingParams,
                    request: GenerationRequest, session: str | None) -> EngineRequest:
    if prompt.tokens is not None:
        return EngineRequest(rid, params, prompt_tokens=prompt.tokens,
                             use_cache=request.use_cache, session_id=session)
    return EngineRequest(rid, params, prompt=text, use_cache=request.use_cache,
                         session_id=session)


@dataclass(slots=True)
class _Stream:
    """One submitted engine request: its outputs, and where its choices start."""

    outputs: AsyncIterator[RequestAccepted | SeqOutput]
    num_prompt_tokens: int
    offset: int
    replica: str | None = None  # the cluster replica that accepted it


async def _submit_all(client: EngineBackend, requests: list[EngineRequest]
                      ) -> list[_Stream]:
    streams: list[_Stream] = []
    try:
        for req in requests:
            outputs = client.generate(req)
            streams.append(_Stream(outputs, 0, len(streams) * req.params.n))
            first = await anext(outputs)
            assert isinstance(first, RequestAccepted)
            streams[-1].num_prompt_tokens = first.num_prompt_tokens
            streams[-1].replica = first.replica
    except BaseException:
        for s in streams:
            await s.outputs.aclose()  # type: ignore[attr-defined]
        raise
    return streams


@dataclass(slots=True)
class _Parsers:
    """How each choice's reply is read: the tool format and reasoning markers in force, and
    whether each prompt's template already opened a reasoning block."""

    fmt: tool_formats.ToolFormat | None
    think: tuple[str, str] | None
    opened: list[bool]
    n: int

    def make(self, num_choices: int) -> list[reply.ReplyParser] | None:
        if self.fmt is None and self.think is None:
            return None
        return [reply.ReplyParser(self.fmt, self.think, self.opened[i // self.n])
                for i in range(num_choices)]


# --- the running generation ---------------------------------------------------------------------


class Generation:
    """A started request: every prompt was accepted. Iterate `events()` once, or `collect()`;
    `usage` and `timings` fill in as the events pass. `aclose()` aborts what is unfinished."""

    def __init__(self, request_id: str, served: ServedModel, request: GenerationRequest,
                 streams: list[_Stream], timings: Timings, parsers: _Parsers) -> None:
        self.request_id = request_id
        self.model = served.name
        self.request = request
        self.timings = timings
        self.session_id: str | None = None  # the conversation it was routed by, if any
        self.num_choices = len(streams) * request.params.n
        self.usage = Usage(num_prompt_tokens=sum(s.num_prompt_tokens for s in streams))
        self._streams = streams
        self._output_tokens = [0] * self.num_choices
        self._cached = [0] * len(streams)
        # Reasoning and tool calls read apart from the answer (None: the text is the answer).
        self._parsers = parsers.make(self.num_choices)

    @property
    def prompt_tokens(self) -> tuple[int, ...] | None:
        """The prompt's token ids, when the request gave them (Ollama's `context`)."""
        return self.request.prompts[0].tokens

    async def events(self) -> AsyncIterator[Event]:
        try:
            # The outputs left are SeqOutputs: `_submit_all` took each stream's RequestAccepted.
            if len(self._streams) == 1:  # nearly every request: no merging layer per token
                async for out in self._streams[0].outputs:
                    for event in self._observe(0, out):  # type: ignore[arg-type]
                        yield event
            else:
                async for k, out in _merged(self._streams):
                    for event in self._observe(k, out):
                        yield event
        finally:
            await self.aclose()

    async def collect(self) -> list[Choice]:
        choices = [Choice() for _ in range(self.num_choices)]
        async for event in self.events():
            choice = choices[event.index]
            if isinstance(event, TextDelta):
                choice.text += event.text
                choice.token_ids.extend(event.token_ids)
                choice.logprobs.extend(event.logprobs or ())
            elif isinstance(event, ReasoningDelta):
                choice.reasoning += event.text
            elif isinstance(event, ToolCallEvent):
                choice.tool_calls.append(event.call)
            elif isinstance(event, Finished):
                choice.finish, choice.stop_string = event.reason, event.stop_string
        return choices

    async def aclose(self) -> None:
        for s in self._streams:
            await s.outputs.aclose()  # type: ignore[attr-defined]

    def _observe(self, k: int, out: SeqOutput) -> list[Event]:
        """Usage and timings from one engine output, and the events it makes."""
        index = self._streams[k].offset + out.index
        if out.token_ids and not self.timings.first_token_ns:
            self.timings.first_token_ns = time.perf_counter_ns()
        self._output_tokens[index] = out.num_output_tokens
        self._cached[k] = out.num_cached_tokens
        self.usage.num_output_tokens = sum(self._output_tokens)
        self.usage.num_cached_tokens = sum(self._cached)
        if self._parsers is not None:
            return self._parsed_events(self._parsers[index], index, out)
        events: list[Event] = []
        if out.text or out.logprobs:
            events.append(TextDelta(index, out.text, out.token_ids, out.logprobs))
        elif out.token_ids:  # a token that printed nothing yet (part of a character, a stop)
            events.append(TextDelta(index, "", out.token_ids))
        if out.finish_reason is not None:
            self._finish_timing()
            events.append(Finished(index, _finish(out), out.stop_string))
        return events

    def _parsed_events(self, parser: reply.ReplyParser, index: int,
                       out: SeqOutput) -> list[Event]:
        if parser.in_reasoning:
            self.usage.num_reasoning_tokens += len(out.token_ids)
        parts = parser.feed(out.text) if out.text else []
        if out.finish_reason is not None:
            parts.extend(parser.close())
        events: list[Event] = []
        carried = False  # the output's token ids and logprobs go with its first text event
        for part in parts:
            if isinstance(part, reply.Content):
                events.append(TextDelta(index, part.text, [] if carried else out.token_ids,
                                        None if carried else out.logprobs))
                carried = True
            elif isinstance(part, reply.Reasoning):
                events.append(ReasoningDelta(index, part.text))
            elif isinstance(part, reply.CallStart):
                events.append(ToolCallStart(index, part.position, part.id, part.name))
            elif isinstance(part, reply.CallArgs):
                events.append(ToolArgsDelta(index, part.position, part.text))
            else:
                events.append(ToolCallEvent(index, part.position, part.call))
        if not carried and (out.token_ids or out.logprobs):
            events.insert(0, TextDelta(index, "", out.token_ids, out.logprobs))
        if out.finish_reason is not None:
            self._finish_timing()
            reason = _finish(out)
            if parser.num_calls and reason in (Finish.END, Finish.STOP_STRING):
                reason = Finish.TOOL_CALLS
            events.append(Finished(index, reason, out.stop_string))
        return events

    def _finish_timing(self) -> None:
        self.timings.finished_ns = time.perf_counter_ns()


def _finish(out: SeqOutput) -> Finish:
    if out.finish_reason is FinishReason.STOP:
        return Finish.STOP_STRING if out.stop_string is not None else Finish.END
    return Finish(str(out.finish_reason))


async def _merged(streams: list[_Stream]) -> AsyncIterator[tuple[int, SeqOutput]]:
    """Outputs of several engine requests as they come (OpenAI's several prompts)."""
    queue: asyncio.Queue[tuple[int, SeqOutput] | BaseException | None] = asyncio.Queue()

    async def pump(k: int, stream: _Stream) -> None:
        try:
            async for out in stream.outputs:
                queue.put_nowait((k, out))  # type: ignore[arg-type]
        except Exception as exc:  # surfaced to the consumer below
            queue.put_nowait(exc)
        finally:
            queue.put_nowait(None)

    tasks = [asyncio.create_task(pump(k, s)) for k, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
