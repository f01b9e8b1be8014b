"""The GGUF checks refuse every corrupt variant with a clear message, accept the real files,
and their ggml type table agrees with the libggml that llama-cpp-python ships."""

from __future__ import annotations

import ctypes
from pathlib import Path

import llama_cpp
import pytest

from pensieve.errors import InvalidModelFile
from pensieve.store.gguf import GGML_TYPES, read_gguf
from tests.store.gguf_variants import VARIANTS, Layout, Variant, write_variant


def test_the_default_model_reads_back_its_facts(default_model: Path) -> None:
    info = read_gguf(default_model)
    assert info.architecture == "llama"
    assert info.quantization == "Q4_1"
    assert info.context_length == 8192
    assert 130e6 < info.num_params < 140e6
    assert len(info.tensors) == 272
    assert info.metadata["general.license"] == "apache-2.0"
    assert "<|im_start|>" in (info.chat_template or "")
    assert info.kv_bytes_per_token() == 30 * 3 * (64 + 64) * 2  # layers, kv heads, k+v, f16


def test_there_are_at_least_twenty_distinct_variants() -> None:
    assert len({v.name for v in VARIANTS}) == len(VARIANTS) >= 20


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_each_corrupt_variant_is_refused_clearly(variant: Variant, layout: Layout,
                                                 tmp_path: Path) -> None:
    path = write_variant(variant, layout, tmp_path / f"{variant.name}.gguf")
    with pytest.raises(InvalidModelFile) as caught:
        read_gguf(path)
    message = caught.value.message
    assert variant.expect in message, message
    assert message.startswith(path.name)
    assert caught.value.status_code == 400


def test_an_unchanged_sparse_copy_is_accepted(layout: Layout, tmp_path: Path) -> None:
    """The variants differ from a valid file only by what they break."""
    keep = Variant("unchanged", "", lambda buf, _lay: buf)
    info = read_gguf(write_variant(keep, layout, tmp_path / "same.gguf"))
    assert len(info.tensors) == len(layout.tensor_names)


def _libggml() -> ctypes.CDLL:
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    lib = ctypes.CDLL(str(next(lib_dir.glob("libggml-base.so*"))))
    lib.ggml_type_size.restype = ctypes.c_size_t
    lib.ggml_type_size.argtypes = [ctypes.c_int]
    lib.ggml_blck_size.restype = ctypes.c_int64
    lib.ggml_blck_size.argtypes = [ctypes.c_int]
    lib.ggml_type_name.restype = ctypes.c_char_p
    lib.ggml_type_name.argtypes = [ctypes.c_int]
    return lib


def test_ggml_type_table_matches_libggml() -> None:
    lib = _libggml()
    for type_id, (name, block_size, type_size) in GGML_TYPES.items():
        assert lib.ggml_type_name(type_id).decode().upper() == name
        assert lib.ggml_blck_size(type_id) == block_size, name
        assert lib.ggml_type_size(type_id) == type_size, name
    # every type libggml still supports below the table's end is in the table
    for type_id in range(max(GGML_TYPES)):
        if type_id not in GGML_TYPES:
            assert lib.ggml_blck_size(type_id) == 0, type_id
