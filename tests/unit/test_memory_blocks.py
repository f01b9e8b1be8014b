"""KV blocks: cutting and assembling llama.cpp's sequence state, the block store and its files.

The states here are built by `fake_state`, written from llama.cpp's `state_write` (the layout
kvstate.py documents); tests/e2e/test_memory_blocks.py checks the same round trip on states the
real llama.cpp wrote.
"""

from __future__ import annotations

import logging
import struct
from pathlib import Path

import numpy as np
import pytest

from pensieve.memory.blockfiles import BlockFiles
from pensieve.memory.blocks import BlockStore
from pensieve.memory.config import MemoryConfig
from pensieve.memory.kvstate import MAGIC, UnknownLayout, assemble, parse
from pensieve.memory.live import LiveCache
from pensieve.memory.prefix import Tier, prefix_key
from pensieve.memory.tiered import TieredStore
from pensieve.memory.tiers import DiskTier, Snapshot

LAYERS = [(1, 24, 1, 16), (8, 34, 8, 34)]  # (k_type, k_row, v_type, v_row): f16 and q8_0 rows


def fake_state(tokens: np.ndarray, *, v_trans: bool = False, n_stream: int = 1, seq_id: int = 0,
               positions: np.ndarray | None = None, n_seq: int = 1, first_pos: int = 0) -> bytes:
    """A sequence state laid out as llama.cpp's llama_kv_cache::state_write writes it, with KV
    bytes that depend only on each cell's position and token (as real KV does). With
    `first_pos`, the state of positions first_pos.. only (tokens holds the whole sequence)."""
    tokens = tokens[first_pos:]
    n = len(tokens)
    pos = np.arange(first_pos, first_pos + n) if positions is None else positions
    out = [struct.pack("<IiI", MAGIC, seq_id, n_stream)]
    for s in range(n_stream):
        if s != (seq_id if n_stream > 1 else 0):
            out.append(struct.pack("<I", 0))
            continue
        out.append(struct.pack("<I", n))
        for p in pos:
            out.append(struct.pack("<iI", int(p), n_seq) + struct.pack("<i", seq_id) * n_seq)
        out.append(struct.pack("<II", int(v_trans), len(LAYERS)))
        for il, (kt, kr, _, _) in enumerate(LAYERS):
            out.append(struct.pack("<iQ", kt, kr) + _rows(tokens, pos, il, kr).tobytes())
        for il, (_, _, vt, vr) in enumerate(LAYERS):
            rows = _rows(tokens, pos, il + 100, vr)
            if v_trans:  # element size 2, vr // 2 rows of one element per cell
                el = rows.reshape(n, vr // 2, 2).transpose(1, 0, 2)
                out.append(struct.pack("<iII", vt, 2, vr // 2) + el.tobytes())
            else:
                out.append(struct.pack("<iQ", vt, vr) + rows.tobytes())
    return b"".join(out)


def _rows(tokens: np.ndarray, pos: np.ndarray, salt: int, width: int) -> np.ndarray:
    seeds = (np.asarray(pos) * 7919 + tokens.astype(np.int64) * 31 + salt) % 251
    return ((seeds[:, None] + np.arange(width)[None, :]) % 256).astype(np.uint8)


def toks(n: int, first: int = 0) -> np.ndarray:
    return np.arange(first, first + n, dtype=np.int32)


@pytest.mark.parametrize("v_trans", [False, True], ids=["v-rows", "v-transposed"])
@pytest.mark.parametrize("n_stream,seq_id", [(1, 0), (1, 3), (4, 2)])
@pytest.mark.parametrize("block", [1, 7, 64, 200])
def test_cut_and_assemble_is_byte_identical(v_trans: bool, n_stream: int, seq_id: int,
                                            block: int) -> None:
    tokens = toks(150)
    raw = fake_state(tokens, v_trans=v_trans, n_stream=n_stream, seq_id=seq_id)
    state = parse(raw)
    blocks = [state.block(a, min(a + block, 150)) for a in range(0, 150, block)]
    assert assemble(state.layout, blocks, seq_id) == raw


def test_a_block_depends_only_on_its_own_positions() -> None:
    a = parse(fake_state(np.concatenate([toks(64), toks(30, 500)])))
    b = parse(fake_state(np.concatenate([toks(64), toks(80, 900)])))
    assert a.block(0, 64) == b.block(0, 64)
    assert a.block(64, 94) != b.block(64, 94)


@pytest.mark.parametrize("v_trans", [False, True], ids=["v-rows", "v-transposed"])
@pytest.mark.parametrize("first_pos", [0, 64])
def test_cells_in_any_order_are_cut_by_position(v_trans: bool, first_pos: int) -> None:
    # under concurrent traffic a sequence's cells interleave with others': the state lists them
    # in cell order, and the blocks must still be those of positions in order
    tokens = toks(150, 1000)
    in_order = fake_state(tokens, v_trans=v_trans, first_pos=first_pos)
    perm = np.random.default_rng(7).permutation(150 - first_pos)
    shuffled = fake_state(np.concatenate([tokens[:first_pos], tokens[first_pos:][perm]]),
                          v_trans=v_trans, first_pos=first_pos, positions=perm + first_pos)
    a, b = parse(in_order, first_pos), parse(shuffled, first_pos)
    spans = [(x, min(x + 64, 150 - first_pos)) for x in range(0, 150 - first_pos, 64)]
    assert [a.block(*sp) for sp in spans] == [b.block(*sp) for sp in spans]
    if first_pos == 0:
        assert assemble(b.layout, [b.block(*sp) for sp in spans], 0) == in_order


@pytest.mark.parametrize("damage", [
    "magic", "trailing", "truncated", "shifted", "two_seqs", "two_streams", "bad_type", "empty",
    "repeated",
])
def test_states_it_does_not_recognise_are_refused(damage: str) -> None:
    tokens = toks(20)
    raw = fake_state(tokens)
    if damage == "magic":
        raw = b"\0" + raw[1:]
    elif damage == "trailing":
        raw += fake_state(tokens)[8:]  # a second cache after the first (SWA, hybrid)
    elif damage == "truncated":
        raw = raw[:-3]
    elif damage == "shifted":
        raw = fake_state(tokens, positions=np.arange(20) + 5)
    elif damage == "repeated":  # a position twice, another missing
        raw = fake_state(tokens, positions=np.array([*range(19), 3]))
    elif damage == "two_seqs":
        raw = fake_state(tokens, n_seq=2)
    elif damage == "two_streams":
        raw = fake_state(tokens, n_stream=4, seq_id=2)
        raw = raw[:12] + struct.pack("<I", 1) + raw[16:]  # stream 0 claims a cell
    elif damage == "bad_type":
        at = 16 + 20 * 12 + 8
        raw = raw[:at] + struct.pack("<i", 9999) + raw[at + 4 :]
    else:
        raw = struct.pack("<IiII", MAGIC, 0, 1, 0)
    with pytest.raises(UnknownLayout):
        parse(raw)


def store(block: int = 16, ram: int = 1 << 30, disk: int = 1 << 30,
          files: BlockFiles | None = None) -> BlockStore:
    return BlockStore("ns", block, ram, disk, files)


def save(s: BlockStore, tokens: np.ndarray) -> None:
    s.save(tokens, parse(fake_state(tokens)))


def test_restored_state_equals_the_saved_one() -> None:
    s = store()
    tokens = toks(50)
    save(s, tokens)
    path, n = s.match(np.concatenate([tokens, toks(5, 900)]))
    assert n == 50 and s.tier_of(path) is Tier.RAM
    assert s.read(path) == fake_state(tokens)


def test_a_turn_writes_only_its_new_blocks() -> None:
    s = store(block=16)
    history = toks(40)
    save(s, history)
    cell = parse(fake_state(history)).layout.cell_bytes
    before = s.counters.bytes_to_ram
    longer = np.concatenate([history, toks(30, 700)])
    save(s, longer)
    # blocks [32, 48) (was partial), [48, 64) and the partial [64, 70): not the 32 before them
    assert s.counters.bytes_to_ram - before == (70 - 32) * cell
    assert s.summary()["conversations"] == 1  # the shorter turn is covered, not kept twice
    assert s.ram_bytes == 70 * cell


def test_shared_prefixes_are_stored_once() -> None:
    s = store(block=16)
    system = toks(64)
    for i in range(10):
        save(s, np.concatenate([system, toks(8, 1000 + 100 * i)]))
    summary = s.summary()
    assert summary["conversations"] == 10
    assert summary["blocks"] == 4 + 10 and summary["shared_blocks"] == 4
    cell = parse(fake_state(toks(1))).layout.cell_bytes
    assert s.ram_bytes == (64 + 10 * 8) * cell
    conv = s.conversations()[0]
    assert conv.num_blocks == 5 and conv.num_shared == 4
    assert {c.key for c in s.conversations()} == {
        prefix_key(np.concatenate([system, toks(8, 1000 + 100 * i)])) for i in range(10)}


def test_removing_a_conversation_keeps_what_others_share() -> None:
    s = store(block=16)
    a, b = np.concatenate([toks(32), toks(5, 500)]), np.concatenate([toks(32), toks(5, 600)])
    save(s, a)
    save(s, b)
    assert s.remove_conversation(prefix_key(a))
    assert s.match(b)[1] == len(b) and s.match(a)[1] == 32
    assert len(s) == 3


def test_ram_budget_evicts_leaves_first_and_the_shared_prefix_last() -> None:
    cell = parse(fake_state(toks(1))).layout.cell_bytes
    s = store(block=16, ram=(32 + 3 * 16) * cell)  # the prefix and three 16-token tails
    system = toks(32)
    for i in range(6):
        save(s, np.concatenate([system, toks(16, 1000 + 100 * i)]))
    assert s.ram_bytes <= s.ram_budget
    assert s.match(system)[1] == 32  # the shared prefix stays
    assert s.match(np.concatenate([system, toks(16, 1500)]))[1] == 48  # the newest stays


def files(tmp_path: Path, namespace: str = "ns") -> BlockFiles:
    return BlockFiles(tmp_path, namespace)


def test_blocks_and_their_chains_survive_a_restart(tmp_path: Path) -> None:
    f = files(tmp_path)
    s = store(files=f)
    a, b = np.concatenate([toks(40), toks(9, 500)]), np.concatenate([toks(40), toks(20, 600)])
    save(s, a)
    save(s, b)
    f.close()
    again = store(files=files(tmp_path))
    assert again.summary()["conversations"] == 2 and again.summary()["shared_blocks"] == 2
    path, n = again.match(b)
    assert n == len(b) and again.tier_of(path) is Tier.DISK
    assert again.read(path) == fake_state(b)
    assert again.tier_of(again.match(b)[0]) is Tier.RAM  # read once, then kept in RAM


@pytest.mark.parametrize("damage", ["flip_data", "truncate", "flip_token", "other_key",
                                    "garbage"])
def test_damaged_or_foreign_block_files_are_never_assembled(tmp_path: Path, damage: str) -> None:
    f = files(tmp_path)
    s = store(files=f)
    tokens = toks(40)
    save(s, tokens)
    f.close()
    victim = next(h.path for h in f.scan() if h.start == 16)  # the middle block
    raw = bytearray(victim.read_bytes())
    if damage == "flip_data":
        raw[-1] ^= 1
    elif damage == "truncate":
        raw = raw[:-5]
    elif damage == "flip_token":
        raw[raw.index(b"}") + 1] ^= 1
    elif damage == "other_key":  # a valid file of another chain, renamed to this key
        other = store(files=files(tmp_path / "x"))
        save(other, toks(40, 3000))
        assert other.files is not None
        other.files.close()
        raw = bytearray(sorted(other.files.dir.glob("*.kvb"))[0].read_bytes())
    else:
        raw = bytearray(b"PNSVKB01" + b"\xff" * 40)
    victim.write_bytes(bytes(raw))
    again = store(files=files(tmp_path))
    path, _ = again.match(tokens)
    state = again.read(path)
    if state is not None:  # refused at start-up: what is served is the true prefix before it
        assert len(path) == 1 and state == fake_state(tokens[:16])
    assert again.match(tokens)[1] <= 16  # the damaged block and what follows it are gone


def test_other_namespaces_never_match(tmp_path: Path) -> None:
    f = files(tmp_path)
    s = store(files=f)
    save(s, toks(40))
    f.close()
    other = BlockStore("other", 16, 1 << 30, 1 << 30, files(tmp_path, "ns"))
    assert other.match(toks(40)) == ([], 0)


def test_the_store_falls_back_to_snapshots_for_layouts_it_does_not_know(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = MemoryConfig(ram_bytes=1 << 24, disk_bytes=0, disk_dir=None, namespace="ns")
    tiers = TieredStore(cfg)
    with caplog.at_level(logging.WARNING, "pensieve.memory"):
        tiers.save(toks(30), b"recurrent state")
    assert "not one this version can cut" in caplog.text
    assert tiers.best(toks(30)) == (Tier.RAM, 30)
    assert tiers.load(Tier.RAM, toks(30)) == b"recurrent state"
    assert tiers.blocks is not None and len(tiers.blocks) == 0
    tiers.close()


def test_old_snapshot_files_are_read_then_replaced_by_blocks(tmp_path: Path) -> None:
    old = DiskTier(tmp_path, "ns", 1 << 30)  # what an earlier version left on disk
    tokens = toks(40)
    old.put(Snapshot(tokens, fake_state(tokens)))
    old.close()
    cfg = MemoryConfig(ram_bytes=1 << 24, disk_bytes=1 << 30, disk_dir=str(tmp_path),
                       namespace="ns", block_tokens=16)
    tiers = TieredStore(cfg)
    assert tiers.best(tokens) == (Tier.DISK, 40)
    assert tiers.load(Tier.DISK, tokens) == fake_state(tokens)  # checked, then served
    longer = np.concatenate([tokens, toks(10, 800)])
    tiers.save(longer, fake_state(longer))
    assert tiers.disk is not None and len(tiers.disk) == 0 and len(tiers.ram) == 0
    assert tiers.best(longer) == (Tier.RAM, 50)
    tiers.close()
    assert not list((tmp_path / "ns").glob("*.kv"))


def test_a_save_can_bring_only_the_positions_not_stored_yet() -> None:
    s = store(block=16)
    history = toks(40)
    save(s, history)
    longer = np.concatenate([history, toks(30, 700)])
    first = s.stored_prefix(longer)
    assert first == 32  # two full blocks; the partial one is cut again
    s.save(longer, parse(fake_state(longer, first_pos=first), first), first)
    path, n = s.match(longer)
    assert n == 70 and s.read(path) == fake_state(longer)
    with pytest.raises(UnknownLayout):  # a part whose blocks before it are not stored
        s.save(toks(70, 5000), parse(fake_state(toks(70, 5000), first_pos=32), 32), 32)


class StateKV:
    """A fake llama context that holds tokens per seq_id and serialises them as fake_state."""

    def __init__(self) -> None:
        self.held: dict[int, np.ndarray] = {}
        self.ranges: list[tuple[int, int]] = []

    def seq_remove(self, seq_id: int, p0: int = -1, p1: int = -1) -> bool:
        if seq_id in self.held:
            self.held[seq_id] = self.held[seq_id][: p0 if p0 >= 0 else 0]
        return True

    def copy_prefix(self, src: int, dst: int, length: int) -> None:
        self.held[dst] = self.held[src][:length]

    def state_get(self, seq_id: int) -> bytes:
        return fake_state(self.held[seq_id])

    def state_get_range(self, seq_id: int, scratch: int, p0: int, p1: int) -> bytes | None:
        assert scratch not in self.held or len(self.held[scratch]) == 0
        self.ranges.append((p0, p1))
        return fake_state(self.held[seq_id][:p1], first_pos=p0)

    def state_set(self, seq_id: int, data: bytes) -> bool:
        return False


def test_the_live_tier_saves_when_idle_and_brings_out_only_new_positions() -> None:
    kv = StateKV()
    cfg = MemoryConfig(ram_bytes=1 << 24, disk_bytes=0, disk_dir=None, namespace="ns",
                       block_tokens=16)
    tiers = TieredStore(cfg)
    cache = LiveCache(4, kv, tiers=tiers)
    first = toks(40)
    got = cache.acquire(list(first))
    kv.held[got.seq_id] = first
    cache.release(got.seq_id, list(first))
    assert cache.has_unsaved and tiers.best(first)[1] == 0  # nothing copied at release
    cache.save_retained()
    assert not cache.has_unsaved and tiers.best(first)[1] == 40 and kv.ranges == []
    longer = np.concatenate([first, toks(30, 700)])
    again = cache.acquire(list(longer))
    assert again.seq_id == got.seq_id and again.num_reused == 40
    kv.held[again.seq_id] = longer
    cache.release(again.seq_id, list(longer))
    cache.save_retained()
    assert kv.ranges == [(32, 70)]  # the stored blocks are not copied out again
    assert tiers.blocks is not None
    path, n = tiers.blocks.match(longer)
    assert n == 70 and tiers.blocks.read(path) == fake_state(longer)
    tiers.close()
