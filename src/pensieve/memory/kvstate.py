"""Cutting llama.cpp's sequence state into blocks of positions, and assembling it back.

The layout read here is `llama_state_seq_get_data` of llama-cpp-python 0.3.36's llama.cpp for a
plain KV cache (llama-context.cpp `state_seq_get_data`, llama-kv-cache.cpp `state_write`):

    u32 magic 0xaf143cd8 | i32 seq_id | u32 n_stream
    per stream: u32 cell_count, and when it is not 0:
      cells:  cell_count x (i32 pos | u32 n_seq_id = 1 | i32 seq_id)
      data:   u32 v_trans | u32 n_layer
              per layer: i32 k_type | u64 k_row_bytes | cell_count rows of K
              v_trans 0, per layer: i32 v_type | u64 v_row_bytes | cell_count rows of V
              v_trans 1, per layer: i32 v_type | u32 v_el_bytes | u32 n_embd_v
                                    | n_embd_v x (cell_count elements of V)

The cells come in the cache's cell order, which is position order only while a sequence's
cells were allocated one after another: under concurrent traffic (and after prefix sharing)
they interleave with other sequences' cells. So the cells' positions must be first_pos ..
first_pos + n - 1 each once, in any order, and rows are taken in position order. A block of
positions [a, b) is, per layer, the K rows and V rows of positions a..b-1 (or, transposed, those
elements of every V row): its bytes do not depend on the history before it, so equal prefixes
give equal blocks. Anything else (several caches, recurrent state, cells for M-RoPE, SWA-masked
cells, missing or repeated positions, bytes left over) is refused with `UnknownLayout`, and
memory keeps that model's sequences as whole snapshots instead.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import numpy as np

MAGIC = 0xAF143CD8
_U32 = struct.Struct("<I")
_I32 = struct.Struct("<i")
_U64 = struct.Struct("<Q")
_GGML_TYPE_LIMIT = 64  # ggml_type ids are small; anything past this is not a type
_U8 = np.dtype(np.uint8)
_CELL = np.dtype([("pos", "<i4"), ("n_seq", "<u4"), ("seq", "<i4")])


class UnknownLayout(ValueError):
    """A sequence state this module does not recognise: it must never be cut."""


@dataclass(frozen=True, slots=True)
class LayerLayout:
    k_type: int
    k_row: int  # bytes of K per cell
    v_type: int
    v_row: int  # bytes of V per cell (non-transposed) or per element (transposed: v_el)
    n_embd_v: int  # transposed only: V rows; 0 when V is not transposed

    @property
    def v_cell_bytes(self) -> int:
        return self.v_row * self.n_embd_v if self.n_embd_v else self.v_row


@dataclass(frozen=True, slots=True)
class Layout:
    """The shape of one sequence's state: what must match for blocks to be assembled."""

    n_stream: int
    v_trans: bool
    layers: tuple[LayerLayout, ...]

    @property
    def cell_bytes(self) -> int:
        return sum(lay.k_row + lay.v_cell_bytes for lay in self.layers)

    def to_json(self) -> str:
        return json.dumps({"n_stream": self.n_stream, "v_trans": self.v_trans,
                           "layers": [list(_layer_fields(lay)) for lay in self.layers]})

    @staticmethod
    def from_json(text: str) -> Layout:
        raw = json.loads(text)
        layers = tuple(LayerLayout(*(int(x) for x in lay)) for lay in raw["layers"])
        return Layout(int(raw["n_stream"]), bool(raw["v_trans"]), layers)


def _layer_fields(lay: LayerLayout) -> tuple[int, int, int, int, int]:
    return lay.k_type, lay.k_row, lay.v_type, lay.v_row, lay.n_embd_v


@dataclass(frozen=True, slots=True)
class SeqState:
    """A parsed sequence state: per-layer views into the original bytes (no copy)."""

    layout: Layout
    num_cells: int
    k: tuple[np.ndarray, ...]  # per layer: (cells, k_row) uint8
    v: tuple[np.ndarray, ...]  # per layer: (cells, v_row) or transposed (n_embd_v, cells, v_el)
    order: np.ndarray | None = None  # cell index of each position (from the first); None: same

    def block(self, start: int, end: int) -> bytes:
        """The KV bytes of positions [start, end): every layer's K, then every layer's V."""
        rows: slice | np.ndarray = (slice(start, end) if self.order is None
                                    else self.order[start:end])
        parts = [k[rows] for k in self.k]
        if self.layout.v_trans:
            parts += [v[:, rows] for v in self.v]
        else:
            parts += [v[rows] for v in self.v]
        return b"".join(np.ascontiguousarray(p).tobytes() for p in parts)


class _Reader:
    def __init__(self, data: bytes | memoryview) -> None:
        self.data = data
        self.at = 0

    def take(self, fmt: struct.Struct) -> int:
        if self.at + fmt.size > len(self.data):
            raise UnknownLayout("the state ends early")
        (value,) = fmt.unpack_from(self.data, self.at)
        self.at += fmt.size
        return int(value)

    def array(self, num_bytes: int, shape: tuple[int, ...], dtype: np.dtype = _U8
              ) -> np.ndarray:
        if num_bytes < 0 or self.at + num_bytes > len(self.data):
            raise UnknownLayout("the state ends early")
        out = np.frombuffer(self.data, dtype=dtype, count=num_bytes // dtype.itemsize,
                            offset=self.at).reshape(shape)
        self.at += num_bytes
        return out


def parse(data: bytes, first_pos: int = 0) -> SeqState:
    """Read one sequence's state, whose cells must hold positions first_pos, first_pos + 1, ...
    each once (in any cell order); raises UnknownLayout for anything it cannot cut safely."""
    r = _Reader(data)
    if r.take(_U32) != MAGIC:
        raise UnknownLayout("no sequence-state magic")
    seq_id = r.take(_I32)
    n_stream = r.take(_U32)
    if not 1 <= n_stream <= 4096:
        raise UnknownLayout(f"{n_stream} streams")
    state: SeqState | None = None
    for s in range(n_stream):
        num_cells = r.take(_U32)
        if num_cells == 0:
            continue
        if state is not None:
            raise UnknownLayout("cells in more than one stream")
        if s != (seq_id if n_stream > 1 else 0):
            raise UnknownLayout(f"cells in stream {s}, not the sequence's own")
        order = _check_cells(r, num_cells, seq_id, first_pos)
        state = _read_data(r, n_stream, num_cells, order)
    if state is None:
        raise UnknownLayout("the sequence holds no cells")
    if r.at != len(data):
        raise UnknownLayout(f"{len(data) - r.at} bytes after the KV cache (another memory?)")
    return state


def _check_cells(r: _Reader, num_cells: int, seq_id: int, first_pos: int) -> np.ndarray | None:
    """The cell index of each position in order (None when cells are in position order)."""
    cells = r.array(num_cells * _CELL.itemsize, (num_cells,), _CELL)
    if not (cells["n_seq"] == 1).all() or not (cells["seq"] == seq_id).all():
        raise UnknownLayout("cells not of this sequence alone (or with extra cell data)")
    wanted = np.arange(first_pos, first_pos + num_cells, dtype=np.int32)
    if np.array_equal(cells["pos"], wanted):
        return None
    order = np.argsort(cells["pos"], kind="stable")
    if not np.array_equal(cells["pos"][order], wanted):
        raise UnknownLayout("positions not each of first..last once (masked or shifted cells)")
    return order


def _read_data(r: _Reader, n_stream: int, num_cells: int, order: np.ndarray | None
               ) -> SeqState:
    v_trans = r.take(_U32)
    n_layer = r.take(_U32)
    if v_trans > 1 or not 1 <= n_layer <= 4096:
        raise UnknownLayout(f"v_trans={v_trans}, n_layer={n_layer}")
    ks, k_layout = [], []
    for _ in range(n_layer):
        k_type, k_row = _type(r), r.take(_U64)
        if k_row == 0:
            raise UnknownLayout("an empty K row")
        ks.append(r.array(num_cells * k_row, (num_cells, k_row)))
        k_layout.append((k_type, k_row))
    vs, layers = [], []
    for k_type, k_row in k_layout:
        v_type = _type(r)
        if v_trans:
            v_el, n_embd_v = r.take(_U32), r.take(_U32)
            if v_el == 0 or n_embd_v == 0:
                raise UnknownLayout("an empty transposed V")
            vs.append(r.array(n_embd_v * num_cells * v_el, (n_embd_v, num_cells, v_el)))
            layers.append(LayerLayout(k_type, k_row, v_type, v_el, n_embd_v))
        else:
            v_row = r.take(_U64)
            if v_row == 0:
                raise UnknownLayout("an empty V row")
            vs.append(r.array(num_cells * v_row, (num_cells, v_row)))
            layers.append(LayerLayout(k_type, k_row, v_type, v_row, 0))
    layout = Layout(n_stream, bool(v_trans), tuple(layers))
    return SeqState(layout, num_cells, tuple(ks), tuple(vs), order)


def _type(r: _Reader) -> int:
    t = r.take(_I32)
    if not 0 <= t < _GGML_TYPE_LIMIT:
        raise UnknownLayout(f"ggml type {t}")
    return t


def assemble(layout: Layout, blocks: list[bytes], seq_id: int) -> bytes:
    """One sequence state for `seq_id` from consecutive blocks starting at position 0."""
    per_cell = layout.cell_bytes
    if per_cell == 0 or any(len(b) % per_cell for b in blocks):
        raise UnknownLayout("a block is not a whole number of cells of this layout")
    counts = [len(b) // per_cell for b in blocks]
    n = sum(counts)
    if n == 0:
        raise UnknownLayout("no cells to assemble")
    out = [_U32.pack(MAGIC), _I32.pack(seq_id), _U32.pack(layout.n_stream)]
    own = seq_id if layout.n_stream > 1 else 0
    for s in range(layout.n_stream):
        out.append(_U32.pack(n if s == own else 0))
    at = 3 + own + 1  # the cells and data follow the sequence's own stream count
    cells = np.empty(n, dtype=_CELL)
    cells["pos"] = np.arange(n, dtype=np.int32)
    cells["n_seq"] = 1
    cells["seq"] = seq_id
    body = [cells.tobytes(), _U32.pack(int(layout.v_trans)), _U32.pack(len(layout.layers))]
    views = [_split(layout, b, c) for b, c in zip(blocks, counts, strict=True)]
    for i, lay in enumerate(layout.layers):
        body += [_I32.pack(lay.k_type), _U64.pack(lay.k_row)]
        body += [v[0][i].tobytes() for v in views]
    for i, lay in enumerate(layout.layers):
        if layout.v_trans:
            body += [_I32.pack(lay.v_type), _U32.pack(lay.v_row), _U32.pack(lay.n_embd_v)]
            body.append(np.concatenate([v[1][i] for v in views], axis=1).tobytes())
        else:
            body += [_I32.pack(lay.v_type), _U64.pack(lay.v_row)]
            body += [v[1][i].tobytes() for v in views]
    return b"".join(out[:at] + body + out[at:])


def _split(layout: Layout, block: bytes, count: int
           ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """A block's per-layer K and V views (the inverse of SeqState.block)."""
    r = _Reader(block)
    ks = [r.array(count * lay.k_row, (count, lay.k_row)) for lay in layout.layers]
    if layout.v_trans:
        vs = [r.array(lay.n_embd_v * count * lay.v_row, (lay.n_embd_v, count, lay.v_row))
              for lay in layout.layers]
    else:
        vs = [r.array(count * lay.v_row, (count, lay.v_row)) for lay in layout.layers]
    return ks, vs
