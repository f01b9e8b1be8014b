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
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

from pensieve.api import tools
from pensieve.api.model_defaults import fill_defaults, with_system_prompt
from pensieve.engine.client import EngineClient
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


@dataclass(frozen=True, slots=True)
class ToolCallEvent:
    index: int  # the choice
    position: int  # the call's place among this choice's calls
    call: tools.ToolCall


@dataclass(frozen=True, slots=True)
class Finished:
    index: int
    reason: Finish
    stop_string: str | None = None


Event = TextDelta | ToolCallEvent | Finished


@dataclass(slots=True)
class Usage:
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens whose KV came from Pensieve's memory
    num_output_tokens: int = 0

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
    params = _final_params(request, served.defaults)
    rid = f"{request.id_prefix}{uuid.uuid4().hex}"
    engine_reqs = [_engine_request(f"{rid}-{i}" if i else rid, p, params, request, info,
                                   served.defaults)
                   for i, p in enumerate(request.prompts)]
    streams = await _submit_all(served.client, engine_reqs)
    timings.accepted_ns = time.perf_counter_ns()
    return Generation(rid, served, request, streams, timings)


async def count_prompt_tokens(runtime: ModelRuntime, request: GenerationRequest) -> int:
    """How many tokens the request's first prompt takes, tokenized exactly as `start` would."""
    served, info = await open_model(runtime, request.model, request.keep_alive)
    prompt = request.prompts[0]
    if prompt.tokens is not None:
        return len(prompt.tokens)
    text = render_prompt(info, prompt, request.tools, served.defaults)
    return len(await served.client.tokenize(text, add_special=True))


def _final_params(request: GenerationRequest, defaults: ModelDefaults) -> SamplingParams:
    params = fill_defaults(request.params, request.sent, defaults)
    grammar = _output_grammar(request, params.grammar)
    return params if grammar == params.grammar else dataclasses.replace(params, grammar=grammar)


def _output_grammar(request: GenerationRequest, raw: str | None) -> str | None:
    """At most one of: a raw grammar, a response format, offered tools."""
    fmt = request.response_format
    if request.tools is not None:
        if raw is not None or fmt is not None:
            raise InvalidRequest("grammar and JSON response_format cannot be combined with "
                                 "tools; send tool_choice 'none' or drop them.", param="tools")
        return tools.grammar(request.tools)
    if raw is not None and fmt is not None:
        raise InvalidRequest("Send either grammar or a JSON response_format, not both.",
                             param="grammar")
    return fmt.grammar() if fmt is not None else raw


def chat_template(info: ModelInfo, defaults: ModelDefaults | None = None) -> ChatTemplate:
    """The model's chat template, or the store model's override of it."""
    source = (defaults.template if defaults else None) or info.chat_template
    return ChatTemplate.for_model(source, info.bos_token, info.eos_token)


def render_prompt(info: ModelInfo, prompt: Prompt, spec: tools.ToolSpec | None = None,
                  defaults: ModelDefaults | None = None) -> str:
    """The prompt text: chat messages through the model's template (with a store model's
    system prompt and template override, and offered tools), or the text as given."""
    if prompt.messages is None:
        return (prompt.text or "") + prompt.prefill
    messages = [_template_message(m) for m in prompt.messages]
    if spec is not None:
        messages = tools.with_instructions(messages, spec)
    if defaults is not None:
        messages = with_system_prompt(messages, defaults)
    rendered = chat_template(info, defaults).render(messages, add_generation_prompt=True)
    return rendered + prompt.prefill


def _template_message(m: Turn) -> dict[str, Any]:
    if m.tool_calls or m.role == "tool":
        return tools.render_turn(m.role, m.content, m.tool_calls, m.tool_call_id)
    return {"role": m.role, "content": m.content}


def _engine_request(rid: str, prompt: Prompt, params: SamplingParams, request: GenerationRequest,
                    info: ModelInfo, defaults: ModelDefaults) -> EngineRequest:
    if prompt.tokens is not None:
        return EngineRequest(rid, params, prompt_tokens=prompt.tokens,
                             use_cache=request.use_cache)
    text = render_prompt(info, prompt, request.tools, defaults)
    return EngineRequest(rid, params, prompt=text, use_cache=request.use_cache)


@dataclass(slots=True)
class _Stream:
    """One submitted engine request: its outputs, and where its choices start."""

    outputs: AsyncIterator[RequestAccepted | SeqOutput]
    num_prompt_tokens: int
    offset: int


async def _submit_all(client: EngineClient, requests: list[EngineRequest]) -> list[_Stream]:
    streams: list[_Stream] = []
    try:
        for req in requests:
            outputs = client.generate(req)
            streams.append(_Stream(outputs, 0, len(streams) * req.params.n))
            first = await anext(outputs)
            assert isinstance(first, RequestAccepted)
            streams[-1].num_prompt_tokens = first.num_prompt_tokens
    except BaseException:
        for s in streams:
            await s.outputs.aclose()  # type: ignore[attr-defined]
        raise
    return streams


# --- the running generation ---------------------------------------------------------------------


class Generation:
    """A started request: every prompt was accepted. Iterate `events()` once, or `collect()`;
    `usage` and `timings` fill in as the events pass. `aclose()` aborts what is unfinished."""

    def __init__(self, request_id: str, served: ServedModel, request: GenerationRequest,
                 streams: list[_Stream], timings: Timings) -> None:
        self.request_id = request_id
        self.model = served.name
        self.request = request
        self.timings = timings
        self.num_choices = len(streams) * request.params.n
        self.usage = Usage(num_prompt_tokens=sum(s.num_prompt_tokens for s in streams))
        self._streams = streams
        self._output_tokens = [0] * self.num_choices
        self._cached = [0] * len(streams)
        # Under the generic tool convention a reply is JSON that means something only whole.
        self._held: list[Choice] | None = (
            [Choice() for _ in range(self.num_choices)] if request.tools else None)

    @property
    def prompt_tokens(self) -> tuple[int, ...] | None:
        """The prompt's token ids, when the request gave them (Ollama's `context`)."""
        return self.request.prompts[0].tokens

    async def events(self) -> AsyncIterator[Event]:
        try:
            async for k, out in self._outputs():
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
            elif isinstance(event, ToolCallEvent):
                choice.tool_calls.append(event.call)
            else:
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
        if self._held is not None:
            return self._held_events(self._held[index], index, out)
        events: list[Event] = []
        if out.text or out.logprobs:
            events.append(TextDelta(index, out.text, out.token_ids, out.logprobs))
        elif out.token_ids:  # a token that printed nothing yet (part of a character, a stop)
            events.append(TextDelta(index, "", out.token_ids))
        if out.finish_reason is not None:
            self._finish_timing()
            events.append(Finished(index, _finish(out), out.stop_string))
        return events

    def _held_events(self, held: Choice, index: int, out: SeqOutput) -> list[Event]:
        held.text += out.text
        held.token_ids.extend(out.token_ids)
        held.logprobs.extend(out.logprobs or ())
        if out.finish_reason is None:
            return []
        self._finish_timing()
        reply = tools.parse_reply(held.text)
        events: list[Event] = []
        if reply.content or held.logprobs:
            events.append(TextDelta(index, reply.content or "", held.token_ids,
                                    held.logprobs or None))
        events.extend(ToolCallEvent(index, i, call) for i, call in enumerate(reply.tool_calls))
        reason = Finish.TOOL_CALLS if reply.tool_calls else _finish(out)
        events.append(Finished(index, reason, out.stop_string))
        return events

    def _finish_timing(self) -> None:
        self.timings.finished_ns = time.perf_counter_ns()

    async def _outputs(self) -> AsyncIterator[tuple[int, SeqOutput]]:
        """Engine outputs as they come, with the index of the stream they came from."""
        if len(self._streams) == 1:
            async for out in self._streams[0].outputs:
                yield 0, out  # type: ignore[misc]
            return
        async for item in _merged(self._streams):
            yield item


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
