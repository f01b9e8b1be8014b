"""GGUF files, read and checked in Python before llama.cpp ever opens them.

    magic "GGUF" | version u32 | n_tensors u64 | n_kv u64
    n_kv x (key string, value type u32, value)        string = u64 length + bytes
    n_tensors x (name string, n_dims u32, dims u64[n_dims], ggml type u32, offset u64)
    padding to `general.alignment` (default 32)
    tensor data: each tensor at its offset, in order, each padded to the alignment

Every length, count and offset is checked against the bytes that are really there, so a
truncated or hostile file gets an `InvalidModelFile` naming what is wrong and where, instead of
reaching native code.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path

from pensieve.errors import InvalidModelFile

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_TENSOR_NAME = 63  # GGML_MAX_NAME - 1
MAX_KEY_LENGTH = 65535
MAX_ELEMENTS = 1 << 62
_U64 = struct.Struct("<Q")
SMALL_ARRAY = 64  # longer arrays are summarised (type and length), not kept

# GGUF value types: (name, struct format) for fixed-size scalars.
_SCALARS: dict[int, tuple[str, str]] = {
    0: ("uint8", "<B"), 1: ("int8", "<b"), 2: ("uint16", "<H"), 3: ("int16", "<h"),
    4: ("uint32", "<I"), 5: ("int32", "<i"), 6: ("float32", "<f"), 7: ("bool", "<?"),
    10: ("uint64", "<Q"), 11: ("int64", "<q"), 12: ("float64", "<d"),
}
TYPE_STRING, TYPE_ARRAY = 8, 9

# ggml tensor types: name, elements per block, bytes per block (from ggml.c's type traits;
# tests/unit/test_gguf.py checks this table against the libggml that llama-cpp-python ships).
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17), 40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18), 42: ("Q2_0", 64, 18),
}

# llama.cpp's `general.file_type` (enum llama_ftype) -> the quantisation users know.
FILE_TYPES: dict[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS",
    23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S",
    29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0",
    38: "MXFP4_MOE",
}

# llama.cpp's `general.sampling.*` keys (a model's recommended sampling) -> Pensieve's names.
# Mirostat, XTC and the sampler order have no counterpart here and are left out.
SAMPLING_KEYS: dict[str, str] = {
    "general.sampling.temp": "temperature", "general.sampling.top_k": "top_k",
    "general.sampling.top_p": "top_p", "general.sampling.min_p": "min_p",
    "general.sampling.penalty_repeat": "repeat_penalty",
    "general.sampling.penalty_last_n": "repeat_last_n",
}


@dataclass(frozen=True, slots=True)
class ArraySummary:
    """A long metadata array (a vocabulary, merges), kept as its element type and length."""

    type_name: str
    length: int


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    type_name: str
    offset: int
    num_bytes: int

    @property
    def num_elements(self) -> int:
        total = 1
        for dim in self.shape:
            total *= dim
        return total


@dataclass(frozen=True, slots=True)
class GgufInfo:
    """What a checked GGUF file says about itself."""

    path: str
    file_size: int
    version: int
    alignment: int
    data_offset: int
    metadata: dict[str, object]
    tensors: tuple[TensorInfo, ...] = field(repr=False)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "unknown"))

    def arch_value(self, key: str) -> object | None:
        return self.metadata.get(f"{self.architecture}.{key}")

    @property
    def num_params(self) -> int:
        return sum(t.num_elements for t in self.tensors)

    @property
    def context_length(self) -> int | None:
        value = self.arch_value("context_length")
        return value if isinstance(value, int) else None

    @property
    def quantization(self) -> str:
        file_type = self.metadata.get("general.file_type")
        if isinstance(file_type, int) and file_type in FILE_TYPES:
            return FILE_TYPES[file_type]
        sizes: dict[str, int] = {}
        for t in self.tensors:
            sizes[t.type_name] = sizes.get(t.type_name, 0) + t.num_bytes
        return max(sizes, key=sizes.__getitem__) if sizes else "unknown"

    @property
    def chat_template(self) -> str | None:
        value = self.metadata.get("tokenizer.chat_template")
        return value if isinstance(value, str) else None

    @property
    def sampling(self) -> dict[str, object]:
        """The sampling the file recommends (its `general.sampling.*` keys), by Pensieve's
        names; unchecked."""
        return {name: self.metadata[key] for key, name in SAMPLING_KEYS.items()
                if key in self.metadata}

    def kv_bytes_per_token(self, bytes_k: float = 2.0, bytes_v: float = 2.0) -> int:
        """K and V bytes per token over all layers (an upper bound for sliding-window
        models), for the memory budget; f16 unless told the bytes per element."""
        n_head = _int(self.arch_value("attention.head_count"), 1) or 1
        n_head_kv = _int(self.arch_value("attention.head_count_kv"), n_head) or n_head
        head_k, head_v = self.head_dims()
        return round(self.num_layers() * n_head_kv * (head_k * bytes_k + head_v * bytes_v))

    def head_dims(self) -> tuple[int, int]:
        """The K and V head sizes (a quantized KV cache needs them divisible by its block)."""
        n_embd = _int(self.arch_value("embedding_length"), 0)
        n_head = _int(self.arch_value("attention.head_count"), 1) or 1
        return (_int(self.arch_value("attention.key_length"), n_embd // n_head),
                _int(self.arch_value("attention.value_length"), n_embd // n_head))

    def num_layers(self) -> int:
        return _int(self.arch_value("block_count"), 0)


def _int(value: object, default: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        return default
    return value


def read_gguf(path: str | Path) -> GgufInfo:
    """Parse and check a GGUF file's header and tensor table; `InvalidModelFile` if anything
    is out of bounds or inconsistent."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size < 24:
                raise InvalidModelFile(f"{path.name}: not a GGUF file ({size} bytes is too small "
                                       "for a GGUF header)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _Parser(path, buf, size).parse()
    except OSError as exc:
        raise InvalidModelFile(f"{path.name}: cannot read the file: {exc.strerror}") from exc


class _Parser:
    def __init__(self, path: Path, buf: mmap.mmap, size: int):
        self.path, self.buf, self.size, self.pos = path, buf, size, 0

    # --- primitives ----------------------------------------------------------------------
    def fail(self, message: str) -> InvalidModelFile:
        return InvalidModelFile(f"{self.path.name}: not a valid GGUF file: {message}")

    def need(self, num_bytes: int, what: str) -> None:
        if num_bytes > self.size - self.pos:
            raise self.fail(f"{what} at byte {self.pos} needs {num_bytes} bytes, but the file "
                            f"ends at byte {self.size} (truncated?)")

    def scalar(self, fmt: str, what: str) -> int | float | bool:
        num_bytes = struct.calcsize(fmt)
        self.need(num_bytes, what)
        value: int | float | bool
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += num_bytes
        return value

    def u32(self, what: str) -> int:
        return int(self.scalar("<I", what))

    def u64(self, what: str) -> int:
        return int(self.scalar("<Q", what))

    def raw_string(self, what: str, max_length: int | None = None) -> bytes:
        length = self.u64(f"length of {what}")
        if max_length is not None and length > max_length:
            raise self.fail(f"{what} is {length} bytes long (at most {max_length} allowed)")
        self.need(length, what)
        data = self.buf[self.pos:self.pos + length]
        self.pos += length
        return data

    def text(self, what: str, max_length: int | None = None) -> str:
        return self.raw_string(what, max_length).decode("utf-8", errors="replace")

    # --- sections ------------------------------------------------------------------------
    def parse(self) -> GgufInfo:
        self.need(4, "magic")
        magic = self.buf[0:4]
        if magic != GGUF_MAGIC:
            raise self.fail(f"bad magic {magic!r} (expected b'GGUF')")
        self.pos = 4
        version = self.u32("version")
        if version not in SUPPORTED_VERSIONS:
            raise self.fail(f"GGUF version {version} is not supported (only 2 and 3)")
        num_tensors = self.u64("tensor count")
        num_kv = self.u64("metadata count")
        # every entry takes at least this many bytes, so larger counts cannot be real
        if num_kv > (self.size - self.pos) // 13:
            raise self.fail(f"metadata count {num_kv} is impossible for a {self.size}-byte file "
                            "(truncated or corrupt)")
        if num_tensors > (self.size - self.pos) // 32:
            raise self.fail(f"tensor count {num_tensors} is impossible for a "
                            f"{self.size}-byte file (truncated or corrupt)")
        metadata = self.metadata(num_kv)
        alignment = self.alignment(metadata)
        tensors = [self.tensor_info(i) for i in range(num_tensors)]
        data_offset = _align(self.pos, alignment)
        if data_offset > self.size:
            raise self.fail(f"tensor data would start at byte {data_offset}, past the end of "
                            f"the file ({self.size} bytes)")
        self.check_tensors(tensors, alignment, data_offset)
        self.check_architecture(metadata, num_tensors)
        return GgufInfo(str(self.path), self.size, version, alignment, data_offset, metadata,
                        tuple(tensors))

    def metadata(self, num_kv: int) -> dict[str, object]:
        metadata: dict[str, object] = {}
        for i in range(num_kv):
            key = self.raw_string(f"metadata key #{i}", MAX_KEY_LENGTH)
            if not key or not all(0x20 < c < 0x7F for c in key):
                raise self.fail(f"metadata key #{i} {key[:80]!r} is empty or not printable ASCII")
            name = key.decode("ascii")
            if name in metadata:
                raise self.fail(f"metadata key {name!r} appears twice")
            value_type = self.u32(f"type of {name!r}")
            metadata[name] = self.value(value_type, name)
        return metadata

    def value(self, value_type: int, name: str) -> object:
        if value_type in _SCALARS:
            return self.scalar(_SCALARS[value_type][1], f"value of {name!r}")
        if value_type == TYPE_STRING:
            return self.text(f"value of {name!r}")
        if value_type == TYPE_ARRAY:
            return self.array(name)
        raise self.fail(f"metadata {name!r} has unknown value type {value_type}")

    def array(self, name: str) -> object:
        elem_type = self.u32(f"element type of {name!r}")
        count = self.u64(f"length of {name!r}")
        if elem_type in _SCALARS:
            type_name, fmt = _SCALARS[elem_type]
            elem_size = struct.calcsize(fmt)
            if count > (self.size - self.pos) // elem_size:
                raise self.fail(f"array {name!r} claims {count} {type_name} elements, more "
                                f"than the {self.size - self.pos} bytes left in the file")
            if count > SMALL_ARRAY:
                self.pos += count * elem_size
                return ArraySummary(type_name, count)
            return [self.scalar(fmt, f"element of {name!r}") for _ in range(count)]
        if elem_type == TYPE_STRING:
            if count > (self.size - self.pos) // 8:
                raise self.fail(f"array {name!r} claims {count} strings, more than the "
                                f"{self.size - self.pos} bytes left in the file could hold")
            if count > SMALL_ARRAY:  # a vocabulary: tens of thousands, skipped in one loop
                self.skip_strings(count, name)
                return ArraySummary("string", count)
            items = [self.raw_string(f"string #{j} of {name!r}") for j in range(count)]
            return [item.decode("utf-8", errors="replace") for item in items]
        raise self.fail(f"array {name!r} has unsupported element type {elem_type}")

    def skip_strings(self, count: int, name: str) -> None:
        """Step over `count` strings with the checks of `raw_string`, without reading them."""
        buf, pos, size, length_at = self.buf, self.pos, self.size, _U64.unpack_from
        for j in range(count):
            if pos + 8 > size:
                self.pos = pos
                self.need(8, f"length of string #{j} of {name!r}")
            (length,) = length_at(buf, pos)
            if length > size - pos - 8:
                self.pos = pos + 8
                self.need(length, f"string #{j} of {name!r}")
            pos += 8 + length
        self.pos = pos

    def alignment(self, metadata: dict[str, object]) -> int:
        value = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0 \
                or value & (value - 1) or value > 1 << 20:
            raise self.fail(f"general.alignment {value!r} is not a power of two")
        return value

    def tensor_info(self, index: int) -> TensorInfo:
        name_bytes = self.raw_string(f"name of tensor #{index}", MAX_TENSOR_NAME)
        name = name_bytes.decode("utf-8", errors="replace")
        if not name_bytes:
            raise self.fail(f"tensor #{index} has an empty name")
        num_dims = self.u32(f"dimension count of {name!r}")
        if not 1 <= num_dims <= MAX_DIMS:
            raise self.fail(f"tensor {name!r} has {num_dims} dimensions (1 to {MAX_DIMS})")
        shape = tuple(self.u64(f"dimension of {name!r}") for _ in range(num_dims))
        type_id = self.u32(f"type of {name!r}")
        offset = self.u64(f"offset of {name!r}")
        if type_id not in GGML_TYPES:
            raise self.fail(f"tensor {name!r} has unknown ggml type {type_id}")
        type_name, block_size, type_size = GGML_TYPES[type_id]
        num_elements = 1
        for dim in shape:
            num_elements *= dim
            if dim > MAX_ELEMENTS or num_elements > MAX_ELEMENTS:
                raise self.fail(f"tensor {name!r} has an absurd shape {shape}")
        if shape[0] % block_size:
            raise self.fail(f"tensor {name!r}: first dimension {shape[0]} is not a multiple of "
                            f"the {type_name} block size {block_size}")
        num_bytes = num_elements // block_size * type_size
        return TensorInfo(name, shape, type_name, offset, num_bytes)

    def check_tensors(self, tensors: list[TensorInfo], alignment: int, data_offset: int) -> None:
        names: set[str] = set()
        expected = 0  # llama.cpp wants the tensors in order, each padded to the alignment
        data_size = self.size - data_offset
        for t in tensors:
            if t.name in names:
                raise self.fail(f"tensor {t.name!r} appears twice")
            names.add(t.name)
            if t.offset != expected:
                raise self.fail(f"tensor {t.name!r} has offset {t.offset}, expected {expected} "
                                f"(offsets must be aligned to {alignment} and in order)")
            if t.offset + t.num_bytes > data_size:
                raise self.fail(
                    f"tensor {t.name!r} ({t.num_bytes} bytes at data offset {t.offset}) ends "
                    f"past the end of the file (only {data_size} bytes of tensor data)")
            expected = _align(t.offset + t.num_bytes, alignment)

    def check_architecture(self, metadata: dict[str, object], num_tensors: int) -> None:
        arch = metadata.get("general.architecture")
        if not isinstance(arch, str) or not arch:
            raise self.fail("general.architecture is missing or not a string")
        if num_tensors == 0:
            raise self.fail("the file has no tensors")


def _align(offset: int, alignment: int) -> int:
    return offset + (-offset % alignment)
