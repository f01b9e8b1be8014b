"""Corrupt GGUF files made from the real default model: each variant changes a few bytes of the
header or tensor table (or cuts the file), and names the words its error message must contain.

Files are sparse: only the header and tensor table are written, the tensor data is a hole of
the right length, so 25 variants of a 94 MiB model cost a few MB of disk."""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pensieve.store.gguf import read_gguf

Mutate = Callable[[bytearray, "Layout"], bytearray | None]


@dataclass(frozen=True)
class Layout:
    """Where things are in the real file."""

    header: bytes  # everything before the tensor data
    file_size: int
    tensor_names: tuple[str, ...]

    def find(self, needle: bytes) -> int:
        at = self.header.find(needle)
        assert at >= 0, needle
        return at

    def key_at(self, key: str) -> int:
        """Offset of a metadata key's length field."""
        return self.find(struct.pack("<Q", len(key)) + key.encode())

    def value_at(self, key: str) -> int:
        """Offset of the value type that follows a key."""
        return self.key_at(key) + 8 + len(key)

    def tensor_at(self, name: str) -> int:
        return self.find(struct.pack("<Q", len(name)) + name.encode())


@dataclass(frozen=True)
class Variant:
    name: str
    expect: str  # must appear in the error message
    mutate: Mutate
    truncate_to: int | None = None  # cut the file here instead of keeping its length


def _put(fmt: str, at: int, value: int) -> Mutate:
    def mutate(buf: bytearray, _layout: Layout) -> bytearray:
        struct.pack_into(fmt, buf, at, value)
        return buf
    return mutate


def _at(locate: Callable[[Layout], int], fmt: str, value: int) -> Mutate:
    def mutate(buf: bytearray, layout: Layout) -> bytearray:
        struct.pack_into(fmt, buf, locate(layout), value)
        return buf
    return mutate


def _replace(old: bytes, new: bytes) -> Mutate:
    assert len(old) == len(new)

    def mutate(buf: bytearray, layout: Layout) -> bytearray:
        at = layout.find(old)
        buf[at:at + len(new)] = new
        return buf
    return mutate


def _same_length_tensor_names(layout: Layout) -> tuple[str, str]:
    by_length: dict[int, str] = {}
    for name in layout.tensor_names:
        if len(name) in by_length:
            return by_length[len(name)], name
        by_length[len(name)] = name
    raise AssertionError("no two tensor names of the same length")


def _duplicate_tensor(buf: bytearray, layout: Layout) -> bytearray:
    first, second = _same_length_tensor_names(layout)
    at = layout.tensor_at(second) + 8
    buf[at:at + len(first)] = first.encode()
    return buf


def _first_tensor(field: int) -> Callable[[Layout], int]:
    """Offset of a field of token_embd.weight's record: 0 n_dims, 1 dim0, 2 dim1, 3 type,
    4 offset (it is 2-dimensional)."""
    name = "token_embd.weight"
    return lambda layout: layout.tensor_at(name) + 8 + len(name) + (0, 4, 12, 20, 24)[field]


def _keep(buf: bytearray, _layout: Layout) -> bytearray:
    return buf


ARCH = "general.architecture"
TOKENS = "tokenizer.ggml.tokens"

VARIANTS: tuple[Variant, ...] = (
    Variant("empty", "too small", _keep, truncate_to=0),
    Variant("ten-bytes", "too small", _keep, truncate_to=10),
    Variant("bad-magic", "bad magic", _replace(b"GGUF", b"GGML")),
    Variant("version-1", "version 1 is not supported", _put("<I", 4, 1)),
    Variant("version-99", "version 99", _put("<I", 4, 99)),
    Variant("absurd-tensor-count", "tensor count", _put("<Q", 8, 1 << 63)),
    Variant("absurd-metadata-count", "metadata count", _put("<Q", 16, (1 << 64) - 1)),
    Variant("zero-tensors", "no tensors", _put("<Q", 8, 0)),
    Variant("cut-in-header", "truncated", _keep, truncate_to=5000),
    Variant("cut-in-vocabulary", "truncated", _keep, truncate_to=500_000),
    Variant("cut-in-tensor-table", "truncated", _keep, truncate_to=-200),
    Variant("cut-in-tensor-data", "past the end", _keep, truncate_to=50_000_000),
    Variant("huge-key-length", "at most 65535", _at(lambda lay: lay.key_at(ARCH), "<Q", 1 << 40)),
    Variant("unprintable-key", "not printable ASCII",
            _replace(ARCH.encode(), b"general.archi\x01ecture")),
    Variant("duplicate-key", "appears twice", _replace(b"general.name", b"general.type")),
    Variant("unknown-value-type", "unknown value type",
            _at(lambda lay: lay.value_at(ARCH), "<I", 99)),
    Variant("huge-string", "truncated", _at(lambda lay: lay.value_at(ARCH) + 4, "<Q", 1 << 62)),
    Variant("absurd-array-length", "claims",
            _at(lambda lay: lay.value_at(TOKENS) + 8, "<Q", 1 << 60)),
    Variant("nested-array", "unsupported element type",
            _at(lambda lay: lay.value_at(TOKENS) + 4, "<I", 9)),
    Variant("alignment-not-power-of-two", "power of two",
            _replace(b"llama.block_count", b"general.alignment")),
    Variant("missing-architecture", "general.architecture is missing",
            _replace(ARCH.encode(), b"general.architecturX")),
    Variant("five-dimensions", "dimensions", _at(_first_tensor(0), "<I", 5)),
    Variant("absurd-dimension", "absurd shape", _at(_first_tensor(2), "<Q", 1 << 63)),
    Variant("tensor-past-end", "past the end", _at(_first_tensor(2), "<Q", 10_000_000)),
    Variant("partial-block", "not a multiple", _at(_first_tensor(1), "<Q", 577)),
    Variant("unknown-ggml-type", "unknown ggml type", _at(_first_tensor(3), "<I", 99)),
    Variant("removed-ggml-type", "unknown ggml type", _at(_first_tensor(3), "<I", 4)),
    Variant("misaligned-offset", "offset", _at(_first_tensor(4), "<Q", 1)),
    Variant("long-tensor-name", "at most 63",
            _at(lambda lay: lay.tensor_at("token_embd.weight"), "<Q", 4096)),
    Variant("duplicate-tensor", "appears twice", _duplicate_tensor),
)


def layout_of(model: Path) -> Layout:
    info = read_gguf(model)
    with open(model, "rb") as f:
        header = f.read(info.data_offset)
    return Layout(header, info.file_size, tuple(t.name for t in info.tensors))


def write_variant(variant: Variant, layout: Layout, dest: Path) -> Path:
    buf = variant.mutate(bytearray(layout.header), layout)
    assert buf is not None
    size = layout.file_size
    if variant.truncate_to is not None:
        size = variant.truncate_to if variant.truncate_to >= 0 \
            else len(layout.header) + variant.truncate_to
    with open(dest, "wb") as f:
        f.write(bytes(buf[:size]))
        f.truncate(size)  # a hole stands in for the tensor data
    return dest
