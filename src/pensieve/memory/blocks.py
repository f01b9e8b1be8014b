"""KV kept in blocks of a fixed number of tokens, keyed by hashes chained over their tokens.

A conversation is a chain of blocks from position 0; equal prefixes give equal keys, so a system
prompt that many conversations share is stored once and referenced by each of them:

    conversation A:  [ b0 | b1 | b2a | a3 (partial) ]
    conversation B:  [ b0 | b1 | b2b (partial)      ]     b0, b1: shared (2 references)

Only full blocks have children; a conversation's last block may be partial, and is dropped when
the next turn of the same conversation covers it. Saving a turn cuts and stores only the blocks
not stored yet, so the bytes written per turn follow the new tokens, not the history.

Blocks live in RAM, on disk (blockfiles.py), or both; a shared tier (shared.py) behind them
gets each new block as it is cut, and hands back the blocks that continue a chain (`adopt`).
Each tier evicts leaves first (a block is
useless without its parents) by retention value: the tokens up to the block's end against its
idleness. A shared block is touched whenever any of its conversations is, so it goes last.
This module is the API the tiers above (a cluster's shared tier) can store blocks through:
`save`, `match`, `read`, `conversations`, `remove_conversation`.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from pensieve.memory.blockfiles import BlockFiles, BlockHeader, block_key, encode_block
from pensieve.memory.kvstate import Layout, SeqState, UnknownLayout, assemble
from pensieve.memory.prefix import Tier, is_covered, longest_prefix, prefix_key, retention_value

log = logging.getLogger("pensieve.memory")


@dataclass(slots=True, eq=False)
class Block:
    key: str
    parent: str
    start: int  # position of its first token
    tokens: np.ndarray  # int32
    num_bytes: int  # KV bytes
    last_used: float
    data: bytes | None = None  # in RAM when set
    disk_bytes: int = 0  # size of its file; 0: not on disk
    children: set[str] = field(default_factory=set)

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)

    def retention_value(self, now: float) -> float:
        return retention_value(self.end, self.last_used, now)


@dataclass(frozen=True, slots=True)
class Conversation:
    """One chain ending in a leaf block, as /admin/memory lists it."""

    key: str  # prefix_key of all its tokens: the same name the live tier uses
    num_tokens: int
    num_blocks: int
    num_shared: int  # blocks that other conversations use too
    ram_bytes: int
    disk_bytes: int
    last_used: float


@dataclass(slots=True)
class BlockCounters:
    bytes_to_ram: int = 0  # KV bytes copied into RAM blocks, ever
    bytes_to_disk: int = 0  # file bytes queued for disk, ever
    blocks_cut: int = 0


class BlockSink(Protocol):
    """Where new blocks are also sent, encoded (the shared tier's write-behind queue)."""

    def put(self, key: str, blob: bytes) -> None: ...


@dataclass(frozen=True, slots=True)
class FetchedBlock:
    """A block read from the shared tier and checked there (blockfiles.open_block)."""

    key: str
    parent: str
    start: int
    tokens: np.ndarray
    layout: str  # kvstate.Layout.to_json() of the server that cut it
    data: bytes


def chain_seed(namespace: str, block_tokens: int) -> str:
    """The parent key of every chain's first block."""
    return hashlib.sha256(f"{namespace}|blocks={block_tokens}|v1".encode()).hexdigest()[:32]


class BlockStore:
    """Blocks in RAM and on disk under one index. Used from the engine thread only."""

    def __init__(self, namespace: str, block_tokens: int, ram_budget: int,
                 disk_budget: int, files: BlockFiles | None) -> None:
        self.block_tokens = block_tokens
        self.ram_budget = ram_budget
        self.disk_budget = disk_budget
        self.files = files
        self.shared: BlockSink | None = None
        self.namespace = namespace
        self.seed = chain_seed(namespace, block_tokens)
        self.layout: Layout | None = None
        self.ram_bytes = 0
        self.disk_bytes = 0
        self.counters = BlockCounters()
        self._blocks: dict[str, Block] = {}
        self._children: dict[str, set[str]] = {self.seed: set()}  # parent key -> child keys
        if files is not None:
            self._load_index(files.scan())

    def __len__(self) -> int:
        return len(self._blocks)

    # --- save ---------------------------------------------------------------------------------
    def stored_prefix(self, tokens: np.ndarray) -> int:
        """How many leading tokens of `tokens` full stored blocks already cover."""
        return self.chain_end(tokens)[1]

    def chain_end(self, tokens: np.ndarray) -> tuple[str, int]:
        """Where the chain of full stored blocks along `tokens` ends: (its last key, or the
        seed; the position after it). The next block of `tokens` would be that key's child."""
        parent, start, b = self.seed, 0, self.block_tokens
        while start + b <= len(tokens):
            key = block_key(parent, tokens[start : start + b])
            if key not in self._blocks:
                break
            parent, start = key, start + b
        return parent, start

    def save(self, tokens: np.ndarray, state: SeqState, first_pos: int = 0) -> None:
        """Store the chain of `tokens`, cutting from `state` only the blocks not stored yet.
        `state` holds positions [first_pos, len(tokens)); the blocks before are stored."""
        if state.num_cells != len(tokens) - first_pos or first_pos % self.block_tokens:
            raise UnknownLayout(f"{state.num_cells} cells from {first_pos} for "
                                f"{len(tokens)} tokens")
        if self.layout is not None and state.layout != self.layout and first_pos:
            raise UnknownLayout("a partial state of another layout")
        self._adopt(state.layout)
        now, parent, layout = time.monotonic(), self.seed, state.layout.to_json()
        for start in range(0, len(tokens), self.block_tokens):
            chunk = tokens[start : start + self.block_tokens]
            key = block_key(parent, chunk)
            blk = self._blocks.get(key)
            is_new = blk is None
            if blk is None:
                if start < first_pos:
                    raise UnknownLayout(f"the block at {start} is gone")
                blk = self._cut(key, parent, start, chunk, state, now, first_pos)
            self._send_out(blk, layout, is_new=is_new)
            blk.last_used = now
            self._drop_covered_siblings(blk)
            parent = key
        self._enforce_budgets()

    def _adopt(self, layout: Layout) -> None:
        if self.layout == layout:
            return
        if self.layout is not None:
            log.warning("memory: the KV layout changed; forgetting %d blocks", len(self._blocks))
            self.clear()
        self.layout = layout

    def _cut(self, key: str, parent: str, start: int, chunk: np.ndarray, state: SeqState,
             now: float, first_pos: int) -> Block:
        data = state.block(start - first_pos, start - first_pos + len(chunk))
        blk = Block(key, parent, start, chunk.copy(), len(data), now, data=data)
        self._link(blk)
        self.ram_bytes += len(data)
        self.counters.bytes_to_ram += len(data)
        self.counters.blocks_cut += 1
        return blk

    def _send_out(self, blk: Block, layout: str, *, is_new: bool) -> None:
        """Queue a RAM block for disk (when not there yet) and, when just cut, for the shared
        tier; both get the same encoded blob."""
        to_disk = (blk.disk_bytes == 0 and self.files is not None and self.disk_budget > 0)
        to_shared = is_new and self.shared is not None
        if blk.data is None or not (to_disk or to_shared):
            return
        blob = encode_block(self.namespace, blk.key, blk.parent, blk.start, blk.tokens, layout,
                            blk.data)
        if to_disk and self.files is not None:
            blk.disk_bytes = self.files.write_blob(blk.key, blob)
            self.disk_bytes += blk.disk_bytes
            self.counters.bytes_to_disk += blk.disk_bytes
        if to_shared and self.shared is not None:
            self.shared.put(blk.key, blob)

    def _link(self, blk: Block) -> None:
        self._blocks[blk.key] = blk
        self._children.setdefault(blk.parent, set()).add(blk.key)

    def _drop_covered_siblings(self, blk: Block) -> None:
        """A conversation's previous partial last block, now inside `blk`: not kept twice."""
        for key in list(self._children.get(blk.parent, ())):
            sib = self._blocks[key]
            if sib is not blk and not self._children.get(key) and is_covered(sib.tokens,
                                                                             blk.tokens):
                self._remove(sib)

    # --- lookup and restore -------------------------------------------------------------------
    def match(self, want: np.ndarray) -> tuple[list[Block], int]:
        """The blocks that serve the longest prefix of `want`, and its length in tokens."""
        path: list[Block] = []
        parent, start, b = self.seed, 0, self.block_tokens
        while start < len(want):
            chunk = want[start : start + b]
            blk = self._blocks.get(block_key(parent, chunk)) if len(chunk) == b else None
            if blk is not None:
                path.append(blk)
                parent, start = blk.key, start + b
                continue
            kids = (self._blocks[k] for k in self._children.get(parent, ()))
            best, n = longest_prefix(((k, k.tokens) for k in kids), chunk)
            if best is not None:
                path.append(best)
                start += n
            break
        return path, start

    def adopt(self, fetched: Iterable[FetchedBlock]) -> int:
        """Take in blocks the shared tier fetched, a chain continuing one held here: kept in
        RAM (as a disk read is) so that the next `match` finds the longer chain. Stops at a
        block whose parent is gone or whose layout differs; returns the blocks taken."""
        num_taken, now = 0, time.monotonic()
        for f in fetched:
            if f.key in self._blocks:
                continue
            if (f.parent != self.seed and f.parent not in self._blocks) \
                    or self._is_partial_parent(f.parent) or not self._fits(f):
                break
            blk = Block(f.key, f.parent, f.start, f.tokens, len(f.data), now, data=f.data)
            self._link(blk)
            self.ram_bytes += blk.num_bytes
            num_taken += 1
        return num_taken

    def _fits(self, f: FetchedBlock) -> bool:
        """A fetched block's layout is this store's (or becomes it, in an empty store) and its
        size agrees with it: assembling it cannot fail."""
        try:
            layout = Layout.from_json(f.layout)
        except (ValueError, KeyError, TypeError):
            return False
        if self.layout is not None and layout != self.layout:
            return False
        if len(f.data) != len(f.tokens) * layout.cell_bytes:
            return False
        self.layout = layout
        return True

    @staticmethod
    def tier_of(path: list[Block]) -> Tier:
        return Tier.RAM if all(b.data is not None for b in path) else Tier.DISK

    def read(self, path: list[Block], seq_id: int = 0,
             ready: dict[str, bytes] | None = None) -> bytes | None:
        """One sequence state from these blocks (disk blocks verified, then kept in RAM);
        None when a block is gone or fails its checks (it and its descendants are dropped)."""
        if self.layout is None or not path:
            return None
        datas = []
        for blk in path:
            data = blk.data if blk.data is not None else self._read_disk(blk, ready)
            if data is None:
                return None
            datas.append(data)
        now = time.monotonic()
        for blk in path:
            blk.last_used = now
        state = assemble(self.layout, datas, seq_id)
        self._enforce_budgets()
        return state

    def disk_reads(self, path: list[Block]) -> list[tuple[str, str, np.ndarray]]:
        """(key, parent, tokens) of the blocks of `path` that only the disk holds: what a
        reader thread can fetch ahead with `files.read`."""
        return [(b.key, b.parent, b.tokens) for b in path if b.data is None]

    def _read_disk(self, blk: Block, ready: dict[str, bytes] | None) -> bytes | None:
        data = (ready or {}).get(blk.key)
        if data is None and self.files is not None and blk.disk_bytes:
            data = self.files.read(blk.key, blk.parent, blk.tokens)
        if data is None or len(data) != blk.num_bytes:
            log.warning("memory: block %s unreadable; dropping it and its descendants", blk.key)
            self.disk_bytes -= blk.disk_bytes
            blk.disk_bytes = 0
            self._remove(blk)
            return None
        blk.data = data
        self.ram_bytes += len(data)
        return data

    # --- listing and removal ------------------------------------------------------------------
    def conversations(self) -> list[Conversation]:
        refs = self._reference_counts()
        out = []
        for leaf in self._blocks.values():
            if self._children.get(leaf.key):
                continue
            chain = self._chain(leaf)
            tokens = np.concatenate([b.tokens for b in chain])
            out.append(Conversation(
                prefix_key(tokens), len(tokens), len(chain),
                sum(refs[b.key] > 1 for b in chain),
                sum(b.num_bytes for b in chain if b.data is not None),
                sum(b.disk_bytes for b in chain), max(b.last_used for b in chain)))
        return out

    def summary(self) -> dict[str, int]:
        refs = self._reference_counts()
        return {"conversations": sum(not self._children.get(k) for k in self._blocks),
                "blocks": len(self._blocks), "shared_blocks": sum(n > 1 for n in refs.values()),
                "block_tokens": self.block_tokens,
                "kv_bytes_per_token": self.layout.cell_bytes if self.layout else 0,
                "block_ram_bytes": self.ram_bytes, "block_disk_bytes": self.disk_bytes,
                "bytes_to_ram": self.counters.bytes_to_ram,
                "bytes_to_disk": self.counters.bytes_to_disk}

    def remove_conversation(self, key: str) -> list[str] | None:
        """Forget one conversation: its blocks that no other conversation uses. Returns their
        keys (None: no conversation has this key)."""
        for leaf in list(self._blocks.values()):
            if self._children.get(leaf.key):
                continue
            chain = self._chain(leaf)
            if prefix_key(np.concatenate([b.tokens for b in chain])) != key:
                continue
            removed = []
            for blk in reversed(chain):
                if self._children.get(blk.key):
                    break  # shared with another conversation from here up
                self._remove(blk)
                removed.append(blk.key)
            return removed
        return None

    def clear(self) -> None:
        for key in list(self._children.get(self.seed, ())):
            self._remove(self._blocks[key])

    def _chain(self, leaf: Block) -> list[Block]:
        chain = [leaf]
        while chain[-1].parent != self.seed:
            chain.append(self._blocks[chain[-1].parent])
        return chain[::-1]

    def _reference_counts(self) -> dict[str, int]:
        """Per block: how many conversations (leaves) use it."""
        refs = dict.fromkeys(self._blocks, 0)
        for key, blk in self._blocks.items():
            if self._children.get(key):
                continue
            while True:
                refs[blk.key] += 1
                if blk.parent == self.seed:
                    break
                blk = self._blocks[blk.parent]
        return refs

    def _remove(self, blk: Block) -> None:
        """Forget a block and everything under it, in RAM and on disk."""
        for key in list(self._children.pop(blk.key, ())):
            self._remove(self._blocks[key])
        del self._blocks[blk.key]
        self._children.get(blk.parent, set()).discard(blk.key)
        if blk.data is not None:
            self.ram_bytes -= blk.num_bytes
        if blk.disk_bytes and self.files is not None:
            self.disk_bytes -= blk.disk_bytes
            self.files.delete(blk.key)

    # --- budgets ------------------------------------------------------------------------------
    def _enforce_budgets(self) -> None:
        while self.ram_bytes > self.ram_budget and self._evict(in_ram=True):
            pass
        while self.disk_bytes > self.disk_budget and self._evict(in_ram=False):
            pass

    def _evict(self, *, in_ram: bool) -> bool:
        """Take the least valuable leaf of one tier out of it; False when it holds none."""
        def held(b: Block) -> bool:
            return b.data is not None if in_ram else b.disk_bytes > 0

        now = time.monotonic()
        leaves = [b for b in self._blocks.values() if held(b)
                  and not any(held(self._blocks[k]) for k in self._children.get(b.key, ()))]
        if not leaves:
            return False
        victim = min(leaves, key=lambda b: b.retention_value(now))
        if in_ram and victim.disk_bytes:
            victim.data = None
            self.ram_bytes -= victim.num_bytes
        elif not in_ram and victim.data is not None:
            if self.files is not None:
                self.files.delete(victim.key)
            self.disk_bytes -= victim.disk_bytes
            victim.disk_bytes = 0
        else:
            self._remove(victim)
        return True

    # --- restart ------------------------------------------------------------------------------
    def _load_index(self, headers: list[BlockHeader]) -> None:
        """Rebuild the chains from block file headers; blocks no chain reaches are deleted."""
        by_parent: dict[str, list[BlockHeader]] = {}
        for h in headers:
            by_parent.setdefault(h.parent, []).append(h)
        layouts = {h.layout for h in headers}
        layout = max(layouts, key=lambda t: sum(h.layout == t for h in headers), default=None)
        if layout is not None:
            self.layout = Layout.from_json(layout)
        todo, reached = [(self.seed, 0)], set()
        while todo:
            parent, start = todo.pop()
            for h in by_parent.get(parent, []):
                if h.start != start or h.layout != layout or self._is_partial_parent(parent):
                    continue
                blk = Block(h.key, parent, start, h.tokens, h.data_len, 0.0,
                            disk_bytes=h.path.stat().st_size)
                self._link(blk)
                self.disk_bytes += blk.disk_bytes
                reached.add(h.key)
                todo.append((h.key, blk.end))
        for h in headers:
            if h.key not in reached:
                h.path.unlink(missing_ok=True)
        if reached:
            log.info("memory: %d KV blocks on disk (%.1f MiB)", len(reached),
                     self.disk_bytes / 2**20)

    def _is_partial_parent(self, parent: str) -> bool:
        blk = self._blocks.get(parent)
        return blk is not None and len(blk.tokens) < self.block_tokens
