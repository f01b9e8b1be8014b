"""Embeddings: a second llama context on the same model, with pooling, created on first use.

Every embedding request that arrives in one engine step is served together: all their inputs
are packed into as few `llama_decode` calls as fit (one seq_id per input), then each input's
pooled vector is read back and L2-normalized, as OpenAI's embeddings are.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import llama_cpp as C
import numpy as np

from pensieve.engine.config import ContextConfig
from pensieve.engine.llama import Batch, Context, LlamaError, Model
from pensieve.engine.types import EmbedRequest, EmbedResult, RequestRejected

log = logging.getLogger("pensieve.embedder")

MAX_EMBED_TOKENS = 2048  # the embeddings context: the longest input, and one decode's tokens
MAX_EMBED_SEQS = 64


@dataclass(slots=True)
class _Input:
    owner: int  # index of the request in the step's list
    tokens: list[int]
    vector: np.ndarray | None = None


def model_pooling(model: Model) -> int:
    """The pooling the GGUF asks for (`<arch>.pooling_type`); mean for generative models."""
    meta = model.metadata()
    value = meta.get(f"{meta.get('general.architecture', '')}.pooling_type")
    if value is not None and value.isdigit() and int(value) in (1, 2, 3):
        return int(value)  # mean, cls, last
    return int(C.LLAMA_POOLING_TYPE_MEAN)


class Embedder:
    def __init__(self, model: Model, n_threads: int,
                 tokenize: Callable[[str, bool], list[int]]) -> None:
        self.model = model
        self.n_embd = model.n_embd()
        self.n_ctx = min(MAX_EMBED_TOKENS, model.n_ctx_train() or MAX_EMBED_TOKENS)
        self.pooling = model_pooling(model)
        config = ContextConfig(n_ctx=self.n_ctx, n_batch=self.n_ctx, n_ubatch=self.n_ctx,
                               n_seq_max=MAX_EMBED_SEQS, n_threads=n_threads,
                               n_threads_batch=n_threads, flash_attn="auto", kv_unified=True,
                               embeddings=True, pooling=self.pooling)
        self.ctx = Context(model, config)
        self.batch = Batch(self.n_ctx)
        self._tokenize = tokenize
        log.info("embeddings context ready: %d tokens, pooling %d, %d dimensions",
                 self.n_ctx, self.pooling, self.n_embd)

    def close(self) -> None:
        self.ctx.close()

    def embed(self, requests: list[EmbedRequest]) -> list[EmbedResult | RequestRejected]:
        """Serve several requests at once; each gets its vectors or its own rejection."""
        inputs: list[_Input] = []
        replies: list[EmbedResult | RequestRejected | None] = [None] * len(requests)
        for i, req in enumerate(requests):
            prepared = self._prepare(i, req)
            if isinstance(prepared, RequestRejected):
                replies[i] = prepared
            else:
                inputs.extend(prepared)
        self._run(inputs)
        return [reply if reply is not None else _result(req, [x for x in inputs if x.owner == i])
                for i, (req, reply) in enumerate(zip(requests, replies, strict=True))]

    def _prepare(self, owner: int, req: EmbedRequest) -> list[_Input] | RequestRejected:
        prepared = []
        for item in req.inputs:
            tokens = list(item) if isinstance(item, tuple) else self._tokenize(item, True)
            if not tokens:
                return RequestRejected(req.request_id, "An input is empty: every input needs "
                                       "at least one token.", "input", "empty_input")
            if any(not 0 <= t < self.model.n_vocab for t in tokens):
                return RequestRejected(req.request_id, "A token id is outside the vocabulary "
                                       f"(0..{self.model.n_vocab - 1}).", "input",
                                       "invalid_token")
            if len(tokens) > self.n_ctx:
                if not req.truncate:
                    return RequestRejected(
                        req.request_id, f"An input is {len(tokens)} tokens long; embeddings "
                        f"take at most {self.n_ctx}.", "input", "context_length_exceeded")
                tokens = tokens[: self.n_ctx]
            prepared.append(_Input(owner, tokens))
        return prepared

    def _run(self, inputs: list[_Input]) -> None:
        pending = list(inputs)
        while pending:
            group: list[_Input] = []
            used = 0
            while pending and len(group) < MAX_EMBED_SEQS and used + len(pending[0].tokens) \
                    <= self.n_ctx:
                used += len(pending[0].tokens)
                group.append(pending.pop(0))
            self._decode(group)

    def _decode(self, group: list[_Input]) -> None:
        self.batch.clear()
        for seq_id, item in enumerate(group):
            self.batch.add(item.tokens, 0, seq_id, want_logits=True)
        self.batch.logits[: self.batch.num_tokens] = 1  # pooling reads every token's output
        try:
            rc = self.ctx.decode(self.batch)
            if rc != 0:
                raise LlamaError(f"llama_decode failed with code {rc} on the embeddings context")
            for seq_id, item in enumerate(group):
                vector = self.ctx.embedding(seq_id, self.n_embd).astype(np.float64)
                norm = float(np.linalg.norm(vector))
                item.vector = vector / norm if norm > 0 else vector
        finally:
            self.ctx.clear()


def _result(req: EmbedRequest, mine: list[_Input]) -> EmbedResult:
    vectors = []
    for item in mine:
        assert item.vector is not None  # _run embedded every input
        vectors.append(item.vector.tolist())
    return EmbedResult(req.request_id, vectors, sum(len(x.tokens) for x in mine))
