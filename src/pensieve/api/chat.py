"""The one engine path behind the Ollama and Anthropic APIs, and the prompt rendering that all
three API families share (`render_prompt`).

Each API family translates its request into a `TextRequest` (chat messages or a ready prompt,
plus `SamplingParams`), runs it with `start_text`, and renders the `Delta`s, `Usage` and
`Timings` of the resulting `TextGeneration` in its own shape:

    protocol model --to_text_request()--> TextRequest --start_text()--> TextGeneration
                                                                          .deltas() / .collect()
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

from pensieve.api.generation import Generation, start
from pensieve.api.model_defaults import with_system_prompt
from pensieve.engine.types import EngineRequest, FinishReason, ModelInfo, SamplingParams
from pensieve.runtime import ServedModel
from pensieve.store.store import ModelDefaults
from pensieve.structured import JSON_OBJECT_GRAMMAR, grammar_for_json_schema
from pensieve.templates import ChatTemplate

log = logging.getLogger("pensieve.api")


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True, slots=True)
class ResponseFormat:
    """A requested output format, validated at the edge and handed to the grammar builder."""

    kind: Literal["json", "json_schema"]
    schema: dict[str, Any] | None = None

    def grammar(self) -> str:
        """The GBNF that enforces this format in the engine's sampler."""
        if self.kind == "json" or self.schema is None:
            return JSON_OBJECT_GRAMMAR
        return grammar_for_json_schema(self.schema, strict=True)


@dataclass(frozen=True, slots=True)
class TextRequest:
    """One API-independent generation request. Exactly one of `messages` (rendered with the
    model's chat template), `prompt` (sent as is) and `prompt_tokens` is set.

    `prefill` continues a partly written assistant answer (Anthropic's trailing assistant turn).
    """

    params: SamplingParams
    messages: tuple[ChatMessage, ...] | None = None
    prompt: str | None = None
    prompt_tokens: tuple[int, ...] | None = None
    prefill: str = ""
    use_cache: bool = True
    response_format: ResponseFormat | None = None

    def __post_init__(self) -> None:
        sources = (self.messages, self.prompt, self.prompt_tokens)
        assert sum(s is not None for s in sources) == 1, "exactly one prompt source"


def chat_template(info: ModelInfo, defaults: ModelDefaults | None = None) -> ChatTemplate:
    """The model's chat template, or the store model's override of it."""
    source = (defaults.template if defaults else None) or info.chat_template
    return ChatTemplate.for_model(source, info.bos_token, info.eos_token)


def render_messages(info: ModelInfo, messages: tuple[ChatMessage, ...], prefill: str = "",
                    defaults: ModelDefaults | None = None) -> str:
    """The prompt for `messages`, ending where the assistant's answer (after `prefill`) starts."""
    return render_prompt(info, [{"role": m.role, "content": m.content} for m in messages],
                         defaults, prefill)


def render_prompt(info: ModelInfo, messages: list[dict[str, Any]],
                  defaults: ModelDefaults | None = None, prefill: str = "") -> str:
    """Template messages (role/content dicts) rendered with the model's chat template; every API
    family builds its prompts here. A store model's defaults add its system prompt (unless the
    messages bring one) and may override the template."""
    if defaults is not None:
        messages = with_system_prompt(messages, defaults)
    return chat_template(info, defaults).render(messages, add_generation_prompt=True) + prefill


async def count_prompt_tokens(served: ServedModel, messages: tuple[ChatMessage, ...],
                              prefill: str = "") -> int:
    """How many tokens `messages` take as a prompt, tokenized exactly as a generation would."""
    info = await served.client.ensure_started()
    prompt = render_messages(info, messages, prefill, served.defaults)
    return len(await served.client.tokenize(prompt, add_special=True))


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
class Usage:
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens whose KV came from Pensieve's memory
    num_output_tokens: int = 0

    @property
    def num_uncached_tokens(self) -> int:
        return self.num_prompt_tokens - self.num_cached_tokens


@dataclass(frozen=True, slots=True)
class Delta:
    """New text of the answer; the last delta carries the finish reason."""

    text: str
    token_ids: tuple[int, ...] = ()
    finish_reason: FinishReason | None = None
    stop_string: str | None = None


@dataclass(slots=True)
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None
    stop_string: str | None


class TextGeneration:
    """A started request: its prompt was accepted. Iterate `deltas()` once (or `collect()`);
    `usage` and `timings` fill in as the deltas pass."""

    def __init__(self, request_id: str, model: str, gen: Generation, timings: Timings,
                 prompt_tokens: tuple[int, ...] | None) -> None:
        self.request_id = request_id
        self.model = model
        self.timings = timings
        self.usage = Usage(num_prompt_tokens=gen.num_prompt_tokens)
        self.prompt_tokens = prompt_tokens
        self._gen = gen

    async def deltas(self) -> AsyncIterator[Delta]:
        outputs = self._gen.outputs
        try:
            async for out in outputs:
                if out.token_ids and not self.timings.first_token_ns:
                    self.timings.first_token_ns = time.perf_counter_ns()
                self.usage.num_cached_tokens = out.num_cached_tokens
                self.usage.num_output_tokens = out.num_output_tokens
                if out.finish_reason is not None:
                    self.timings.finished_ns = time.perf_counter_ns()
                yield Delta(out.text, tuple(out.token_ids), out.finish_reason, out.stop_string)
        finally:
            await self.aclose()

    async def collect(self) -> Completion:
        result = Completion("", [], None, None)
        async for d in self.deltas():
            result.text += d.text
            result.token_ids.extend(d.token_ids)
            if d.finish_reason is not None:
                result.finish_reason, result.stop_string = d.finish_reason, d.stop_string
        return result

    async def aclose(self) -> None:
        await self._gen.outputs.aclose()  # type: ignore[attr-defined]


async def start_text(served: ServedModel, request: TextRequest, *,
                     id_prefix: str) -> TextGeneration:
    """Load the model if needed, build the prompt and submit it; raises on a rejected prompt."""
    timings = Timings()
    if request.response_format is not None and request.params.grammar is None:
        grammar = request.response_format.grammar()  # 400 when a schema cannot be enforced
        request = dataclasses.replace(request,
                                      params=dataclasses.replace(request.params, grammar=grammar))
    info = await served.client.ensure_started()
    timings.loaded_ns = time.perf_counter_ns()
    rid = f"{id_prefix}{uuid.uuid4().hex}"
    engine_req = _engine_request(rid, info, request, served.defaults)
    gen = await start(served.client, engine_req)
    timings.accepted_ns = time.perf_counter_ns()
    return TextGeneration(rid, served.name, gen, timings, request.prompt_tokens)


def _engine_request(rid: str, info: ModelInfo, request: TextRequest,
                    defaults: ModelDefaults) -> EngineRequest:
    if request.prompt_tokens is not None:
        return EngineRequest(rid, request.params, prompt_tokens=request.prompt_tokens,
                             use_cache=request.use_cache)
    if request.messages is not None:
        prompt = render_messages(info, request.messages, request.prefill, defaults)
    else:
        prompt = (request.prompt or "") + request.prefill
    return EngineRequest(rid, request.params, prompt=prompt, use_cache=request.use_cache)
