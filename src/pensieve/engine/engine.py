"""The engine: requests in, one batched `llama_decode` per step, token outputs out.

Each `step()` reads as schedule -> run -> postprocess. The engine is single-threaded and owns its
model runner (runner.py: the llama context, or a scripted fake in the unit tests); the worker
process drives it (see worker.py).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterable
from typing import Any

import numpy as np

from pensieve.engine.config import EngineConfig
from pensieve.engine.detokenizer import IncrementalDetokenizer
from pensieve.engine.llama import GrammarError
from pensieve.engine.runner import DECODE_NO_KV_SLOT, DECODE_OK, LlamaRunner, ModelRunner
from pensieve.engine.scheduler import ScheduledChunk, Scheduler
from pensieve.engine.sequence import Sequence
from pensieve.engine.types import (
    DetokenizeResult,
    EmbedRequest,
    EmbedResult,
    EngineRequest,
    FinishReason,
    ModelInfo,
    RequestAccepted,
    RequestRejected,
    SamplingParams,
    SeqOutput,
)
from pensieve.memory.live import LiveCache
from pensieve.memory.prefix import Tier
from pensieve.memory.tiered import TieredStore

log = logging.getLogger("pensieve.engine")

_READ_POLL_S = 0.002  # how often an idle engine looks whether a read ahead is done


class Engine:
    def __init__(self, config: EngineConfig, runner: ModelRunner | None = None) -> None:
        self.runner: ModelRunner = runner if runner is not None else LlamaRunner(config)
        self.vocab = self.runner.vocab
        self.n_ctx_limit = self.runner.n_ctx_limit
        batch_invariant = config.context.flash_attn == "off" or not config.context.kv_unified
        self.tiers = (TieredStore(config.memory)
                      if config.memory is not None and config.prefix_cache else None)
        self.cache = LiveCache(self.runner.n_seq_max, self.runner.kv, enabled=config.prefix_cache,
                               tiers=self.tiers)
        self.scheduler = Scheduler(
            cache=self.cache, n_ctx=self.runner.n_ctx, token_budget=self.runner.n_batch,
            max_prefills=None if batch_invariant else 1,
            reuse_generated=config.reuse_generated,
            prefill_chunk_while_decoding=config.prefill_chunk_while_decoding,
        )
        self._requests: dict[str, list[Sequence]] = {}
        self.num_batch_tokens = 0
        # Retained KV in a unified cache slows every computed token (memory/live.py, shed);
        # in a split one each sequence attends over its own stream only.
        self._shed_retained = self.tiers is not None and config.context.kv_unified

    def close(self) -> None:
        for group in self._requests.values():
            for seq in group:
                seq.release()
        self._requests.clear()
        if self.tiers is not None:
            self.cache.save_retained()
            self.tiers.close()  # waits for queued disk writes
        self.runner.close()

    def info(self) -> ModelInfo:
        return self.runner.info()

    def memory_summary(self) -> dict[str, object]:
        summary: dict[str, object] = {"live_retained_tokens": self.cache.num_retained_tokens}
        if self.tiers is not None:
            summary.update(self.tiers.summary())
        return summary

    def memory_entries(self) -> list[dict[str, object]]:
        """Every remembered prefix, by key, with the tiers holding it (no text)."""
        self.cache.save_retained()  # list what a restart would find
        now = time.monotonic()
        by_key: dict[str, dict[str, Any]] = {}  # JSON rows
        for key, num_tokens in self.cache.entries():
            by_key[key] = {"key": key, "num_tokens": num_tokens, "tiers": [Tier.LIVE.value]}
        for row in self.tiers.entries() if self.tiers is not None else []:
            entry = by_key.setdefault(row.key, {"key": row.key, "num_tokens": row.num_tokens,
                                                    "tiers": []})
            entry["tiers"].append(row.tier.value)
            entry[f"{row.tier.value}_bytes"] = row.num_bytes
            if row.num_blocks:
                entry.update(blocks=row.num_blocks, shared_blocks=row.num_shared)
            if row.last_used:
                entry["idle_s"] = round(now - row.last_used, 1)
        return sorted(by_key.values(), key=lambda e: -int(e["num_tokens"]))

    def memory_delete(self, key: str | None) -> int:
        """Forget one prefix (or everything, with None) in every tier; returns entries removed."""
        keys = [key] if key is not None else [str(e["key"]) for e in self.memory_entries()]
        removed = 0
        for k in keys:
            removed += int(self.cache.drop_key(k))
            if self.tiers is not None:
                removed += self.tiers.delete(k)
        if key is None and self.tiers is not None:
            self.tiers.clear()
        return removed

    # --- requests ---------------------------------------------------------------------------
    def has_work(self) -> bool:
        return self.scheduler.has_work() or self.cache.has_unsaved

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        tokens = self.vocab.tokenize(text, add_special=add_special)
        bos = self.vocab.bos
        if len(tokens) >= 2 and tokens[0] == bos and tokens[1] == bos:
            tokens = tokens[1:]  # the chat template already wrote BOS
        return tokens

    def detokenize(self, request_id: str,
                   tokens: tuple[int, ...]) -> DetokenizeResult | RequestRejected:
        """The text of these token ids, special tokens included (as llama-server's)."""
        problem = self._outside_vocab(tokens, "Token id")
        if problem is not None:
            return RequestRejected(request_id, problem, param="tokens", code="invalid_token")
        data = b"".join(self.vocab.token_bytes(t) for t in tokens)
        return DetokenizeResult(request_id, data.decode("utf-8", errors="replace"))

    def add_request(self, req: EngineRequest) -> RequestAccepted | RequestRejected:
        if req.request_id in self._requests:
            return RequestRejected(req.request_id, "duplicate request id")
        if req.prompt_tokens is not None:
            tokens = list(req.prompt_tokens)
        else:
            tokens = self.tokenize(req.prompt or "", req.add_special)
        problem = (self._validate(tokens) or self._validate_limit(tokens, req.params)
                   or self._validate_params(req))
        if problem is not None:
            return RequestRejected(req.request_id, problem[0], param=problem[1],
                                   code=problem[2])
        try:
            group = self._make_group(req, tokens)
        except GrammarError as exc:
            return RequestRejected(req.request_id, str(exc), param="grammar",
                                   code="invalid_grammar")
        if self.tiers is not None and req.use_cache:
            read = self.tiers.prefetch(np.asarray(tokens[:-1], dtype=np.int32))
            if read is not None:
                group[0].restore_ready = read.done
                group[0].read_is_remote = read.is_remote
        self._requests[req.request_id] = group
        self.scheduler.add(group)
        return RequestAccepted(req.request_id, len(tokens))

    def _validate(self, tokens: list[int]) -> tuple[str, str, str] | None:
        if not tokens:
            return ("The prompt is empty: send at least one token of input.", "messages",
                    "empty_prompt")
        if len(tokens) >= self.n_ctx_limit:
            return (
                f"This model's maximum context length is {self.n_ctx_limit} tokens, but the "
                f"prompt is {len(tokens)} tokens long. Shorten the prompt, or start the server "
                "with a larger --ctx-size (or fewer --parallel sequences when the KV cache is "
                "split per sequence).",
                "messages",
                "context_length_exceeded",
            )
        problem = self._outside_vocab(tokens, "Token id")
        return None if problem is None else (problem, "prompt", "invalid_token")

    def _validate_limit(self, tokens: list[int],
                        p: SamplingParams) -> tuple[str, str, str] | None:
        """The request's own context limit (Ollama's num_ctx), within the server's."""
        if p.max_context is None or len(tokens) < p.max_context:
            return None
        return (f"The prompt is {len(tokens)} tokens long, but the request limits its context "
                f"to {p.max_context} tokens (num_ctx). Shorten the prompt or raise num_ctx "
                f"(at most {self.n_ctx_limit}).", "options.num_ctx", "context_length_exceeded")

    def _outside_vocab(self, tokens: Iterable[int], what: str) -> str | None:
        """Why these token ids cannot be used, or None when all are in the vocabulary."""
        n_vocab = self.vocab.n_vocab
        bad = next((t for t in tokens if not 0 <= t < n_vocab), None)
        if bad is None:
            return None
        return f"{what} {bad} is outside the vocabulary (0..{n_vocab - 1})."

    def _validate_params(self, req: EngineRequest) -> tuple[str, str, str] | None:
        problem = self._outside_vocab((t for t, _ in req.params.logit_bias), "logit_bias token")
        if problem is not None:
            return (problem, "logit_bias", "invalid_token")
        if req.params.grammar is not None and req.params.ignore_eos:
            return ("ignore_eos cannot be combined with a grammar, a JSON response_format or "
                    "tools: the grammar decides where the output ends.", "ignore_eos",
                    "invalid_value")
        if req.params.n > self.runner.n_seq_max:
            return (f"n={req.params.n} is more than this server's --parallel "
                    f"({self.runner.n_seq_max}) sequences.", "n", "invalid_value")
        return None

    def _make_group(self, req: EngineRequest, tokens: list[int]) -> list[Sequence]:
        p = req.params
        room = min(self.n_ctx_limit, p.max_context or self.n_ctx_limit) - len(tokens)
        max_tokens = min(p.max_tokens, room) if p.max_tokens is not None else room
        base_seed = p.seed if p.seed is not None else random.getrandbits(31)
        group: list[Sequence] = []
        try:
            for i in range(p.n):
                group.append(self._make_sequence(req, tokens, max_tokens, base_seed, i, group))
        except GrammarError:
            for seq in group:
                seq.release()
            raise
        group[0].followers = group[1:]
        return group

    def _make_sequence(self, req: EngineRequest, tokens: list[int], max_tokens: int,
                       base_seed: int, i: int, group: list[Sequence]) -> Sequence:
        p = req.params
        return Sequence(
            request_id=req.request_id,
            index=i,
            params=p,
            tokens=list(tokens),
            num_prompt=len(tokens),
            max_tokens=max_tokens,
            detok=IncrementalDetokenizer(self.vocab.piece, p.stop),
            sampler=self.runner.new_sampler(p, (base_seed + i) & 0xFFFFFFFF),
            leader=group[0] if group else None,
            use_cache=req.use_cache,
        )

    def embed(self, requests: list[EmbedRequest]) -> list[EmbedResult | RequestRejected]:
        """Embed every input of these requests, batched together."""
        return self.runner.embed(requests, self.tokenize)

    def abort(self, request_id: str) -> None:
        group = self._requests.pop(request_id, None)
        if group is None:
            return
        self.scheduler.remove_request(request_id)
        for seq in group:
            seq.release()

    # --- the step ---------------------------------------------------------------------------
    def step(self) -> list[SeqOutput]:
        plan = self.scheduler.schedule()
        if not plan:
            self.cache.save_retained()  # idle: now a finished turn's KV goes to RAM and disk
            if self.scheduler.waiting:  # only reads ahead hold them back: do not spin
                time.sleep(_READ_POLL_S)
            return []
        if self._shed_retained and self.cache.num_retained:
            self.cache.shed()
        rc = self.runner.decode(plan)
        if rc == DECODE_NO_KV_SLOT:
            return self._on_no_kv_room()
        if rc != DECODE_OK:
            return self._fail_plan(plan, f"llama_decode failed with code {rc}")
        num_tokens = 0
        for chunk in plan:
            chunk.seq.num_computed += chunk.count
            num_tokens += chunk.count
        self.num_batch_tokens = num_tokens
        seqs, chunks = self._to_sample(plan)
        if not seqs:
            return []
        tokens = self.runner.sample(seqs, chunks)
        return [self._emit(seq, token, chunk)
                for seq, token, chunk in zip(seqs, tokens, chunks, strict=True)]

    def _to_sample(self, plan: list[ScheduledChunk]) -> tuple[list[Sequence], list[int]]:
        """Who samples this step, and from which chunk's logits: each sequence whose chunk
        computed its last token, and the n > 1 followers forked from it just now."""
        seqs: list[Sequence] = []
        chunks: list[int] = []
        for i, chunk in enumerate(plan):
            leader = chunk.seq
            forked = self._fork_followers(leader) if leader.followers else ()
            if leader.num_computed != len(leader.tokens):  # more to compute: no logits yet
                continue
            seqs.append(leader)
            chunks.append(i)
            for f in forked:
                if f.num_pending == 0:
                    seqs.append(f)
                    chunks.append(i)
        return seqs, chunks

    def _fork_followers(self, leader: Sequence) -> list[Sequence]:
        """n > 1: once the leader's prompt KV exists, copy it to the waiting followers."""
        if leader.num_computed < leader.num_prompt:
            return []
        forked = []
        for f in leader.followers:
            if f.waits_for_leader and f.seq_id is not None and not f.is_finished:
                assert leader.seq_id is not None
                self.runner.kv.copy_prefix(leader.seq_id, f.seq_id, leader.num_prompt)
                f.num_computed = f.num_prompt
                forked.append(f)
        return forked

    def _emit(self, seq: Sequence, token: int, chunk: int) -> SeqOutput:
        """Append a sampled token; its output, with text, finishing the sequence when it ends."""
        seq.tokens.append(token)
        out = SeqOutput(
            request_id=seq.request_id,
            index=seq.index,
            token_ids=[token],
            num_prompt_tokens=seq.num_prompt,
            num_cached_tokens=(seq.leader or seq).num_cached,
            num_output_tokens=seq.num_output,
        )
        if seq.params.logprobs:
            out.logprobs = [self.runner.logprob(chunk, token, seq.params.top_logprobs)]
        if self.vocab.is_eog(token) and not seq.params.ignore_eos:
            out.text = seq.detok.flush()
            return self._finish(seq, out, FinishReason.STOP)
        out.text = seq.detok.add_token(token)
        if seq.detok.stopped:
            out.stop_string = seq.detok.matched_stop
            return self._finish(seq, out, FinishReason.STOP)
        if seq.num_output >= seq.max_tokens or len(seq.tokens) >= self.n_ctx_limit:
            out.text += seq.detok.flush()
            return self._finish(seq, out, FinishReason.LENGTH)
        return out

    def _finish(self, seq: Sequence, out: SeqOutput, reason: FinishReason) -> SeqOutput:
        out.finish_reason = reason
        out.num_output_tokens = seq.num_output
        seq.finish_reason = reason
        self.scheduler.finish(seq)
        group = self._requests.get(seq.request_id)
        if group is not None and all(s.is_finished for s in group):
            for s in self._requests.pop(seq.request_id):
                s.release()
        return out

    def _on_no_kv_room(self) -> list[SeqOutput]:
        if self.cache.evict_one():  # retained KV of finished requests goes first
            return []
        victim = self.scheduler.preempt_newest()
        if victim is not None:
            log.warning("KV cache full: request %s preempted, to be recomputed", victim.request_id)
        return []

    def _fail_plan(self, plan: list[ScheduledChunk], message: str) -> list[SeqOutput]:
        """Fail every request with a chunk in the plan: each of its choices, those not in the
        plan too (n > 1 followers waiting for the leader's prompt), so it ends here."""
        request_ids = list(dict.fromkeys(chunk.seq.request_id for chunk in plan))
        log.error("%s; failing %d requests", message, len(request_ids))
        outputs = []
        for request_id in request_ids:
            for seq in list(self._requests.get(request_id, ())):
                if seq.is_finished:
                    continue
                out = SeqOutput(seq.request_id, seq.index, error=message,
                                num_prompt_tokens=seq.num_prompt)
                outputs.append(self._finish(seq, out, FinishReason.ERROR))
        return outputs
