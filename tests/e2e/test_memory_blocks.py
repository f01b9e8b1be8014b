"""KV blocks on the real llama.cpp: a sequence state cut into blocks and assembled again is the
same state, byte for byte, for both V layouts (flash attention on: V rows; off: V transposed),
every KV cache type llama.cpp accepts (without flash attention it quantizes K only), and a
unified or per-sequence cache."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import llama_cpp as C
import numpy as np
import pytest

from pensieve.engine.config import ContextConfig
from pensieve.engine.llama import Batch, Context, Model, init_backend
from pensieve.memory.kvstate import assemble, parse

pytestmark = pytest.mark.e2e

GGML_TYPE_BF16 = 30  # no constant for it in the bindings
KV_TYPES = {"f32": C.GGML_TYPE_F32, "f16": C.GGML_TYPE_F16, "bf16": GGML_TYPE_BF16,
            "q8_0": C.GGML_TYPE_Q8_0, "q4_0": C.GGML_TYPE_Q4_0, "q4_1": C.GGML_TYPE_Q4_1,
            "iq4_nl": C.GGML_TYPE_IQ4_NL, "q5_0": C.GGML_TYPE_Q5_0, "q5_1": C.GGML_TYPE_Q5_1}
QUANTIZED = {"q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"}
PROMPT = ("A long conversation needs its memory kept in blocks, so that every turn stores only "
          "what is new, and a system prompt that many conversations share is stored once. ") * 5


@pytest.fixture(scope="module")
def model(default_model: Path) -> Iterator[Model]:
    init_backend()
    m = Model(str(default_model))
    yield m
    m.close()


def make_context(model: Model, monkeypatch: pytest.MonkeyPatch, *, flash: str, kv_type: str,
                 unified: bool = True) -> Context:
    """A context whose KV cache has `kv_type` for K and V (V stays f16 without flash attention:
    llama.cpp quantizes V only with it)."""
    type_v = "f16" if flash == "off" and kv_type in QUANTIZED else kv_type
    config = ContextConfig(n_ctx=1024, n_batch=512, n_ubatch=512, n_seq_max=4, n_threads=2,
                           n_threads_batch=2, flash_attn=flash, kv_unified=unified,
                           type_k=kv_type, type_v=type_v)
    return Context(model, config)


def prefill(ctx: Context, tokens: list[int], seq_id: int) -> None:
    batch = Batch(ctx.n_batch)
    batch.add(tokens, 0, seq_id, True)
    assert ctx.decode(batch) == 0


def greedy(ctx: Context, model: Model, seq_id: int, last: int, start: int, n: int) -> list[int]:
    batch, out = Batch(ctx.n_batch), []
    for i in range(n):
        batch.clear()
        batch.add([last], start + i, seq_id, True)
        assert ctx.decode(batch) == 0
        last = int(np.argmax(ctx.logits(0)))
        out.append(last)
    return out


@pytest.mark.parametrize("kv_type", list(KV_TYPES))
@pytest.mark.parametrize("flash", ["on", "off"])
def test_cut_and_assembled_state_is_byte_identical(model: Model, monkeypatch: pytest.MonkeyPatch,
                                                   flash: str, kv_type: str) -> None:
    ctx = make_context(model, monkeypatch, flash=flash, kv_type=kv_type)
    try:
        tokens = model.tokenize(PROMPT, add_special=True)
        assert len(tokens) > 100
        prefill(ctx, tokens, 0)
        original = ctx.state_get(0)
        state = parse(original)
        assert state.layout.v_trans == (flash == "off")
        assert {lay.k_type for lay in state.layout.layers} == {KV_TYPES[kv_type]}
        v_type = C.GGML_TYPE_F16 if flash == "off" and kv_type in QUANTIZED else KV_TYPES[kv_type]
        assert {lay.v_type for lay in state.layout.layers} == {v_type}
        blocks = [state.block(a, min(a + 64, len(tokens))) for a in range(0, len(tokens), 64)]
        assert assemble(state.layout, blocks, 0) == original
        assert ctx.state_set(2, assemble(state.layout, blocks, 0))
        assert ctx.state_get(2) == assemble(state.layout, blocks, 2)  # loaded as it was cut
    finally:
        ctx.close()


def test_a_per_sequence_cache_round_trips_too(model: Model,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = make_context(model, monkeypatch, flash="on", kv_type="f16", unified=False)
    try:
        tokens = model.tokenize(PROMPT, add_special=True)
        prefill(ctx, tokens, 1)
        original = ctx.state_get(1)
        state = parse(original)
        assert state.layout.n_stream == 4
        blocks = [state.block(a, min(a + 64, len(tokens))) for a in range(0, len(tokens), 64)]
        assert assemble(state.layout, blocks, 1) == original
        assert ctx.state_set(3, assemble(state.layout, blocks, 0))
        assert ctx.state_get(3) == assemble(state.layout, blocks, 3)
    finally:
        ctx.close()


@pytest.mark.parametrize("flash", ["on", "off"])
def test_a_restore_from_blocks_answers_as_a_restore_from_the_snapshot(
        model: Model, monkeypatch: pytest.MonkeyPatch, flash: str) -> None:
    ctx = make_context(model, monkeypatch, flash=flash, kv_type="f16")
    try:
        tokens = model.tokenize(PROMPT, add_special=True)
        prefill(ctx, tokens[:-1], 0)
        snapshot = ctx.state_get(0)
        state = parse(snapshot)
        blocks = [state.block(a, min(a + 64, state.num_cells))
                  for a in range(0, state.num_cells, 64)]
        answers = []
        for data in (snapshot, assemble(state.layout, blocks, 0)):
            ctx.seq_remove(1)
            assert ctx.state_set(1, data)
            answers.append(greedy(ctx, model, 1, tokens[-1], len(tokens) - 1, 12))
        assert answers[0] == answers[1]
    finally:
        ctx.close()


def test_the_state_of_new_positions_alone_gives_the_same_blocks(
        model: Model, monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = make_context(model, monkeypatch, flash="on", kv_type="f16")
    try:
        tokens = model.tokenize(PROMPT, add_special=True)
        prefill(ctx, tokens, 0)
        whole = parse(ctx.state_get(0))
        part_bytes = ctx.state_get_range(0, 3, 64, len(tokens))
        assert part_bytes is not None
        part = parse(part_bytes, 64)
        assert part.num_cells == len(tokens) - 64
        assert part.block(0, 64) == whole.block(64, 128)
        assert part.block(64, part.num_cells) == whole.block(128, len(tokens))
        assert ctx.state_get(3)[8:] == ctx.state_get(2)[8:]  # scratch seq_id: empty again
    finally:
        ctx.close()


@pytest.mark.parametrize("flash", ["on", "off"])
def test_a_sequence_in_reused_cells_is_cut_in_position_order(
        model: Model, monkeypatch: pytest.MonkeyPatch, flash: str) -> None:
    # as under concurrent traffic: another sequence held the first cells and left, so this one's
    # later positions sit in lower cells and its state lists them first
    ctx = make_context(model, monkeypatch, flash=flash, kv_type="f16")
    try:
        tokens = model.tokenize(PROMPT, add_special=True)
        prefill(ctx, tokens[:60], 1)
        prefill(ctx, tokens[:100], 0)
        ctx.seq_remove(1)
        batch = Batch(ctx.n_batch)
        batch.add(tokens[100:-1], 100, 0, True)
        assert ctx.decode(batch) == 0
        original = ctx.state_get(0)
        state = parse(original)
        assert state.order is not None  # the cells really are out of position order
        blocks = [state.block(a, min(a + 64, state.num_cells))
                  for a in range(0, state.num_cells, 64)]
        assembled = assemble(state.layout, blocks, 2)
        assert ctx.state_set(2, assembled)
        assert ctx.state_get(2) == assembled  # loaded as it was cut
        ctx.seq_remove(0)
        ctx.seq_remove(2)
        answers = []
        for data in (original, assembled):
            ctx.seq_remove(3)
            assert ctx.state_set(3, data)
            answers.append(greedy(ctx, model, 3, tokens[-1], len(tokens) - 1, 12))
        assert answers[0] == answers[1]
    finally:
        ctx.close()
