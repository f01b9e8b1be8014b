"""Plain dataclasses that cross the process boundary between the API server and an engine worker.

Everything here is picklable and free of native handles: the HTTP process builds `EngineRequest`s,
the worker answers with `StepOutput`s, one message per engine step.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from pensieve.sampling import DEFAULT_DRY_SEQUENCE_BREAKERS


class FinishReason(enum.StrEnum):
    STOP = "stop"  # end-of-generation token or a stop string
    LENGTH = "length"  # max_tokens or the context limit
    ABORT = "abort"  # the client went away or the request was cancelled
    ERROR = "error"  # the engine failed this request


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How one request samples. `temperature == 0` means greedy."""

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_penalty: float = 1.0
    penalty_last_n: int | None = 64  # tokens the penalties look back at; None: the whole context
    logit_bias: tuple[tuple[int, float], ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    n: int = 1
    grammar: str | None = None  # GBNF that constrains the output (structured output, tools)
    # Regex patterns that make the grammar lazy: the output is free until one of them matches
    # the text so far, and the grammar holds from the match on (a tool call opening).
    grammar_triggers: tuple[str, ...] = ()
    # llama.cpp's DRY ("don't repeat yourself") sampler: penalises a token that would extend a
    # sequence already seen, by multiplier * base ** (length - allowed_length). 0: off.
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_penalty_last_n: int | None = 64  # tokens looked back at; None: the whole context
    dry_sequence_breakers: tuple[str, ...] = DEFAULT_DRY_SEQUENCE_BREAKERS
    max_context: int | None = None  # the request's own context limit (Ollama's num_ctx)

    @property
    def is_greedy(self) -> bool:
        return self.temperature <= 0.0

    @property
    def has_penalties(self) -> bool:
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repeat_penalty != 1.0
        )

    @property
    def has_dry(self) -> bool:
        return self.dry_multiplier > 0.0 and self.dry_penalty_last_n != 0


@dataclass(frozen=True, slots=True)
class EngineRequest:
    """One generation request. Exactly one of `prompt` (text) and `prompt_tokens` is set."""

    request_id: str
    params: SamplingParams
    prompt: str | None = None
    prompt_tokens: tuple[int, ...] | None = None
    add_special: bool = True  # let the tokenizer add BOS where the model wants one
    use_cache: bool = True  # reuse KV of earlier requests sharing a prefix (exact match only)
    # The conversation this request continues (X-Session-Id, OpenAI `user`, a Responses
    # chain): a hint for a cluster's router, which keeps a conversation on one replica. A
    # local worker ignores it.
    session_id: str | None = None


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token_id: int
    token: bytes
    logprob: float
    top: tuple[tuple[int, bytes, float], ...] = ()


@dataclass(slots=True)
class SeqOutput:
    """What one choice of one request produced in one step."""

    request_id: str
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_output_tokens: int = 0
    error: str | None = None
    stop_string: str | None = None  # set when a stop string (not end-of-generation) finished it


@dataclass(frozen=True, slots=True)
class RequestAccepted:
    """Sent once the worker has tokenized and validated a request."""

    request_id: str
    num_prompt_tokens: int
    replica: str | None = None  # which of a cluster's replicas runs it (None: a local worker)


@dataclass(frozen=True, slots=True)
class RequestRejected:
    """Sent instead of `RequestAccepted` when a request cannot be served (bad input)."""

    request_id: str
    message: str
    param: str | None = None
    code: str | None = None


@dataclass(frozen=True, slots=True)
class AbortRequest:
    request_id: str


@dataclass(frozen=True, slots=True)
class TokenizeRequest:
    request_id: str
    text: str
    add_special: bool = True


@dataclass(frozen=True, slots=True)
class TokenizeResult:
    request_id: str
    tokens: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class DetokenizeRequest:
    request_id: str
    tokens: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class DetokenizeResult:
    request_id: str
    text: str


@dataclass(frozen=True, slots=True)
class EmbedRequest:
    """Embed each input (text, or token ids) into one normalized vector."""

    request_id: str
    inputs: tuple[str | tuple[int, ...], ...]
    truncate: bool = True  # cut inputs longer than the embeddings context; False: reject them


@dataclass(frozen=True, slots=True)
class EmbedResult:
    request_id: str
    embeddings: list[list[float]]
    num_prompt_tokens: int


@dataclass(frozen=True, slots=True)
class MemoryRequest:
    """List (key None, delete False), delete one key, or delete everything (key None)."""

    request_id: str
    delete: bool = False
    key: str | None = None


@dataclass(frozen=True, slots=True)
class MemoryResult:
    request_id: str
    entries: list[dict[str, object]] = field(default_factory=list)
    num_deleted: int = 0


@dataclass(frozen=True, slots=True)
class Shutdown:
    pass


@dataclass(slots=True)
class StepOutput:
    """Everything one engine step produced, sent as one message to keep IPC cheap."""

    outputs: list[SeqOutput | RequestAccepted | RequestRejected | TokenizeResult
                  | DetokenizeResult | MemoryResult | EmbedResult]
    num_running: int = 0
    num_waiting: int = 0
    num_batch_tokens: int = 0
    memory: dict[str, object] | None = None  # memory tier counters, sent now and then


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What the worker learned while loading the model; sent once, after a successful load."""

    path: str
    description: str
    size_bytes: int
    num_params: int
    n_ctx: int
    n_ctx_seq: int
    n_ctx_train: int
    n_seq_max: int
    n_vocab: int
    chat_template: str | None
    bos_token: str
    eos_token: str
    add_bos: bool
    load_seconds: float
    metadata: dict[str, str] = field(default_factory=dict)
    offload: OffloadInfo | None = None  # where it runs (CPU, or layers on GPUs)


@dataclass(frozen=True, slots=True)
class WorkerReady:
    info: ModelInfo


@dataclass(frozen=True, slots=True)
class WorkerFailed:
    message: str


@dataclass(frozen=True, slots=True)
class OffloadInfo:
    """Where a loaded model runs: the backend, its devices, and the layers offloaded to them."""

    backend: str  # "CPU", "CUDA", "Metal", "Vulkan", "ROCm" ...
    devices: tuple[str, ...]
    num_gpu_layers: int
    num_layers: int  # offloadable layers: the repeating ones plus the output layer
    cpu_reason: str | None = None  # why a model runs on the CPU only, when it is not a choice
