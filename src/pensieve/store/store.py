"""The model store: content-addressed blobs and the manifests that name them.

    <data_dir>/models/
      blobs/sha256-<hex>                  GGUF files, named by their sha256
      manifests/<name parts>/<tag>.json   {name, tag, digest, size, source, defaults}
      partial/                            downloads and copies in progress

A blob is written under partial/, checked (GGUF structure, sha256), fsynced and renamed into
blobs/; only then is its manifest written (temporary file, fsync, rename). A killed operation
leaves at most a file under partial/, never a half-listed model.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from pensieve.errors import InvalidRequest, ModelNotFound
from pensieve.sampling import BOUNDS, check_sequence_breakers
from pensieve.store.gguf import GgufInfo, read_gguf
from pensieve.store.names import ModelName, parse_digest, parse_name

log = logging.getLogger("pensieve.store")

ProgressFn = Callable[[int, int], None]  # (bytes done, bytes total)

@dataclass(frozen=True, slots=True)
class ModelDefaults:
    """Per-model defaults, in the spirit of an Ollama Modelfile's PARAMETER/SYSTEM/TEMPLATE.
    Sampling names are Ollama's (`repeat_last_n`) and llama-server's (`dry_*`)."""

    num_ctx: int | None = None
    system: str | None = None
    template: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    num_predict: int | None = None
    repeat_last_n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    dry_multiplier: float | None = None
    dry_base: float | None = None
    dry_allowed_length: int | None = None
    dry_penalty_last_n: int | None = None
    dry_sequence_breakers: tuple[str, ...] | None = None

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> ModelDefaults:
        unknown = set(data) - set(cls.keys())
        if unknown:
            raise InvalidRequest(f"Unknown model defaults: {', '.join(sorted(unknown))}; "
                                 f"known: {', '.join(cls.keys())}.")
        values: dict[str, Any] = dict(data)  # unchecked until check() below
        for key in ("stop", "dry_sequence_breakers"):
            if key in values and values[key] is not None:
                items = values[key]
                if not isinstance(items, str | list | tuple):
                    raise InvalidRequest(f"Model default {key} must be a string or a list of "
                                         "them.")
                values[key] = (items,) if isinstance(items, str) else tuple(items)
        defaults = cls(**values)
        defaults.check()
        return defaults

    @classmethod
    def from_gguf(cls, info: GgufInfo) -> ModelDefaults:
        """The defaults a GGUF file brings (its `general.sampling.*` keys). A value out of
        range is left out with a warning: a file's suggestion never stops it being served."""
        values: dict[str, object] = {}
        for key, value in info.sampling.items():
            if isinstance(value, float) and BOUNDS[key].integer and value.is_integer():
                value = int(value)
            if not BOUNDS[key].contains(value):
                log.warning("ignoring %s's sampling default %s=%r: not %s", info.path, key,
                            value, BOUNDS[key].describe())
                continue
            values[key] = value
        return cls.from_dict(values)

    def check(self) -> None:
        for key, bound in BOUNDS.items():
            value = getattr(self, key)
            if value is not None and not bound.contains(value):
                raise InvalidRequest(f"Model default {key} must be {bound.describe()}, not "
                                     f"{value!r}.", param=key)
        for key in ("system", "template"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, str):
                raise InvalidRequest(f"Model default {key} must be a string.")
        if not all(isinstance(s, str) for s in self.stop):
            raise InvalidRequest("Model default stop must be strings.")
        if self.dry_sequence_breakers is not None:
            problem = check_sequence_breakers(self.dry_sequence_breakers)
            if problem is not None:
                raise InvalidRequest(f"Model default {problem}.",
                                     param="dry_sequence_breakers")

    def over(self, base: ModelDefaults) -> ModelDefaults:
        """These defaults, with `base`'s for whatever these leave unset (a store entry's over
        the ones its GGUF file brings)."""
        mine = self.to_dict()
        return ModelDefaults.from_dict({**base.to_dict(), **mine})

    def to_dict(self) -> dict[str, object]:
        data: dict[str, object] = {}
        for key in self.keys():
            value = getattr(self, key)
            if value is None or (key == "stop" and not value):
                continue
            data[key] = list(value) if isinstance(value, tuple) else value
        return data


@dataclass(frozen=True, slots=True)
class Manifest:
    name: ModelName
    digest: str  # 64 hex digits
    size: int
    source: str
    created: float = field(default_factory=time.time)
    defaults: ModelDefaults = field(default_factory=ModelDefaults)

    def to_json(self) -> str:
        return json.dumps({"schema": 1, "name": self.name.name, "tag": self.name.tag,
                           "digest": f"sha256:{self.digest}", "size": self.size,
                           "source": self.source, "created": self.created,
                           "defaults": self.defaults.to_dict()}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("schema") != 1:
            raise ValueError("not a schema-1 manifest")
        name = parse_name(f"{data['name']}:{data['tag']}")
        size = data["size"]
        if not isinstance(size, int) or size < 0:
            raise ValueError("bad size")
        return cls(name, parse_digest(data["digest"]), size, str(data.get("source", "")),
                   float(data.get("created", 0)),
                   ModelDefaults.from_dict(data.get("defaults") or {}))


class ModelStore:
    """Blobs and manifests under one root folder."""

    def __init__(self, root: Path):
        self.root = root
        self.blobs = root / "blobs"
        self.manifests = root / "manifests"
        self.partial = root / "partial"

    # --- reading ---------------------------------------------------------------------------
    def blob_path(self, digest: str) -> Path:
        return self.blobs / f"sha256-{parse_digest('sha256:' + digest)}"

    def manifest_path(self, name: ModelName) -> Path:
        return self.manifests.joinpath(*name.parts).with_suffix(".json")

    def find(self, name: str) -> Manifest | None:
        path = self.manifest_path(parse_name(name))
        try:
            return Manifest.from_json(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, InvalidRequest) as exc:
            log.warning("ignoring the unreadable manifest %s: %s", path, exc)
            return None

    def get(self, name: str) -> Manifest:
        manifest = self.find(name)
        if manifest is None:
            raise ModelNotFound(name, [str(m.name) for m in self.list()])
        return manifest

    def list(self) -> list[Manifest]:
        return self._read_manifests()[0]

    def _read_manifests(self) -> tuple[builtins.list[Manifest], int]:
        """The readable manifests, and how many could not be read (skipped with a warning)."""
        found, num_unreadable = [], 0
        for path in sorted(self.manifests.rglob("*.json")) if self.manifests.is_dir() else []:
            try:
                found.append(Manifest.from_json(path.read_text()))
            except (OSError, ValueError, KeyError, TypeError, InvalidRequest) as exc:
                log.warning("ignoring the unreadable manifest %s: %s", path, exc)
                num_unreadable += 1
        return found, num_unreadable

    def prune(self, *, min_age_s: float = 3600.0) -> builtins.list[Path]:
        """Remove what nothing names any more: blobs no manifest refers to (an upload never
        used by a create, a model whose last name was removed by hand) and uploads or imports
        left in partial/ by a crash. Pulls' partial files stay, so a pull can resume. Only
        files untouched for `min_age_s` go, so an operation in flight in another process keeps
        its file; and nothing goes while a manifest cannot be read, since its blob may be one
        of them. Returns what was removed."""
        manifests, num_unreadable = self._read_manifests()
        if num_unreadable:
            log.warning("not pruning the store: %d manifest(s) could not be read", num_unreadable)
            return []
        keep = {self.blob_path(m.digest) for m in manifests}
        cutoff = time.time() - min_age_s
        candidates = [p for p in (self.blobs.iterdir() if self.blobs.is_dir() else [])
                      if p not in keep]
        candidates += [p for p in (self.partial.iterdir() if self.partial.is_dir() else [])
                       if p.name.startswith(("upload-", "import-"))]
        removed = []
        for path in candidates:
            try:
                if path.is_file() and path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed.append(path)
            except OSError as exc:
                log.warning("could not remove %s: %s", path, exc)
        if removed:
            log.info("pruned %d unused file(s) from the model store", len(removed))
        return removed

    # --- writing ---------------------------------------------------------------------------
    def add_file(self, source: Path, *, expected_digest: str | None = None,
                 link: bool = False, progress: ProgressFn | None = None) -> tuple[str, int]:
        """Check a GGUF file and put it among the blobs (copied, or hard-linked when `link`
        and possible). Returns (digest, size)."""
        read_gguf(source)  # refuse a bad file before copying it
        self.partial.mkdir(parents=True, exist_ok=True)
        tmp = self.partial / f"import-{os.getpid()}-{time.monotonic_ns()}"
        try:
            if link and _try_link(source, tmp):
                digest = sha256_file(tmp, progress)
            else:
                digest = _copy_hashing(source, tmp, progress)
            size = tmp.stat().st_size
            return self.commit_blob(tmp, digest, expected_digest), size
        finally:
            tmp.unlink(missing_ok=True)

    def commit_blob(self, tmp: Path, digest: str, expected_digest: str | None = None) -> str:
        """Move a fully written file into blobs/ once its GGUF structure and digest check out."""
        if expected_digest is not None and digest != expected_digest:
            raise InvalidRequest(f"sha256 mismatch: the file has {digest}, expected "
                                 f"{expected_digest}; refusing it.", code="digest_mismatch")
        read_gguf(tmp)
        self.blobs.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, self.blob_path(digest))
        _fsync_dir(self.blobs)
        return digest

    def write_manifest(self, manifest: Manifest) -> None:
        if not self.blob_path(manifest.digest).is_file():
            raise InvalidRequest(f"blob sha256:{manifest.digest} is not in the store")
        path = self.manifest_path(manifest.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, manifest.to_json())

    def import_file(self, source: Path, name: str, *, defaults: ModelDefaults | None = None,
                    link: bool = False, progress: ProgressFn | None = None) -> Manifest:
        model = parse_name(name)
        digest, size = self.add_file(source, link=link, progress=progress)
        manifest = Manifest(model, digest, size, f"file:{source.resolve()}",
                            defaults=defaults or ModelDefaults())
        self.write_manifest(manifest)
        log.info("imported %s as %s (sha256:%s)", source, model, digest[:12])
        return manifest

    def copy(self, source: str, destination: str) -> Manifest:
        manifest = self.get(source)
        copied = Manifest(parse_name(destination), manifest.digest, manifest.size,
                          manifest.source, time.time(), manifest.defaults)
        self.write_manifest(copied)
        return copied

    def remove(self, name: str) -> Manifest:
        manifest = self.get(name)
        self.manifest_path(manifest.name).unlink()
        self._prune_empty_dirs(self.manifest_path(manifest.name).parent)
        if not any(m.digest == manifest.digest for m in self.list()):
            self.blob_path(manifest.digest).unlink(missing_ok=True)
        return manifest

    def _prune_empty_dirs(self, folder: Path) -> None:
        while folder != self.manifests and folder.is_relative_to(self.manifests):
            try:
                folder.rmdir()
            except OSError:
                return
            folder = folder.parent


def sha256_file(path: Path, progress: ProgressFn | None = None) -> str:
    digest = hashlib.sha256()
    total, done = path.stat().st_size, 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
            done += len(chunk)
            if progress is not None:
                progress(done, total)
    return digest.hexdigest()


def _copy_hashing(source: Path, dest: Path, progress: ProgressFn | None) -> str:
    digest = hashlib.sha256()
    total, done = source.stat().st_size, 0
    with open(source, "rb") as src, open(dest, "wb") as out:
        while chunk := src.read(1 << 22):
            digest.update(chunk)
            out.write(chunk)
            done += len(chunk)
            if progress is not None:
                progress(done, total)
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest()


def _try_link(source: Path, dest: Path) -> bool:
    try:
        os.link(source, dest)
    except OSError:
        return False
    return True


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` all at once: a temporary file beside it, fsynced, renamed
    over it; a crash leaves the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
