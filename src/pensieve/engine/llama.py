"""Thin, checked wrappers over llama.cpp's low-level C API (through llama-cpp-python's ctypes).

Only this module touches `llama_cpp`. Every return code is checked where it is called, and native
objects are freed in a defined order: samplers, batch, context, model.
"""

from __future__ import annotations

import ctypes
import logging
import time

import llama_cpp as C
import numpy as np

from pensieve.engine.config import KV_CACHE_TYPES, ContextConfig, GpuConfig
from pensieve.engine.types import SamplingParams

log = logging.getLogger("pensieve.llama")

# ggml_log_level: 1 debug, 2 info, 3 warn, 4 error, 5 continuation. Its INFO lines are load chatter.
_LOG_LEVELS = {1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}
_log_callback_ref: object = None  # keeps the C callback alive for the life of the process


class LlamaError(RuntimeError):
    """llama.cpp refused or failed an operation."""


def init_backend() -> None:
    """Initialise llama.cpp once per process and route its log lines into `logging`."""
    global _log_callback_ref
    native = logging.getLogger("pensieve.llama.native")

    def _on_log(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
        message = text.decode("utf-8", errors="replace").rstrip()
        if message:
            native.log(_LOG_LEVELS.get(level, logging.DEBUG), "%s", message)

    _log_callback_ref = callback = C.llama_log_callback(_on_log)
    C.llama_log_set(callback, ctypes.c_void_p(0))
    C.llama_backend_init()


_SPLIT_MODES = {"none": C.LLAMA_SPLIT_MODE_NONE, "layer": C.LLAMA_SPLIT_MODE_LAYER,
                "row": C.LLAMA_SPLIT_MODE_ROW, "tensor": C.LLAMA_SPLIT_MODE_TENSOR}


class Model:
    """A loaded GGUF model and its vocabulary."""

    def __init__(self, path: str, *, use_mmap: bool = True, gpu: GpuConfig | None = None) -> None:
        params = model_params(gpu, use_mmap=use_mmap)
        started = time.perf_counter()
        handle = C.llama_model_load_from_file(path.encode(), params)
        if not handle:
            raise LlamaError(f"llama.cpp could not load the model file {path!r}")
        self.handle = handle
        self.load_seconds = time.perf_counter() - started
        self.path = path
        self.vocab = C.llama_model_get_vocab(handle)
        self.n_vocab = C.llama_vocab_n_tokens(self.vocab)
        self._pieces: dict[int, bytes] = {}
        self._piece_buf = ctypes.create_string_buffer(256)
        self._token_buf = (C.llama_token * 4096)()
        eog = [t for t in range(self.n_vocab) if C.llama_vocab_is_eog(self.vocab, t)]
        self.eog_ids = frozenset(eog)  # asked once per generated token: no ctypes call then

    def close(self) -> None:
        if self.handle:
            C.llama_model_free(self.handle)
            self.handle = None

    # --- metadata -------------------------------------------------------------------------
    def metadata(self) -> dict[str, str]:
        buf = ctypes.create_string_buffer(1 << 16)
        result: dict[str, str] = {}
        for i in range(C.llama_model_meta_count(self.handle)):
            if C.llama_model_meta_key_by_index(self.handle, i, buf, len(buf)) < 0:
                continue
            key = buf.value.decode("utf-8", errors="replace")
            n = C.llama_model_meta_val_str_by_index(self.handle, i, buf, len(buf))
            if n >= 0:
                result[key] = buf.value.decode("utf-8", errors="replace")
        return result

    def chat_template(self) -> str | None:
        raw = C.llama_model_chat_template(self.handle, None)
        return raw.decode("utf-8", errors="replace") if raw else None

    def description(self) -> str:
        buf = ctypes.create_string_buffer(256)
        C.llama_model_desc(self.handle, buf, len(buf))
        return buf.value.decode("utf-8", errors="replace")

    def size_bytes(self) -> int:
        return int(C.llama_model_size(self.handle))

    def num_params(self) -> int:
        return int(C.llama_model_n_params(self.handle))

    def n_ctx_train(self) -> int:
        return int(C.llama_model_n_ctx_train(self.handle))

    def n_embd(self) -> int:
        return int(C.llama_model_n_embd(self.handle))

    # --- vocabulary -----------------------------------------------------------------------
    def tokenize(self, text: str, *, add_special: bool, parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8", errors="replace")
        buf = self._token_buf
        n = C.llama_tokenize(self.vocab, data, len(data), buf, len(buf), add_special, parse_special)
        if n < 0:  # buffer too small: -n is the size needed
            buf = (C.llama_token * (-n))()
            n = C.llama_tokenize(self.vocab, data, len(data), buf, len(buf), add_special,
                                 parse_special)
            if n < 0:
                raise LlamaError("tokenization failed")
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        """The bytes a token renders to in generated text (control tokens render as nothing)."""
        cached = self._pieces.get(token)
        if cached is not None:
            return cached
        buf = self._piece_buf
        n = C.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = C.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        piece = buf.raw[: max(n, 0)]
        self._pieces[token] = piece
        return piece

    def token_text(self, token: int) -> str:
        """A token's text including special tokens (for templates: BOS, EOS)."""
        return self.token_bytes(token).decode("utf-8", errors="replace")

    def token_bytes(self, token: int) -> bytes:
        """A token's bytes, special tokens rendered as their text (`<|im_start|>`)."""
        if token < 0:
            return b""
        buf = self._piece_buf
        n = C.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, True)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = C.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, True)
        return buf.raw[: max(n, 0)]

    def is_eog(self, token: int) -> bool:
        return token in self.eog_ids


    @property
    def bos(self) -> int:
        return int(C.llama_vocab_bos(self.vocab))

    @property
    def eos(self) -> int:
        return int(C.llama_vocab_eos(self.vocab))

    @property
    def add_bos(self) -> bool:
        return bool(C.llama_vocab_get_add_bos(self.vocab))


def model_params(gpu: GpuConfig | None, *, use_mmap: bool) -> C.llama_model_params:
    """llama.cpp's model parameters for these GPU settings (None: CPU only; `n_gpu_layers`
    must be resolved, not auto)."""
    params: C.llama_model_params = C.llama_model_default_params()
    params.use_mmap = use_mmap
    params.n_gpu_layers = 0
    if gpu is None:
        return params
    assert gpu.n_gpu_layers is not None, "resolve auto before loading"
    params.n_gpu_layers = gpu.n_gpu_layers
    params.main_gpu = gpu.main_gpu
    params.split_mode = _SPLIT_MODES[gpu.split_mode]
    if gpu.tensor_split:
        n = int(C.llama_max_devices())
        if len(gpu.tensor_split) > n:
            raise LlamaError(f"--tensor-split has {len(gpu.tensor_split)} parts, but this "
                             f"build supports at most {n} devices")
        # ctypes keeps the array alive in the struct's _objects once assigned
        params.tensor_split = (ctypes.c_float * n)(*gpu.tensor_split)
    return params


_FLASH_ATTN = {
    "auto": C.LLAMA_FLASH_ATTN_TYPE_AUTO,
    "on": C.LLAMA_FLASH_ATTN_TYPE_ENABLED,
    "off": C.LLAMA_FLASH_ATTN_TYPE_DISABLED,
}


def context_params(config: ContextConfig) -> C.llama_context_params:
    params: C.llama_context_params = C.llama_context_default_params()
    params.n_ctx = config.n_ctx
    params.n_batch = config.n_batch
    params.n_ubatch = config.n_ubatch
    params.n_seq_max = config.n_seq_max
    params.n_threads = config.n_threads
    params.n_threads_batch = config.n_threads_batch
    params.flash_attn_type = _FLASH_ATTN[config.flash_attn]
    params.kv_unified = config.kv_unified
    params.type_k = KV_CACHE_TYPES[config.type_k].ggml_type
    params.type_v = KV_CACHE_TYPES[config.type_v].ggml_type
    params.embeddings = config.embeddings
    if config.pooling is not None:
        params.pooling_type = config.pooling
    params.no_perf = True
    return params


class Context:
    """One llama context shared by all sequences of a model, each under its own seq_id."""

    def __init__(self, model: Model, config: ContextConfig) -> None:
        handle = C.llama_init_from_model(model.handle, context_params(config))
        if not handle:
            raise LlamaError(
                f"llama.cpp could not create a context (n_ctx={config.n_ctx}, "
                f"n_seq_max={config.n_seq_max}, cache types K {config.type_k} V "
                f"{config.type_v}); try a smaller --ctx-size or --parallel (a quantized V "
                "cache also needs flash attention on the device)"
            )
        self.handle = handle
        self.model = model
        self.memory = C.llama_get_memory(handle)
        self.n_ctx = int(C.llama_n_ctx(handle))
        self.n_ctx_seq = int(C.llama_n_ctx_seq(handle))
        self.n_batch = int(C.llama_n_batch(handle))
        self.n_seq_max = config.n_seq_max
        self.kv_unified = config.kv_unified

    def close(self) -> None:
        if self.handle:
            C.llama_free(self.handle)
            self.handle = None

    def decode(self, batch: Batch) -> int:
        """Run one forward pass; returns llama_decode's code (0 ok, 1 no KV slot, else error)."""
        return int(C.llama_decode(self.handle, batch.struct))

    def logits(self, idx: int) -> np.ndarray:
        """A zero-copy view of the logits of batch position `idx` (valid until the next decode)."""
        ptr = C.llama_get_logits_ith(self.handle, idx)
        if not ptr:
            raise LlamaError(f"no logits for batch index {idx}")
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,))

    def embedding(self, seq_id: int, n_embd: int) -> np.ndarray:
        """The pooled embedding of `seq_id` after a decode on an embeddings context (a copy)."""
        ptr = C.llama_get_embeddings_seq(self.handle, seq_id)
        if not ptr:
            raise LlamaError(f"no pooled embedding for sequence {seq_id}")
        return np.ctypeslib.as_array(ptr, shape=(n_embd,)).copy()

    def seq_remove(self, seq_id: int, p0: int = -1, p1: int = -1) -> bool:
        return bool(C.llama_memory_seq_rm(self.memory, seq_id, p0, p1))

    def copy_prefix(self, src: int, dst: int, length: int) -> None:
        """Give `dst` the KV of `src`'s first `length` positions.

        On a unified cache this tags the same cells with `dst` (no copy). Across the streams of
        a split cache llama.cpp copies whole buffers only, so copy all, then trim.
        """
        if self.kv_unified:
            C.llama_memory_seq_cp(self.memory, src, dst, 0, length)
            return
        C.llama_memory_seq_cp(self.memory, src, dst, -1, -1)
        C.llama_memory_seq_rm(self.memory, dst, length, -1)

    def clear(self) -> None:
        C.llama_memory_clear(self.memory, True)

    def state_get(self, seq_id: int) -> bytes:
        """One sequence's KV state, as llama.cpp serialises it."""
        size = C.llama_state_seq_get_size(self.handle, seq_id)
        buf = (ctypes.c_uint8 * size)()
        n = C.llama_state_seq_get_data(self.handle, buf, size, seq_id)
        return bytes(memoryview(buf)[:n])

    def state_get_range(self, seq_id: int, scratch: int, p0: int, p1: int) -> bytes | None:
        """The state of `seq_id`'s positions [p0, p1) only, through an empty `scratch` seq_id
        tagged with those cells (no copy on a unified cache); None on a split cache."""
        if not self.kv_unified:
            return None
        C.llama_memory_seq_cp(self.memory, seq_id, scratch, p0, p1)
        try:
            return self.state_get(scratch)
        finally:
            C.llama_memory_seq_rm(self.memory, scratch, -1, -1)

    def state_set(self, seq_id: int, data: bytes) -> bool:
        """Load a state saved by `state_get` into `seq_id`; False if llama.cpp refused it."""
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        return int(C.llama_state_seq_set_data(self.handle, buf, len(data), seq_id)) > 0


class Batch:
    """A llama_batch whose arrays are numpy buffers we own, so filling it is vectorised.

    Each token has exactly one seq_id; `seq_id[i]` points at `self._seq[i]`.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.token = np.zeros(capacity, dtype=np.int32)
        self.pos = np.zeros(capacity, dtype=np.int32)
        self.n_seq_id = np.ones(capacity, dtype=np.int32)
        self._seq = np.zeros(capacity, dtype=np.int32)
        self.logits = np.zeros(capacity, dtype=np.int8)
        base = self._seq.ctypes.data
        self._seq_ptrs = (ctypes.POINTER(C.llama_seq_id) * capacity)(
            *[ctypes.cast(base + 4 * i, ctypes.POINTER(C.llama_seq_id)) for i in range(capacity)]
        )
        # Pointer fields set through the constructor: llama_cpp's stubs type them as arrays.
        self.struct = C.llama_batch(
            token=self.token.ctypes.data_as(ctypes.POINTER(C.llama_token)), embd=None,
            pos=self.pos.ctypes.data_as(ctypes.POINTER(C.llama_pos)),
            n_seq_id=self.n_seq_id.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)),
            seq_id=self._seq_ptrs,
            logits=self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8)))
        self.num_tokens = 0

    def clear(self) -> None:
        self.num_tokens = 0

    def add(self, tokens: list[int], start_pos: int, seq_id: int, want_logits: bool) -> int:
        """Append a run of one sequence's tokens; returns the batch index of its last token."""
        n = len(tokens)
        i = self.num_tokens
        if i + n > self.capacity:
            raise ValueError("batch overflow")
        self.token[i : i + n] = tokens
        self.pos[i : i + n] = np.arange(start_pos, start_pos + n, dtype=np.int32)
        self._seq[i : i + n] = seq_id
        self.logits[i : i + n] = 0
        if want_logits:
            self.logits[i + n - 1] = 1
        self.num_tokens = i + n
        self.struct.n_tokens = self.num_tokens
        return i + n - 1


class GrammarError(LlamaError):
    """llama.cpp could not parse a GBNF grammar."""


_FALLBACK_LOOK_BACK = 4096  # the whole context, for a model that states no training context
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


class Sampler:
    """A llama.cpp sampler chain for one sequence, built from its SamplingParams.

    With a grammar, sampling follows llama.cpp's common sampler: the chain picks a token from
    the raw logits and the grammar checks only that token; only when it refuses does the grammar
    mask the whole vocabulary (its costly step) before the chain picks again. Either way the
    token is one the grammar allows, then both accept it.
    """

    def __init__(self, model: Model, params: SamplingParams, seed: int) -> None:
        chain_params = C.llama_sampler_chain_default_params()
        chain_params.no_perf = True
        self.grammar: C.llama_sampler_p | None = None
        self.handle = C.llama_sampler_chain_init(chain_params)
        if not self.handle:
            raise LlamaError("could not create a sampler chain")
        for stage in _sampler_stages(model, params, seed):
            if not stage:
                self.close()
                raise LlamaError("could not create a sampler stage")
            C.llama_sampler_chain_add(self.handle, stage)  # the chain owns it from here
        if params.grammar is not None:
            self._init_grammar(model, params.grammar, params.grammar_triggers)

    def _init_grammar(self, model: Model, grammar: str, triggers: tuple[str, ...]) -> None:
        if triggers:
            patterns = (ctypes.c_char_p * len(triggers))(*(t.encode() for t in triggers))
            self.grammar = C.llama_sampler_init_grammar_lazy_patterns(
                model.vocab, grammar.encode(), b"root", patterns, len(triggers), None, 0)
        else:
            self.grammar = C.llama_sampler_init_grammar(model.vocab, grammar.encode(), b"root")
        if not self.grammar:
            self.close()
            raise GrammarError("llama.cpp could not parse the grammar (GBNF), or it has no "
                               "'root' rule")
        self._cand = np.zeros(model.n_vocab, dtype=_TOKEN_DATA)
        self._ids = np.arange(model.n_vocab, dtype=np.int32)
        self._one = np.zeros(1, dtype=_TOKEN_DATA)
        self._arr = C.llama_token_data_array()
        self._one_arr = C.llama_token_data_array(  # as Batch: the stub types `data` as an array
            data=self._one.ctypes.data_as(ctypes.POINTER(C.llama_token_data)))
        self._eos = model.eos

    def sample(self, ctx: Context, idx: int) -> int:
        """Sample (and accept) the next token from batch position `idx`."""
        if self.grammar is None:
            return int(C.llama_sampler_sample(self.handle, ctx.handle, idx))
        logits = ctx.logits(idx)
        token = self._pick(logits, constrained=False)
        if not self._grammar_allows(token):
            token = self._pick(logits, constrained=True)
            if not self._grammar_allows(token):
                # Nothing is left that the grammar allows (llama.cpp would abort on accepting
                # this token): end the sequence instead.
                return self._eos
        C.llama_sampler_accept(self.grammar, token)
        C.llama_sampler_accept(self.handle, token)
        return token

    def _pick(self, logits: np.ndarray, *, constrained: bool) -> int:
        cand = self._cand
        cand["id"] = self._ids
        cand["logit"] = logits
        cand["p"] = 0.0
        arr = self._arr
        # A pointer field that llama_cpp's stub types as an array (C: llama_token_data * data).
        arr.data = cand.ctypes.data_as(ctypes.POINTER(C.llama_token_data))  # type: ignore[assignment]
        arr.size, arr.selected, arr.sorted = len(cand), -1, False
        if constrained:
            C.llama_sampler_apply(self.grammar, ctypes.byref(arr))
        C.llama_sampler_apply(self.handle, ctypes.byref(arr))
        if arr.selected < 0:
            raise LlamaError("the sampler chain selected no token")
        return int(cand["id"][arr.selected])

    def _grammar_allows(self, token: int) -> bool:
        one = self._one
        one["id"], one["logit"], one["p"] = token, 1.0, 0.0
        arr = self._one_arr
        arr.size, arr.selected, arr.sorted = 1, -1, False
        C.llama_sampler_apply(self.grammar, ctypes.byref(arr))
        return bool(np.isfinite(one["logit"][0]))

    def close(self) -> None:
        if self.grammar:
            C.llama_sampler_free(self.grammar)
            self.grammar = None
        if self.handle:
            C.llama_sampler_free(self.handle)
            self.handle = None


def _sampler_stages(model: Model, p: SamplingParams, seed: int) -> list[object]:
    stages: list[object] = []
    if p.logit_bias:
        biases = (C.llama_logit_bias * len(p.logit_bias))(
            *[C.llama_logit_bias(token, bias) for token, bias in p.logit_bias]
        )
        stages.append(C.llama_sampler_init_logit_bias(model.n_vocab, len(biases), biases))
    if p.ignore_eos and model.eog_ids:
        banned = (C.llama_logit_bias * len(model.eog_ids))(
            *[C.llama_logit_bias(t, float("-inf")) for t in sorted(model.eog_ids)]
        )
        stages.append(C.llama_sampler_init_logit_bias(model.n_vocab, len(banned), banned))
    if p.has_penalties:
        stages.append(
            C.llama_sampler_init_penalties(
                model.n_vocab, _look_back(model, p.penalty_last_n), p.repeat_penalty,
                p.frequency_penalty,
                p.presence_penalty,
            )
        )
    if p.has_dry:
        stages.append(_dry_stage(model, p))
    if p.is_greedy:
        stages.append(C.llama_sampler_init_greedy())
        return stages
    if p.top_k > 0:
        stages.append(C.llama_sampler_init_top_k(p.top_k))
    if p.top_p < 1.0:
        stages.append(C.llama_sampler_init_top_p(p.top_p, 1))
    if p.min_p > 0.0:
        stages.append(C.llama_sampler_init_min_p(p.min_p, 1))
    stages.append(C.llama_sampler_init_temp(p.temperature))
    stages.append(C.llama_sampler_init_dist(seed))
    return stages


def _dry_stage(model: Model, p: SamplingParams) -> object:
    # llama.cpp copies the breakers while it builds the stage, so the array may go after.
    breakers = [b.encode() for b in p.dry_sequence_breakers]
    array = (ctypes.c_char_p * max(1, len(breakers)))(*breakers)
    return C.llama_sampler_init_dry(model.vocab, p.dry_multiplier, p.dry_base,
                                    p.dry_allowed_length, _look_back(model, p.dry_penalty_last_n),
                                    array, len(breakers))


def _look_back(model: Model, last_n: int | None) -> int:
    """A penalty's window in tokens; None is the whole context, as llama-server's -1."""
    return last_n if last_n is not None else model.n_ctx_train() or _FALLBACK_LOOK_BACK
