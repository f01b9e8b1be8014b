"""Decides, each step, which tokens of which sequences go into the one `llama_decode` call.

Policy (continuous batching with chunked prefill):
1. every running sequence that is decoding gets its one new token;
2. sequences still catching up on their prompt get chunks, oldest first, from what is left of the
   step's token budget, so a long prompt never stalls the running streams;
3. waiting requests are admitted, oldest first, while a seq_id, the token budget and KV cells allow.
With `max_prefills` set, at most that many multi-token chunks share a step: llama.cpp's CPU flash
attention over a unified KV cache gives slightly different logits when two prompts are prefilled
in one ubatch, and that would make a request's output depend on what else was in the batch.
When llama.cpp finds no KV room anyway, the newest running request is preempted: its KV is dropped
and it goes back to the head of the queue to be recomputed later (its tokens are kept).

4. with the step's prefill slot still free and nobody waiting, one "settle" job gets a chunk: it
   recomputes a finished answer's tokens the way a prompt is computed, on top of the retained KV of
   its prompt, so the memory then holds the whole conversation as exact prompt KV and the next
   turn computes only its new message (see `Engine._settle`). Settling is background work that
   only runs in otherwise idle steps: a prompt chunk in a step changes the matmul paths of the
   streams decoding beside it, and background work must never change an answer. A request
   continuing the same conversation cancels it and picks up what was settled so far.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from pensieve.engine.sequence import SeqStatus, Sequence
from pensieve.memory.live import LiveCache

# Cells set aside for each running sequence's next tokens when admitting a new one.
_DECODE_HEADROOM = 32
# Largest settle chunk in a step: bounds how long a request arriving mid-step waits (~0.2 s).
_SETTLE_CHUNK = 64
# Settle jobs queued at most; older ones are dropped (their answers are recomputed if needed).
_MAX_SETTLE_JOBS = 64


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
                 max_prefills: int | None = None, reuse_generated: bool = False) -> None:
        self.cache = cache
        self.reuse_generated = reuse_generated
        self.n_ctx = n_ctx
        self.token_budget = token_budget
        self.max_prefills = max_prefills
        self.waiting: deque[list[Sequence]] = deque()  # one group (the n choices) per request
        self.running: list[Sequence] = []
        self.settle_jobs: deque[Sequence] = deque()  # background: finished answers to settle
        self.settling: Sequence | None = None  # the settle job holding a seq_id, if any

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting or self.settling
                     or (self.settle_jobs and self.cache.num_free > 0))

    def add(self, group: list[Sequence]) -> None:
        self.waiting.append(group)

    def add_settle(self, job: Sequence) -> None:
        self.settle_jobs.append(job)
        while len(self.settle_jobs) > _MAX_SETTLE_JOBS:
            self.settle_jobs.popleft()

    def schedule(self) -> list[ScheduledChunk]:
        budget = self.token_budget
        prefills = self.max_prefills if self.max_prefills is not None else self.token_budget
        plan: list[ScheduledChunk] = []
        for seq in self.running:
            if seq.is_decoding:
                plan.append(ScheduledChunk(seq, seq.num_computed, 1))
                budget -= 1
        for seq in self.running:
            if budget <= 0 or prefills <= 0:
                break
            if not seq.is_decoding and not seq.waits_for_leader:
                count = min(seq.num_pending, budget)
                plan.append(ScheduledChunk(seq, seq.num_computed, count))
                budget -= count
                prefills -= count > 1
        while budget > 0 and prefills > 0 and self.waiting and self._can_admit(self.waiting[0]):
            group = self.waiting.popleft()
            self._admit(group)
            leader = group[0]
            count = min(leader.num_pending, budget)
            plan.append(ScheduledChunk(leader, leader.num_computed, count))
            budget -= count
            prefills -= count > 1
        if not plan and not self.waiting:  # idle: settle a finished answer, a chunk at a time
            chunk = self._settle_chunk(min(budget, _SETTLE_CHUNK))
            if chunk is not None:
                plan.append(chunk)
        return plan

    # --- settling finished answers (background) ---------------------------------------------
    def _settle_chunk(self, budget: int) -> ScheduledChunk | None:
        while self.settling is None and self.settle_jobs:
            self._start_settle(self.settle_jobs.popleft())
        job = self.settling
        if job is None:
            return None
        return ScheduledChunk(job, job.num_computed, min(job.num_pending, budget))

    def _start_settle(self, job: Sequence) -> None:
        if self.cache.num_free == 0 or not self._fits(len(job.tokens) - job.num_cached, 1):
            return
        running = [(s.seq_id, s.tokens[: self._num_reusable(s)]) for s in self.running
                   if s.seq_id is not None]
        acquired = self.cache.acquire(job.tokens, running, count=False)
        job.seq_id, job.num_computed = acquired.seq_id, acquired.num_reused
        if acquired.num_reused < job.num_cached:  # its prompt's KV is gone: not worth it
            self.stop_settling(job, retain=True)
            return
        job.status = SeqStatus.RUNNING
        self.settling = job

    def finish_settle(self, job: Sequence) -> None:
        self.stop_settling(job, retain=True)

    def stop_settling(self, job: Sequence | None = None, *, retain: bool) -> None:
        """Give the settle job's seq_id back, keeping the KV computed so far when `retain`."""
        job = job or self.settling
        if job is None:
            return
        if job.seq_id is not None:
            kept = job.tokens[: job.num_computed] if retain else None
            self.cache.release(job.seq_id, kept)
            job.seq_id = None
        job.status = SeqStatus.FINISHED
        if job is self.settling:
            self.settling = None

    def _cancel_settles_continued_by(self, tokens: list[int]) -> None:
        """A new request continues these conversations: it computes their answers itself."""
        def continued(job: Sequence) -> bool:
            n = job.num_cached
            return len(tokens) >= n and tokens[:n] == job.tokens[:n]
        self.settle_jobs = deque(j for j in self.settle_jobs if not continued(j))
        if self.settling is not None and continued(self.settling):
            self.stop_settling(retain=True)

    def _can_admit(self, group: list[Sequence]) -> bool:
        if self.cache.num_free < len(group) and self.settling is not None:
            self.stop_settling(retain=True)  # requests come before background work
        if self.cache.num_free < len(group):
            return False
        if not self.running and self.settling is None:
            return True
        needed = len(group[0].tokens) + sum(s.num_output for s in group[1:])
        if self._fits(needed, len(group)):
            return True
        self.stop_settling(retain=False)
        return self._fits(needed, len(group))

    def _fits(self, needed: int, num_new: int) -> bool:
        """Whether `needed` more KV cells fit, evicting retained KV of finished requests."""
        used = sum(len(s.tokens) for s in self.running)
        if self.settling is not None:
            used += len(self.settling.tokens)
        reserve = _DECODE_HEADROOM * (len(self.running) + num_new)
        while used + needed + reserve + self.cache.num_retained_tokens > self.n_ctx:
            if not self.cache.evict_one():
                return False
        return True

    def _admit(self, group: list[Sequence]) -> None:
        leader = group[0]
        if leader.use_cache:
            self._cancel_settles_continued_by(leader.tokens)
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

        By default only the prompt's: generated tokens' KV was computed one token per step,
        along other llama.cpp kernels than a prompt chunk, so reusing it can shift a later
        answer at a near-tie, while prompt KV is bit-identical however it was chunked.
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
