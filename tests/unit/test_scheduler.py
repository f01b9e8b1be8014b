"""Scheduler policy with scripted sequences (no model)."""

from __future__ import annotations

from pensieve.engine.detokenizer import IncrementalDetokenizer
from pensieve.engine.scheduler import Scheduler
from pensieve.engine.sequence import SeqStatus, Sequence
from pensieve.engine.types import SamplingParams


class FakeSampler:
    closed = False

    def close(self) -> None:
        self.closed = True


def make_group(rid: str, num_prompt: int, n: int = 1, max_tokens: int = 16) -> list[Sequence]:
    group: list[Sequence] = []
    for i in range(n):
        group.append(Sequence(
            request_id=rid, index=i, params=SamplingParams(n=n), tokens=list(range(num_prompt)),
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
    s = Scheduler(n_seq_max=4, n_ctx=10_000, token_budget=64)
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


def test_admission_waits_for_a_free_seq_id() -> None:
    s = Scheduler(n_seq_max=2, n_ctx=10_000, token_budget=512)
    for rid in "abc":
        s.add(make_group(rid, 5))
    plan = s.schedule()
    assert sorted(c.seq.request_id for c in plan) == ["a", "b"]
    assert s.num_waiting == 1
    run_chunks(plan)
    finished = s.running[0]
    s.finish(finished, free_kv=lambda _id: None)
    assert [c.seq.request_id for c in s.schedule() if c.count > 1] == ["c"]


def test_admission_respects_kv_room() -> None:
    s = Scheduler(n_seq_max=8, n_ctx=300, token_budget=512)
    s.add(make_group("a", 200))
    s.add(make_group("b", 200))
    plan = s.schedule()
    assert [c.seq.request_id for c in plan] == ["a"]
    assert s.num_waiting == 1


def test_n_choices_are_admitted_together_and_only_the_leader_prefills() -> None:
    s = Scheduler(n_seq_max=4, n_ctx=10_000, token_budget=512)
    group = make_group("a", 20, n=3)
    s.add(group)
    plan = s.schedule()
    assert [c.seq for c in plan] == [group[0]]
    assert all(seq.seq_id is not None for seq in group)
    assert len({seq.seq_id for seq in group}) == 3
    assert group[1].waits_for_leader


def test_preemption_frees_kv_and_requeues_at_the_front() -> None:
    s = Scheduler(n_seq_max=4, n_ctx=10_000, token_budget=512)
    a, b = make_group("a", 5), make_group("b", 5)
    s.add(a)
    s.add(b)
    run_chunks(s.schedule())
    freed: list[int] = []
    victim_id = b[0].seq_id
    assert s.preempt_newest(freed.append) is b[0]
    assert freed == [victim_id]
    assert b[0].status == SeqStatus.WAITING and b[0].num_computed == 0
    assert len(b[0].tokens) == 6  # its sampled token is kept and will be recomputed
    assert s.waiting[0] == b


def test_removing_a_request_frees_its_sequences() -> None:
    s = Scheduler(n_seq_max=4, n_ctx=10_000, token_budget=512)
    a = make_group("a", 5, n=2)
    s.add(a)
    s.add(make_group("b", 5))
    s.schedule()
    freed: list[int] = []
    s.remove_request("a", freed.append)
    assert len(freed) == 2
    assert all(seq.is_finished for seq in a)
    assert [seq.request_id for seq in s.running] == ["b"]


def test_max_prefills_keeps_prompts_in_separate_steps() -> None:
    s = Scheduler(n_seq_max=4, n_ctx=10_000, token_budget=512, max_prefills=1)
    for rid in "abc":
        s.add(make_group(rid, 10))
    first = s.schedule()
    assert [(c.seq.request_id, c.count) for c in first] == [("a", 10)]
    run_chunks(first)
    second = s.schedule()
    assert [(c.seq.request_id, c.count) for c in second] == [("a", 1), ("b", 10)]
