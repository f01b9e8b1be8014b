"""The model runner: what `Engine.step` needs from a model, behind one small seam.

Each step the engine asks its runner for two things, once per step and never per token:

    decode(plan)          pack the scheduled chunks into one batch and run the forward pass
    sample(seqs, chunks)  pick each listed sequence's next token from the logits of a chunk's
                          last token (n > 1 followers read their leader's chunk)

plus `logprob` for the few requests that ask. `LlamaRunner` does this on llama.cpp; the unit
tests drive the engine with a scripted runner instead (tests/unit/test_engine_step.py).

Memory stays on the engine's side of the seam. The live cache and the RAM and disk tiers
(memory/) are plain Python over a handful of KV operations (`KVOps`: remove a range, copy a
prefix, save and load a sequence's state), so the runner only exposes those operations as `kv`.
A fake can then record them, and the tests run the real prefix-reuse, retention and eviction
bookkeeping instead of a stand-in for it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import numpy as np

from pensieve.engine.devices import place_model
from pensieve.engine.embedder import Embedder
from pensieve.engine.llama import Batch, Context, Model, Sampler
from pensieve.engine.scheduler import ScheduledChunk
from pensieve.engine.sequence import Sequence, TokenSampler
from pensieve.engine.types import (
    EmbedRequest,
    EmbedResult,
    ModelInfo,
    RequestRejected,
    SamplingParams,
    TokenLogprob,
)
from pensieve.memory.live import KVOps

if TYPE_CHECKING:
    from pensieve.engine.config import EngineConfig

# llama_decode's return codes that the engine tells apart (any other nonzero code is a failure).
DECODE_OK = 0
DECODE_NO_KV_SLOT = 1


class Vocab(Protocol):
    """The model's vocabulary, as the engine uses it (llama.py's `Model` is one)."""

    n_vocab: int

    @property
    def bos(self) -> int: ...

    def tokenize(self, text: str, *, add_special: bool) -> list[int]: ...

    def piece(self, token: int) -> bytes: ...

    def token_bytes(self, token: int) -> bytes: ...

    def is_eog(self, token: int) -> bool: ...


class ModelRunner(Protocol):
    """One model and its context, driven by `Engine.step` (decode, sample) once per step."""

    n_ctx: int  # KV cells of the whole context, shared by all sequences
    n_ctx_limit: int  # the most tokens one sequence may hold
    n_batch: int  # the most tokens one decode may take
    n_seq_max: int  # sequences (seq_ids) the context can hold at once

    @property
    def vocab(self) -> Vocab: ...

    @property
    def kv(self) -> KVOps: ...

    def new_sampler(self, params: SamplingParams, seed: int) -> TokenSampler:
        """A sampler for one sequence; raises GrammarError on a bad grammar."""
        ...

    def decode(self, plan: list[ScheduledChunk]) -> int:
        """Run the plan's tokens through the model: DECODE_OK, DECODE_NO_KV_SLOT (nothing was
        computed; make room and try again) or another code (the step failed)."""
        ...

    def sample(self, seqs: list[Sequence], chunks: list[int]) -> list[int]:
        """Sample (and accept) the next token of each `seqs[i]` from the logits of the last token
        of `plan[chunks[i]]` of the last decode."""
        ...

    def logprob(self, chunk: int, token: int, num_top: int) -> TokenLogprob:
        """`token`'s log-probability (and the top `num_top`) at chunk `chunk` of the last decode."""
        ...

    def info(self) -> ModelInfo: ...

    def embed(self, requests: list[EmbedRequest],
              tokenize: Callable[[str, bool], list[int]]) -> list[EmbedResult | RequestRejected]:
        ...

    def close(self) -> None: ...


def token_logprob(logits: np.ndarray, token: int, num_top: int,
                  piece: Callable[[int], bytes]) -> TokenLogprob:
    """`token`'s log-softmax over raw logits (numpy, straight on the runner's logits row)."""
    peak = float(logits.max())
    lse = peak + float(np.log(np.exp(logits - peak).sum()))
    top: tuple[tuple[int, bytes, float], ...] = ()
    if num_top > 0:
        ids = np.argpartition(logits, -num_top)[-num_top:]
        ids = ids[np.argsort(-logits[ids], kind="stable")]
        top = tuple((int(t), piece(int(t)), float(logits[t]) - lse) for t in ids)
    return TokenLogprob(token, piece(token), float(logits[token]) - lse, top)


class LlamaRunner:
    """The runner on llama.cpp: one model, one context and one batch, owned and freed here."""

    def __init__(self, config: EngineConfig) -> None:
        gpu, self.offload = place_model(config.model_path, config.context, config.gpu)
        self.model = Model(config.model_path, use_mmap=config.use_mmap, gpu=gpu)
        try:
            self.ctx = Context(self.model, config.context)
        except Exception:
            self.model.close()
            raise
        self.batch = Batch(self.ctx.n_batch)
        self.n_ctx = self.ctx.n_ctx
        self.n_ctx_limit = min(self.ctx.n_ctx_seq, self.model.n_ctx_train() or self.ctx.n_ctx_seq)
        self.n_batch = self.ctx.n_batch
        self.n_seq_max = self.ctx.n_seq_max
        self._rows: list[int] = []  # batch index of each chunk's last token, in plan order
        self._n_threads = config.context.n_threads_batch
        self._embedder: Embedder | None = None  # created on the first embeddings request

    @property
    def vocab(self) -> Model:
        return self.model

    @property
    def kv(self) -> Context:
        return self.ctx

    def new_sampler(self, params: SamplingParams, seed: int) -> Sampler:
        return Sampler(self.model, params, seed)

    def decode(self, plan: list[ScheduledChunk]) -> int:
        batch = self.batch
        batch.clear()
        rows = self._rows
        rows.clear()
        for chunk in plan:
            seq = chunk.seq
            assert seq.seq_id is not None
            tokens = seq.tokens[chunk.start : chunk.start + chunk.count]
            rows.append(batch.add(tokens, chunk.start, seq.seq_id, chunk.completes))
        return self.ctx.decode(batch)

    def sample(self, seqs: list[Sequence], chunks: list[int]) -> list[int]:
        ctx, rows = self.ctx, self._rows
        # each sampler leaves the context's logits untouched, so sequences sharing a row agree
        return [seq.sampler.sample(ctx, rows[c]) for seq, c in zip(seqs, chunks, strict=True)]

    def logprob(self, chunk: int, token: int, num_top: int) -> TokenLogprob:
        return token_logprob(self.ctx.logits(self._rows[chunk]), token, num_top, self.model.piece)

    def info(self) -> ModelInfo:
        m = self.model
        return ModelInfo(
            path=m.path,
            description=m.description(),
            size_bytes=m.size_bytes(),
            num_params=m.num_params(),
            n_ctx=self.n_ctx,
            n_ctx_seq=self.n_ctx_limit,
            n_ctx_train=m.n_ctx_train(),
            n_seq_max=self.n_seq_max,
            n_vocab=m.n_vocab,
            chat_template=m.chat_template(),
            bos_token=m.token_text(m.bos),
            eos_token=m.token_text(m.eos),
            add_bos=m.add_bos,
            load_seconds=m.load_seconds,
            metadata=m.metadata(),
            offload=self.offload,
        )

    def embed(self, requests: list[EmbedRequest],
              tokenize: Callable[[str, bool], list[int]]) -> list[EmbedResult | RequestRejected]:
        """Embed every input of these requests on a second (pooling) context, made on first use."""
        if self._embedder is None:
            self._embedder = Embedder(self.model, self._n_threads, tokenize)
        return self._embedder.embed(requests)

    def close(self) -> None:
        """Free the native objects: embeddings context, context, model (samplers went first)."""
        if self._embedder is not None:
            self._embedder.close()
        self.ctx.close()
        self.model.close()
