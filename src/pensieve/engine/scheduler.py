"""Decides, each step, which tokens of which sequences go into the one `llama_decode` call.

Policy (continuous batching with chunked prefill):
1. every running sequence that is decoding gets its one new token;
2. sequences still catching up on their prompt get chunks, oldest first, from what is left of the
   step's token budget, so a long prompt never stalls the running streams;
3. waiting requests are admitted, oldest first, while a seq_id, the token budget and KV cells allow;
   one whose remembered KV is still being read from disk waits (while others run) and lets the
   requests behind it go first, so the disk read overlaps with their computation; a read from
   the shared tier is waited for even when nothing else runs, up to its deadline.
With `max_prefills` set, at most that many multi-token chunks share a step: llama.cpp's CPU flash
attention over a unified KV cache gives slightly different logits when two prompts are prefilled
in one ubatch, and that would make a request's output depend on what else was in the batch.
When llama.cpp finds no KV room anyway, the newest running request is preempted: its KV is dropped
and it goes back to the head of the queue to be recomputed later (its tokens are kept).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from pensieve.engine.sequence import SeqStatus, Sequence
from pensieve.memory.live import LiveCache

# Cells set aside for each running sequence's next tokens when admitting a new one.
_DECODE_HEADROOM = 32


@dataclass(frozen=True, slots=True)
class ScheduledChunk:
    seq: Sequence
    start: int  # first token index (== its KV position)
    count: int

    @property
    def completes(self) -> bool:
        """After this chunk the sequence has computed all its tokens and samples the next one."""
        return self.start + self.count == len(self.seq.tokens)


class Scheduler:
    def __init__(self, *, cache: LiveCache, n_ctx: int, token_budget: int,
                 max_prefills: int | None = None, reuse_generated: bool = False,
                 prefill_chunk_while_decoding: int | None = None) -> None:
        self.cache = cache
        self.reuse_generated = reuse_generated
        self.n_ctx = n_ctx
        self.token_budget = token_budget
        self.max_prefills = max_prefills
        # On a CPU a step costs about the same per token, prompt or generated: capping the
        # prompt tokens of steps that also decode bounds how long running streams stall when
        # a long prompt arrives, at almost no cost in throughput.
        self.prefill_chunk_while_decoding = prefill_chunk_while_decoding
        self.waiting: deque[list[Sequence]] = deque()  # one group (the n choices) per request
        self.running: list[Sequence] = []

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def add(self, group: list[Sequence]) -> None:
        self.waiting.append(group)

    def schedule(self) -> list[ScheduledChunk]:
        budget = self.token_budget
        prefills = self.max_prefills if self.max_prefills is not None else self.token_budget
        plan: list[ScheduledChunk] = []
        for seq in self.running:
            if seq.is_decoding:
                plan.append(ScheduledChunk(seq, seq.num_computed, 1))
                budget -= 1
        if plan and self.prefill_chunk_while_decoding is not None:
            budget = min(budget, self.prefill_chunk_while_decoding)
        for seq in self.running:
            if budget <= 0 or prefills <= 0:
                break
            if not seq.is_decoding and not seq.waits_for_leader:
                count = min(seq.num_pending, budget)
                plan.append(ScheduledChunk(seq, seq.num_computed, count))
                budget -= count
                prefills -= count > 1
        for group in list(self.waiting):
            if budget <= 0 or prefills <= 0:
                break
            if (self.running or group[0].read_is_remote) and not group[0].is_restore_ready:
                continue  # its KV is still being read: others compute meanwhile
            if not self._can_admit(group):
                break
            self.waiting.remove(group)
            self._admit(group)
            leader = group[0]
            count = min(leader.num_pending, budget)
            plan.append(ScheduledChunk(leader, leader.num_computed, count))
            budget -= count
            prefills -= count > 1
        return plan

    def _can_admit(self, group: list[Sequence]) -> bool:
        if self.cache.num_free < len(group):
            return False
        if not self.running:
            return True
        used = sum(len(s.tokens) for s in self.running)
        reserve = _DECODE_HEADROOM * (len(self.running) + len(group))
        needed = len(group[0].tokens) + sum(s.num_output for s in group[1:])
        while used + needed + reserve + self.cache.num_retained_tokens > self.n_ctx:
            if not self.cache.evict_one():
                return False
        return True

    def _admit(self, group: list[Sequence]) -> None:
        leader = group[0]
        running = [(s.seq_id, s.tokens[: self._num_reusable(s)]) for s in self.running
                   if s.seq_id is not None]
        for seq in group:
            is_leader = seq is leader or seq.leader is None
            acquired = self.cache.acquire(seq.tokens, running, reuse=is_leader and seq.use_cache)
            seq.seq_id = acquired.seq_id
            if is_leader:
                seq.num_computed = acquired.num_reused
                if seq.num_output == 0:
                    seq.num_cached = acquired.num_reused
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)

    def preempt_newest(self) -> Sequence | None:
        """Take the most recently admitted request's group off the context (for recompute)."""
        if not self.running:
            return None
        newest = self.running[-1]
        leader = newest.leader or newest
        group = [leader, *leader.followers]
        for seq in group:
            if seq in self.running:
                self._evict(seq, retain=False)
                seq.status = SeqStatus.WAITING
                seq.num_computed = 0
        alive = [s for s in group if not s.is_finished]
        if leader.is_finished:  # nobody left to fork from: each recomputes its own tokens
            for seq in alive:
                seq.leader = None
        self.waiting.appendleft(alive)
        return leader

    def finish(self, seq: Sequence) -> None:
        """Remove a sequence from the running set; its KV stays for reuse by later requests."""
        self._evict(seq, retain=True)
        seq.status = SeqStatus.FINISHED

    def remove_request(self, request_id: str) -> None:
        """Drop every sequence of a request, waiting or running."""
        for group in [g for g in self.waiting if g and g[0].request_id == request_id]:
            self.waiting.remove(group)
            for seq in group:
                seq.status = SeqStatus.FINISHED
        for seq in [s for s in self.running if s.request_id == request_id]:
            self.finish(seq)

    def _num_reusable(self, seq: Sequence) -> int:
        """Tokens whose KV later requests may reuse.

        With `reuse_generated` (the server's default) all of them; without, only the prompt's:
        generated tokens' KV was computed one token per step, along other llama.cpp kernels
        than a prompt chunk, so reusing it can shift a later answer at a near-tie, while prompt
        KV is bit-identical however it was chunked.
        """
        if self.reuse_generated:
            return seq.num_computed
        return min(seq.num_computed, seq.num_prompt)

    def _evict(self, seq: Sequence, *, retain: bool) -> None:
        if seq in self.running:
            self.running.remove(seq)
        if seq.seq_id is not None:
            kept = seq.tokens[: self._num_reusable(seq)] if retain else None
            self.cache.release(seq.seq_id, kept)
            seq.seq_id = None
