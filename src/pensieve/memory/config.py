"""Memory's settings and namespaces: light enough for the API process to build before a worker
loads the model (no numpy, no llama.cpp)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from pensieve.memory.shared_store import SharedConfig

DEFAULT_BLOCK_TOKENS = 64


@dataclass(frozen=True, slots=True)
class MemoryConfig:
    ram_bytes: int
    disk_bytes: int
    disk_dir: str | None  # None: no disk tier
    namespace: str  # model file digest + KV settings; entries never cross namespaces
    block_tokens: int = DEFAULT_BLOCK_TOKENS  # 0: whole snapshots only
    shared: SharedConfig | None = None  # a store shared with other servers (blocks only)


def namespace_for(model_digest: str, **kv_settings: object) -> str:
    """A short, stable name for (model file, KV settings): what a KV snapshot depends on."""
    settings = ",".join(f"{k}={kv_settings[k]}" for k in sorted(kv_settings))
    return hashlib.sha256(f"{model_digest}|{settings}|v1".encode()).hexdigest()[:24]
