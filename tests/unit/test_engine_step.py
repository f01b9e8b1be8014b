"""Engine.step's bookkeeping on the CPU, with a scripted model runner (no model).

The fake runner plays the model: each sequence samples the tokens its test scripts for it, and
decode returns the codes a test asks for (1: llama.cpp found no KV slot). Its KV is a token list
per seq_id that checks every write lands right after what the sequence already holds, so a
bookkeeping slip (a fork not copied, a preempted sequence not recomputed from 0) fails loudly.
The engine's memory (live cache, prefix reuse, retention) is the real one, over that fake KV.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, cast

import numpy as np
import pytest

from pensieve.engine.config import ContextConfig, EngineConfig
from pensieve.engine.engine import Engine
from pensieve.engine.llama import GrammarError
from pensieve.engine.runner import DECODE_OK, token_logprob
from pensieve.engine.scheduler import ScheduledChunk
from pensieve.engine.sequence import Sequence
from pensieve.engine.types import (
    AbortRequest,
    EmbedRequest,
    EmbedResult,
    EngineRequest,
    FinishReason,
    ModelInfo,
    RequestAccepted,
    RequestRejected,
    SamplingParams,
    SeqOutput,
    Shutdown,
    StepOutput,
    TokenLogprob,
)
from pensieve.engine.worker import _serve
from pensieve.memory.config import MemoryConfig

EOS, BOS = 0, 1
FILLER = ord(".")  # sampled once a sequence's script runs out
BAD_GRAMMAR = "root ::= ("  # the fake builds the first choice's sampler, then refuses


class FakeVocab:
    """Token ids are bytes: 32..255 render as themselves; 0 is end-of-sequence, 1 BOS."""

    n_vocab = 256
    bos = BOS

    def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        return [BOS] * add_special + list(text.encode())

    def piece(self, token: int) -> bytes:
        return bytes([token]) if token >= 32 else b""

    def token_bytes(self, token: int) -> bytes:
        return {EOS: b"<eos>", BOS: b"<bos>"}.get(token, self.piece(token))

    def is_eog(self, token: int) -> bool:
        return token == EOS


class FakeKV:
    """The tokens whose KV each seq_id holds, position by position."""

    def __init__(self) -> None:
        self.cells: dict[int, list[int]] = {}
        self.copies: list[tuple[int, int, int]] = []

    def write(self, seq_id: int, start: int, tokens: list[int]) -> None:
        held = self.cells.setdefault(seq_id, [])
        assert start == len(held), f"seq {seq_id}: writes at {start} but holds {len(held)}"
        held.extend(tokens)

    def seq_remove(self, seq_id: int, p0: int = -1, p1: int = -1) -> bool:
        held = self.cells.get(seq_id, [])
        end = len(held) if p1 < 0 else p1
        del held[max(p0, 0) : end]
        return True

    def copy_prefix(self, src: int, dst: int, length: int) -> None:
        assert not self.cells.get(dst), "copied onto a seq_id that still holds KV"
        self.cells[dst] = self.cells[src][:length]
        self.copies.append((src, dst, length))

    def state_get(self, seq_id: int) -> bytes:
        return np.asarray(self.cells.get(seq_id, []), dtype=np.int32).tobytes()

    def state_set(self, seq_id: int, data: bytes) -> bool:
        self.cells[seq_id] = np.frombuffer(data, dtype=np.int32).tolist()
        return True


class FakeSampler:
    closed = False

    def sample(self, ctx: object, idx: int) -> int:
        raise AssertionError("the fake runner samples from its scripts")

    def close(self) -> None:
        self.closed = True


class FakeRunner:
    """A scripted ModelRunner (engine/runner.py)."""

    def __init__(self, *, n_ctx: int = 4096, n_ctx_limit: int = 1024, n_batch: int = 64,
                 n_seq_max: int = 4) -> None:
        self.n_ctx, self.n_ctx_limit, self.n_batch = n_ctx, n_ctx_limit, n_batch
        self.n_seq_max = n_seq_max
        self.vocab = FakeVocab()
        self.kv = FakeKV()
        self.scripts: dict[tuple[str, int], deque[int]] = {}
        self.codes: deque[int] = deque()  # decode's next return codes; then DECODE_OK
        self.decoded: list[list[tuple[str, int, int, int]]] = []  # (rid, index, start, count)
        self.sampled: list[list[tuple[str, int, int]]] = []  # (rid, index, chunk)
        self.samplers: list[FakeSampler] = []
        self.closed = False
        self._plan: list[ScheduledChunk] = []

    def script(self, rid: str, text: str, *, index: int = 0, eos: bool = True) -> None:
        self.scripts[(rid, index)] = deque([*text.encode(), *([EOS] if eos else [])])

    def new_sampler(self, params: SamplingParams, seed: int) -> FakeSampler:
        if params.grammar == BAD_GRAMMAR and self.samplers:
            raise GrammarError("llama.cpp could not parse the grammar")
        self.samplers.append(FakeSampler())
        return self.samplers[-1]

    def decode(self, plan: list[ScheduledChunk]) -> int:
        rc = self.codes.popleft() if self.codes else DECODE_OK
        if rc != DECODE_OK:
            return rc  # as llama.cpp: a failed decode leaves the KV as it was
        for c in plan:
            assert c.seq.seq_id is not None
            self.kv.write(c.seq.seq_id, c.start, c.seq.tokens[c.start : c.start + c.count])
        self.decoded.append([(c.seq.request_id, c.seq.index, c.start, c.count) for c in plan])
        self._plan = plan
        return DECODE_OK

    def sample(self, seqs: list[Sequence], chunks: list[int]) -> list[int]:
        assert all(self._plan[c].completes for c in chunks), "no logits at that chunk"
        self.sampled.append([(s.request_id, s.index, c) for s, c in zip(seqs, chunks, strict=True)])
        return [self._next(s) for s in seqs]

    def _next(self, seq: Sequence) -> int:
        script = self.scripts.get((seq.request_id, seq.index))
        return script.popleft() if script else FILLER

    def logprob(self, chunk: int, token: int, num_top: int) -> TokenLogprob:
        logits = np.linspace(-4.0, 4.0, self.vocab.n_vocab, dtype=np.float32)
        return token_logprob(logits, token, num_top, self.vocab.piece)

    def info(self) -> ModelInfo:
        return ModelInfo("fake.gguf", "fake", 0, 0, self.n_ctx, self.n_ctx_limit, self.n_ctx,
                         self.n_seq_max, self.vocab.n_vocab, None, "<bos>", "<eos>", True, 0.0)

    def embed(self, requests: list[EmbedRequest],
              tokenize: Callable[[str, bool], list[int]]) -> list[EmbedResult | RequestRejected]:
        raise NotImplementedError

    def close(self) -> None:
        self.closed = True


def make_engine(*, flash_attn: str = "off", prefix_cache: bool = True,
                prefill_chunk_while_decoding: int | None = None, kv_unified: bool = True,
                memory: MemoryConfig | None = None,
                **runner_kw: int) -> tuple[Engine, FakeRunner]:
    runner = FakeRunner(**runner_kw)
    ctx = ContextConfig(n_ctx=runner.n_ctx, n_batch=runner.n_batch, n_ubatch=runner.n_batch,
                        n_seq_max=runner.n_seq_max, n_threads=1, n_threads_batch=1,
                        flash_attn=flash_attn, kv_unified=kv_unified)
    config = EngineConfig("fake.gguf", ctx, prefix_cache=prefix_cache, memory=memory,
                          prefill_chunk_while_decoding=prefill_chunk_while_decoding)
    return Engine(config, runner), runner


def submit(engine: Engine, rid: str, prompt: str, *, add_special: bool = True,
           **params: Any) -> RequestAccepted:
    request = EngineRequest(rid, SamplingParams(**params), prompt=prompt, add_special=add_special)
    reply = engine.add_request(request)
    assert isinstance(reply, RequestAccepted), reply
    return reply


def run(engine: Engine, max_steps: int = 200) -> list[list[SeqOutput]]:
    """Step until idle; each step's outputs."""
    steps: list[list[SeqOutput]] = []
    while engine.has_work():
        assert len(steps) < max_steps, "the engine never went idle"
        steps.append(engine.step())
    return steps


def texts(steps: list[list[SeqOutput]]) -> dict[tuple[str, int], str]:
    out: dict[tuple[str, int], str] = {}
    for step in steps:
        for o in step:
            out[(o.request_id, o.index)] = out.get((o.request_id, o.index), "") + o.text
    return out


def finishes(steps: list[list[SeqOutput]]) -> dict[tuple[str, int], FinishReason]:
    return {(o.request_id, o.index): o.finish_reason for step in steps for o in step
            if o.finish_reason is not None}


# --- finishing -------------------------------------------------------------------------------
def test_end_of_sequence_finishes_and_keeps_the_computed_kv() -> None:
    engine, runner = make_engine()
    runner.script("a", "Hi")
    submit(engine, "a", "Q?", max_tokens=10)
    steps = run(engine)
    assert [[(o.text, o.token_ids, o.finish_reason) for o in s] for s in steps] == [
        [("H", [ord("H")], None)], [("i", [ord("i")], None)], [("", [EOS], FinishReason.STOP)]]
    assert steps[-1][0].num_output_tokens == 3  # the end-of-sequence token counts
    assert runner.samplers[0].closed
    assert engine.cache.num_free == runner.n_seq_max
    # the prompt and the generated tokens fed back stay for reuse; EOS was never computed
    computed = [BOS, *b"Q?", *b"Hi"]
    assert engine.cache.num_retained_tokens == len(computed)
    assert computed in runner.kv.cells.values()


def test_max_tokens_finishes_with_length_and_flushes_held_text() -> None:
    engine, runner = make_engine()
    runner.script("a", "abcdef")
    submit(engine, "a", "Q", max_tokens=3, stop=("cX",))
    steps = run(engine)
    assert [o.text for s in steps for o in s] == ["a", "b", "c"]  # "c" held, then flushed
    assert finishes(steps) == {("a", 0): FinishReason.LENGTH}
    assert steps[-1][0].num_output_tokens == 3


def test_the_context_limit_finishes_with_length() -> None:
    engine, runner = make_engine(n_ctx_limit=8)
    runner.script("a", "abcdefgh")
    submit(engine, "a", "Q")  # 2 prompt tokens: room for 6
    steps = run(engine)
    assert texts(steps) == {("a", 0): "abcdef"}
    assert finishes(steps) == {("a", 0): FinishReason.LENGTH}


def test_a_stop_string_is_held_back_and_never_sent() -> None:
    engine, runner = make_engine()
    runner.script("a", "abENxEND and more")
    submit(engine, "a", "Q", max_tokens=50, stop=("END",))
    steps = run(engine)
    # "E", "EN" could begin "END": held; "ENx" cannot: released; "END" stops it, unsent
    assert [o.text for s in steps for o in s] == ["a", "b", "", "", "ENx", "", "", ""]
    last = steps[-1][0]
    assert (last.finish_reason, last.stop_string) == (FinishReason.STOP, "END")
    assert runner.scripts[("a", 0)] == deque([*b" and more", EOS])  # nothing sampled after


def test_abort_frees_a_running_and_a_waiting_request() -> None:
    engine, runner = make_engine(n_seq_max=1)
    submit(engine, "a", "first", max_tokens=50)
    submit(engine, "b", "second", max_tokens=50)
    engine.step()
    assert (engine.scheduler.num_running, engine.scheduler.num_waiting) == (1, 1)
    engine.abort("b")  # still waiting for a seq_id
    assert engine.scheduler.num_waiting == 0 and runner.samplers[1].closed
    engine.abort("a")
    assert not engine.has_work() and runner.samplers[0].closed
    assert engine.cache.num_free == 1
    assert engine.step() == []


# --- no KV slot ------------------------------------------------------------------------------
def test_no_kv_slot_evicts_retained_kv_before_preempting() -> None:
    engine, runner = make_engine()
    runner.script("done", "x")
    submit(engine, "done", "an earlier turn")
    run(engine)
    assert engine.cache.num_retained_tokens > 0
    submit(engine, "b", "zzz", max_tokens=5, add_special=False)  # shares no prefix with it
    engine.step()
    runner.codes.append(1)
    assert engine.step() == []
    assert engine.cache.num_retained_tokens == 0
    assert engine.scheduler.num_running == 1  # nobody preempted
    assert texts(run(engine)) == {("b", 0): "...."}


def test_no_kv_slot_preempts_the_newest_which_recomputes_its_tokens() -> None:
    engine, runner = make_engine(prefix_cache=False)
    runner.script("a", "aaaaa")
    runner.script("b", "bbbbb")
    submit(engine, "a", "one", max_tokens=5)
    submit(engine, "b", "two", max_tokens=5)
    steps = [engine.step(), engine.step()]
    b = engine._requests["b"][0]
    old_id = b.seq_id
    assert old_id is not None
    runner.codes.append(1)
    assert engine.step() == []
    assert b.seq_id is None and b.num_computed == 0
    assert b.tokens == [BOS, *b"two", *b"bb"]  # its tokens are kept
    assert runner.kv.cells[old_id] == []  # its KV is not
    assert engine.scheduler.num_waiting == 1
    steps.append(engine.step())
    # a decodes on; b comes back and computes its prompt and its two tokens in one chunk
    assert runner.decoded[-1] == [("a", 0, 5, 1), ("b", 0, 0, 6)]
    steps += run(engine)
    assert texts(steps) == {("a", 0): "aaaaa", ("b", 0): "bbbbb"}
    assert finishes(steps) == {("a", 0): FinishReason.LENGTH, ("b", 0): FinishReason.LENGTH}


def test_a_failed_decode_fails_every_choice_of_every_scheduled_request() -> None:
    engine, runner = make_engine()
    submit(engine, "a", "one")
    submit(engine, "b", "two", n=2)
    runner.codes.append(-3)
    outputs = engine.step()
    assert runner.decoded == []
    # b's follower was not in the plan (it waits for the prompt's KV): it fails with its request
    assert [(o.request_id, o.index, o.finish_reason) for o in outputs] == [
        ("a", 0, FinishReason.ERROR), ("b", 0, FinishReason.ERROR), ("b", 1, FinishReason.ERROR)]
    assert all(o.error == "llama_decode failed with code -3" for o in outputs)
    assert not engine.has_work() and all(s.closed for s in runner.samplers)
    assert engine.cache.num_free == runner.n_seq_max  # every seq_id back, none held by b
    runner.script("c", "ok")
    submit(engine, "c", "three")
    assert texts(run(engine)) == {("c", 0): "ok"}  # and the engine serves on


# --- retained KV in a unified cache ---------------------------------------------------------
# Every token a step computes attends over all the cache's used cells: KV kept for later turns
# is moved out to RAM once a step computes, and comes back from there.
RAM_ONLY = MemoryConfig(ram_bytes=1 << 20, disk_bytes=0, disk_dir=None, namespace="ns",
                        block_tokens=0)


def finish_turn(engine: Engine, runner: FakeRunner, rid: str, prompt: str) -> list[int]:
    """Run one request to its end on an idle engine; the tokens its KV holds after."""
    runner.script(rid, "ok")
    submit(engine, rid, prompt)
    run(engine)
    return [BOS, *prompt.encode(), *b"ok"]


def hits(engine: Engine) -> dict[str, int]:
    assert engine.tiers is not None
    return engine.tiers.stats.hits


def test_retained_kv_leaves_the_context_for_ram_when_others_compute_and_comes_back() -> None:
    engine, runner = make_engine(memory=RAM_ONLY)
    held = finish_turn(engine, runner, "a", "first chat")
    assert held in runner.kv.cells.values()  # live while idle (and saved to RAM)
    runner.script("b", "bb")
    submit(engine, "b", "zzz", add_special=False)
    engine.step()
    assert engine.cache.num_retained == 0 and held not in runner.kv.cells.values()
    run(engine)
    runner.script("a2", "!")
    submit(engine, "a2", "first chatok more")
    before = len(runner.decoded)
    steps = run(engine)  # the follow-up finds its turn in RAM, computes only what is new
    assert hits(engine)["ram"] == 1 and hits(engine)["live"] == 0
    assert runner.decoded[before] == [("a2", 0, len(held), len(b" more"))]
    assert texts(steps) == {("a2", 0): "!"}


def test_a_follow_up_to_an_idle_engine_takes_its_kv_live() -> None:
    engine, runner = make_engine(memory=RAM_ONLY)
    held = finish_turn(engine, runner, "a", "first chat")
    runner.script("a2", "!")
    submit(engine, "a2", "first chatok more")
    engine.step()
    assert hits(engine)["live"] == 1
    assert runner.decoded[-1] == [("a2", 0, len(held), len(b" more"))]


@pytest.mark.parametrize("how", ["no slower tier", "split KV cache", "over the RAM budget"])
def test_retained_kv_stays_live_where_shedding_it_would_lose_it_or_gain_nothing(how: str) -> None:
    memory = {"no slower tier": None, "split KV cache": RAM_ONLY,
              "over the RAM budget": MemoryConfig(ram_bytes=16, disk_bytes=0, disk_dir=None,
                                                  namespace="ns", block_tokens=0)}[how]
    engine, runner = make_engine(memory=memory, kv_unified=how != "split KV cache")
    held = finish_turn(engine, runner, "a", "first chat")
    runner.script("b", "bb")
    submit(engine, "b", "zzz", add_special=False)
    run(engine)
    assert held in runner.kv.cells.values()
    runner.script("a2", "!")
    submit(engine, "a2", "first chatok more")
    engine.step()
    assert runner.decoded[-1] == [("a2", 0, len(held), len(b" more"))]


# --- several sequences -----------------------------------------------------------------------
def test_n_choices_prefill_the_prompt_once_then_copy_it() -> None:
    engine, runner = make_engine()
    for i, text in enumerate(["red", "green", "blue"]):
        runner.script("r", text, index=i)
    reply = submit(engine, "r", "Colour?", n=3, max_tokens=10)
    first = engine.step()
    assert runner.decoded == [[("r", 0, 0, reply.num_prompt_tokens)]]  # the prompt, once
    ids = [s.seq_id for s in engine._requests["r"]]
    assert runner.kv.copies == [(ids[0], ids[1], reply.num_prompt_tokens),
                                (ids[0], ids[2], reply.num_prompt_tokens)]
    assert runner.sampled == [[("r", 0, 0), ("r", 1, 0), ("r", 2, 0)]]  # all from its logits
    assert [(o.index, o.text) for o in first] == [(0, "r"), (1, "g"), (2, "b")]
    second = engine.step()
    assert runner.decoded[-1] == [("r", i, reply.num_prompt_tokens, 1) for i in range(3)]
    steps = [first, second, *run(engine)]
    assert texts(steps) == {("r", 0): "red", ("r", 1): "green", ("r", 2): "blue"}
    assert all(s.closed for s in runner.samplers)


@pytest.mark.parametrize(("flash_attn", "num_prefill_steps"), [("off", 1), ("on", 3)])
def test_requests_arriving_together_share_decodes(flash_attn: str,
                                                  num_prefill_steps: int) -> None:
    engine, runner = make_engine(flash_attn=flash_attn, prefix_cache=False)
    for rid in "abc":
        runner.script(rid, rid * 3)
        submit(engine, rid, f"prompt {rid}", max_tokens=3)
    steps = run(engine)
    # batch-invariant kernels: all prompts in one decode; otherwise one prompt per decode
    prefills = [[c[0] for c in d if c[3] > 1] for d in runner.decoded]
    assert [p for p in prefills if p] == ([["a", "b", "c"]] if num_prefill_steps == 1
                                          else [["a"], ["b"], ["c"]])
    assert len(steps[num_prefill_steps - 1]) == 3  # every stream sampled in that step
    assert texts(steps) == {(rid, 0): rid * 3 for rid in "abc"}


def test_a_long_prompt_is_chunked_while_a_stream_decodes() -> None:
    engine, runner = make_engine(prefill_chunk_while_decoding=8, prefix_cache=False)
    runner.script("short", "s" * 10)
    submit(engine, "short", "hi", max_tokens=10)
    engine.step()
    long = submit(engine, "long", "x" * 30, max_tokens=1)  # 31 tokens with BOS
    while engine._requests.get("long") is not None:
        outputs = engine.step()
        assert [o.request_id for o in outputs][:1] == ["short"]  # a token every step
    chunks = [c[3] for d in runner.decoded for c in d if c[0] == "long"]
    assert chunks == [8, 8, 8, 7] and sum(chunks) == long.num_prompt_tokens


# --- what a step reports ---------------------------------------------------------------------
def test_outputs_carry_prompt_cached_and_output_counts() -> None:
    engine, runner = make_engine()
    runner.script("t1", "yes")
    first = submit(engine, "t1", "Shall we?")
    run(engine)
    runner.script("t2", "ok")
    second = submit(engine, "t2", "Shall we?yes. Go on")  # turn 1's KV is reused
    steps = run(engine)
    cached = first.num_prompt_tokens + len("yes")
    assert runner.decoded[-3] == [("t2", 0, cached, second.num_prompt_tokens - cached)]
    outs = [o for s in steps for o in s]
    assert {(o.num_prompt_tokens, o.num_cached_tokens) for o in outs} == {
        (second.num_prompt_tokens, cached)}
    assert [o.num_output_tokens for o in outs] == [1, 2, 3]
    assert all(o.logprobs is None for o in outs)


class FakeConn:
    """The worker's end of the pipe: hands over queued messages, then Shutdown once idle."""

    def __init__(self, *messages: object) -> None:
        self.inbox = deque(messages)
        self.sent: list[StepOutput] = []

    def poll(self, timeout: float | None) -> bool:
        if not self.inbox and timeout is None:  # idle and told nothing more: stop
            self.inbox.append(Shutdown())
        return bool(self.inbox)

    def recv(self) -> object:
        return self.inbox.popleft()

    def send(self, msg: StepOutput) -> None:
        self.sent.append(msg)


def test_the_worker_sends_one_step_output_per_step() -> None:
    engine, runner = make_engine()
    runner.script("a", "ok")
    conn = FakeConn(EngineRequest("a", SamplingParams(), prompt="Hello"),
                    AbortRequest("nobody"))
    _serve(cast(Connection, conn), engine)
    summary = [([type(o).__name__ for o in m.outputs], m.num_running, m.num_waiting,
                m.num_batch_tokens, m.memory is not None) for m in conn.sent]
    assert summary == [
        (["RequestAccepted", "SeqOutput"], 1, 0, 6, True),  # prompt and first token together
        (["SeqOutput"], 1, 0, 1, False),  # memory counters only now and then
        (["SeqOutput"], 0, 0, 1, False),  # the end-of-sequence step
    ]
    assert [o.text for m in conn.sent for o in m.outputs if isinstance(o, SeqOutput)] == [
        "o", "k", ""]


def test_logprobs_are_attached_only_when_asked() -> None:
    engine, runner = make_engine()
    runner.script("lp", "ab", eos=False)
    submit(engine, "lp", "Q", max_tokens=2, logprobs=True, top_logprobs=3)
    outs = [o for s in run(engine) for o in s]
    assert [o.logprobs[0].token_id for o in outs if o.logprobs] == [ord("a"), ord("b")]
    assert all(len(o.logprobs[0].top) == 3 for o in outs if o.logprobs)


def test_token_logprob_is_a_log_softmax_with_the_top_tokens_first() -> None:
    logits = np.array([1.0, 3.0, 2.0, 4.0], dtype=np.float32)
    lp = token_logprob(logits, 2, 2, lambda t: bytes([65 + t]))
    total = sum(math.exp(x) for x in logits)
    assert (lp.token_id, lp.token) == (2, b"C")
    assert lp.logprob == pytest.approx(math.log(math.exp(2.0) / total), rel=1e-6)
    assert [(t, p) for t, p, _ in lp.top] == [(3, b"D"), (1, b"B")]
    assert lp.top[0][2] == pytest.approx(math.log(math.exp(4.0) / total), rel=1e-6)


# --- rejected requests -----------------------------------------------------------------------
@pytest.mark.parametrize(("request_", "code"), [
    (EngineRequest("long", SamplingParams(), prompt="x" * 40), "context_length_exceeded"),
    (EngineRequest("empty", SamplingParams(), prompt_tokens=()), "empty_prompt"),
    (EngineRequest("vocab", SamplingParams(), prompt_tokens=(5, 999)), "invalid_token"),
    (EngineRequest("n", SamplingParams(n=5), prompt="hi"), "invalid_value"),
    (EngineRequest("g", SamplingParams(grammar=BAD_GRAMMAR, n=2), prompt="hi"),
     "invalid_grammar"),
])
def test_a_request_the_engine_cannot_serve_is_rejected(request_: EngineRequest,
                                                       code: str) -> None:
    engine, runner = make_engine(n_ctx_limit=32)
    reply = engine.add_request(request_)
    assert isinstance(reply, RequestRejected) and reply.code == code
    assert not engine.has_work()
    assert all(s.closed for s in runner.samplers)  # none left open, even half a group


def test_a_duplicate_request_id_is_rejected() -> None:
    engine, _ = make_engine()
    submit(engine, "a", "hi")
    reply = engine.add_request(EngineRequest("a", SamplingParams(), prompt="hi"))
    assert isinstance(reply, RequestRejected) and reply.message == "duplicate request id"


def test_close_releases_samplers_then_the_runner() -> None:
    engine, runner = make_engine()
    submit(engine, "a", "hi")
    engine.step()
    engine.close()
    assert runner.samplers[0].closed and runner.closed
