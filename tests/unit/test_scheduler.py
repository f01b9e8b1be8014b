"""Scheduler policy with scripted sequences (no model)."""

from __future__ import annotations

from pensieve.engine.detokenizer import IncrementalDetokenizer
from pensieve.engine.scheduler import Scheduler
from pensieve.engine.sequence import SeqStatus, Sequence
from pensieve.engine.types import SamplingParams
from pensieve.memory.live import LiveCache


class FakeKV:
    """Records what the cache asks of the llama context."""

    def __init__(self) -> None:
        self.removed: list[tuple[int, int, int]] = []
        self.copied: list[tuple[int, int, int, int]] = []

    def seq_remove(self, seq_id: int, p0: int = -1, p1: int = -1) -> bool:
        self.removed.append((seq_id, p0, p1))
        return True

    def copy_prefix(self, src: int, dst: int, length: int) -> None:
        self.copied.append((src, dst, 0, length))


def make_scheduler(n_seq_max: int, n_ctx: int, token_budget: int, **kw) -> Scheduler:
    cache = LiveCache(n_seq_max, FakeKV(), enabled=kw.pop("prefix_cache", False))
    return Scheduler(cache=cache, n_ctx=n_ctx, token_budget=token_budget, **kw)


class FakeSampler:
    closed = False

    def close(self) -> None:
        self.closed = True


def make_group(rid: str, num_prompt: int, n: int = 1, max_tokens: int = 16,
               first: int = 0) -> list[Sequence]:
    group: list[Sequence] = []
    for i in range(n):
        group.append(Sequence(
            request_id=rid, index=i, params=SamplingParams(n=n),
            tokens=list(range(first, first + num_prompt)),
            num_prompt=num_prompt, max_tokens=max_tokens,
            detok=IncrementalDetokenizer(lambda t: b"x"), sampler=FakeSampler(),  # type: ignore
            leader=group[0] if group else None))
    group[0].followers = group[1:]
    return group


def run_chunks(plan) -> None:
    """Pretend the decode ran: advance KV, and sample for completed sequences."""
    for chunk in plan:
        chunk.seq.num_computed += chunk.count
        if chunk.completes:
            chunk.seq.tokens.append(0)


def test_long_prompt_is_chunked_and_decoding_streams_keep_flowing() -> None:
    s = make_scheduler(4, 10_000, 64)
    short = make_group("a", 10)
    s.add(short)
    run_chunks(s.schedule())
    assert short[0].is_decoding
    long = make_group("b", 150)
    s.add(long)
    sizes = []
    for _ in range(3):
        plan = s.schedule()
        by_id = {c.seq.request_id: c.count for c in plan}
        assert by_id["a"] == 1  # the running stream gets its token every step
        sizes.append(by_id.get("b", 0))
        run_chunks(plan)
    assert sizes == [63, 63, 24]
    assert long[0].is_decoding


def test_while_streams_decode_a_prompt_is_computed_in_smaller_chunks() -> None:
    s = make_scheduler(4, 10_000, 512, prefill_chunk_while_decoding=100)
    alone = make_group("alone", 300)
    s.add(alone)
    plan = s.schedule()
    assert [c.count for c in plan] == [300]  # nobody is streaming: the whole step budget
    run_chunks(plan)
    assert alone[0].is_decoding
    long = make_group("long", 250)
    s.add(long)
    sizes = []
    while not long[0].is_decoding:
        plan = s.schedule()
        by_id = {c.seq.request_id: c.count for c in plan}
        assert by_id["alone"] == 1  # the stream gets a token every step
        sizes.append(by_id.get("long", 0))
        run_chunks(plan)
    assert sizes == [100, 100, 50]


def test_admission_waits_for_a_free_seq_id() -> None:
    s = make_scheduler(2, 10_000, 512)
    for rid in "abc":
        s.add(make_group(rid, 5))
    plan = s.schedule()
    assert sorted(c.seq.request_id for c in plan) == ["a", "b"]
    assert s.num_waiting == 1
    run_chunks(plan)
    finished = s.running[0]
    s.finish(finished)
    assert [c.seq.request_id for c in s.schedule() if c.count > 1] == ["c"]


def test_admission_respects_kv_room() -> None:
    s = make_scheduler(8, 300, 512)
    s.add(make_group("a", 200))
    s.add(make_group("b", 200))
    plan = s.schedule()
    assert [c.seq.request_id for c in plan] == ["a"]
    assert s.num_waiting == 1


def test_n_choices_are_admitted_together_and_only_the_leader_prefills() -> None:
    s = make_scheduler(4, 10_000, 512)
    group = make_group("a", 20, n=3)
    s.add(group)
    plan = s.schedule()
    assert [c.seq for c in plan] == [group[0]]
    assert all(seq.seq_id is not None for seq in group)
    assert len({seq.seq_id for seq in group}) == 3
    assert group[1].waits_for_leader


def test_preemption_frees_kv_and_requeues_at_the_front() -> None:
    s = make_scheduler(4, 10_000, 512)
    a, b = make_group("a", 5), make_group("b", 5)
    s.add(a)
    s.add(b)
    run_chunks(s.schedule())
    kv = s.cache.kv
    victim_id = b[0].seq_id
    assert s.preempt_newest() is b[0]
    assert (victim_id, -1, -1) in kv.removed
    assert b[0].status == SeqStatus.WAITING and b[0].num_computed == 0
    assert len(b[0].tokens) == 6  # its sampled token is kept and will be recomputed
    assert s.waiting[0] == b


def test_removing_a_request_frees_its_sequences() -> None:
    s = make_scheduler(4, 10_000, 512)
    a = make_group("a", 5, n=2)
    s.add(a)
    s.add(make_group("b", 5))
    s.schedule()
    s.remove_request("a")
    assert s.cache.num_free == 3
    assert all(seq.is_finished for seq in a)
    assert [seq.request_id for seq in s.running] == ["b"]


def test_max_prefills_keeps_prompts_in_separate_steps() -> None:
    s = make_scheduler(4, 10_000, 512, max_prefills=1)
    for rid in "abc":
        s.add(make_group(rid, 10))
    first = s.schedule()
    assert [(c.seq.request_id, c.count) for c in first] == [("a", 10)]
    run_chunks(first)
    second = s.schedule()
    assert [(c.seq.request_id, c.count) for c in second] == [("a", 1), ("b", 10)]


def test_a_new_request_reuses_the_longest_retained_prefix() -> None:
    s = make_scheduler(4, 10_000, 512, prefix_cache=True)
    first = make_group("a", 30)
    s.add(first)
    run_chunks(s.schedule())
    first_id = first[0].seq_id
    s.finish(first[0])  # its 30 prompt tokens stay in the context
    follow_up = make_group("b", 50)  # same first 30 tokens, 20 new ones
    s.add(follow_up)
    plan = s.schedule()
    assert [(c.seq.request_id, c.start, c.count) for c in plan] == [("b", 30, 20)]
    assert follow_up[0].num_cached == 30
    assert follow_up[0].seq_id == first_id
    assert (first_id, 30, -1) in s.cache.kv.removed  # only the part after the match is dropped


def test_a_running_sequences_prefix_is_copied_not_recomputed() -> None:
    s = make_scheduler(4, 10_000, 512, prefix_cache=True)
    a = make_group("a", 40)
    s.add(a)
    run_chunks(s.schedule())
    b = make_group("b", 60)  # shares a's 40 prompt tokens
    s.add(b)
    plan = s.schedule()
    assert ("b", 40, 20) in [(c.seq.request_id, c.start, c.count) for c in plan]
    assert s.cache.kv.copied == [(a[0].seq_id, b[0].seq_id, 0, 40)]


def test_no_reuse_when_disabled_or_prefix_differs() -> None:
    s = make_scheduler(4, 10_000, 512, prefix_cache=True)
    a = make_group("a", 30)
    s.add(a)
    run_chunks(s.schedule())
    s.finish(a[0])
    other = make_group("b", 30, first=1000)
    s.add(other)
    assert [(c.start, c.count) for c in s.schedule()] == [(0, 30)]
    off = make_scheduler(4, 10_000, 512, prefix_cache=False)
    x = make_group("x", 30)
    off.add(x)
    run_chunks(off.schedule())
    off.finish(x[0])
    y = make_group("y", 40)
    off.add(y)
    assert [(c.start, c.count) for c in off.schedule()] == [(0, 40)]


def test_retained_kv_is_evicted_before_admission_would_overflow() -> None:
    s = make_scheduler(4, 400, 512, prefix_cache=True)
    a = make_group("a", 200, first=0)
    s.add(a)
    run_chunks(s.schedule())
    s.finish(a[0])
    keep = make_group("k", 10, first=5000)
    s.add(keep)
    run_chunks(s.schedule())
    assert s.cache.num_retained_tokens == 200
    big = make_group("b", 250, first=9000)
    s.add(big)
    plan = s.schedule()
    assert [c.seq.request_id for c in plan if c.count > 1] == ["b"]
    assert s.cache.num_retained_tokens == 0


def test_only_prompt_kv_is_kept_unless_generated_reuse_is_on() -> None:
    for reuse_generated, kept in ((False, 30), (True, 33)):
        s = make_scheduler(2, 10_000, 512, prefix_cache=True, reuse_generated=reuse_generated)
        a = make_group("a", 30)
        s.add(a)
        run_chunks(s.schedule())  # prompt computed, one token sampled
        for _ in range(3):
            run_chunks(s.schedule())  # three decode steps: 33 computed, 34 tokens
        seq_id = a[0].seq_id
        s.finish(a[0])
        assert s.cache.num_retained_tokens == kept
        assert (seq_id, kept, -1) in s.cache.kv.removed  # the KV past what is kept is dropped


def test_a_request_whose_kv_is_read_from_disk_lets_the_next_one_go_first() -> None:
    s = make_scheduler(4, 10_000, 512)
    s.add(make_group("running", 10, first=9000))
    run_chunks(s.schedule())
    read_done = False
    slow = make_group("restoring", 40)
    slow[0].restore_ready = lambda: read_done
    s.add(slow)
    s.add(make_group("next", 20, first=5000))
    plan = s.schedule()
    assert [c.seq.request_id for c in plan] == ["running", "next"]
    read_done = True
    plan = s.schedule()
    assert "restoring" in [c.seq.request_id for c in plan]


def test_a_request_reading_from_the_shared_tier_waits_even_with_nothing_else_to_do() -> None:
    # a restore never waits on the network: the request waits for its read instead
    s = make_scheduler(4, 10_000, 512)
    read_done = False
    remote = make_group("restoring", 40)
    remote[0].restore_ready = lambda: read_done
    remote[0].read_is_remote = True
    s.add(remote)
    assert s.schedule() == []
    s.add(make_group("next", 20, first=5000))
    assert [c.seq.request_id for c in s.schedule()] == ["next"]
    read_done = True
    assert "restoring" in [c.seq.request_id for c in s.schedule()]


def test_with_nothing_else_to_do_a_restoring_request_is_admitted_at_once() -> None:
    s = make_scheduler(4, 10_000, 512)
    slow = make_group("restoring", 40)
    slow[0].restore_ready = lambda: False
    s.add(slow)
    assert [c.seq.request_id for c in s.schedule()] == ["restoring"]  # the load waits there
