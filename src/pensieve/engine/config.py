"""The settings of one model's engine, as plain dataclasses: the API process builds them (and
checks them) before a worker loads the model, so this module imports neither llama.cpp nor numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

from pensieve.memory.config import MemoryConfig


@dataclass(frozen=True, slots=True)
class ContextConfig:
    n_ctx: int
    n_batch: int
    n_ubatch: int
    n_seq_max: int
    n_threads: int
    n_threads_batch: int
    flash_attn: str  # "auto" | "on" | "off"
    kv_unified: bool
    embeddings: bool = False  # an embeddings context: pooled vectors per sequence, no logits
    pooling: int | None = None  # llama_pooling_type; None: the model's own
    type_k: str = "f16"  # KV cache types, names of KV_CACHE_TYPES
    type_v: str = "f16"


@dataclass(frozen=True, slots=True)
class KvCacheType:
    ggml_type: int
    block_size: int  # elements per block: a row's length must be a multiple of it
    block_bytes: int

    @property
    def bytes_per_element(self) -> float:
        return self.block_bytes / self.block_size

    @property
    def is_quantized(self) -> bool:
        return self.block_size > 1


# The cache types llama-server accepts (--cache-type-k/-v), with ggml's block layouts. The ids
# are ggml_type's values (stable in ggml's ABI; tests/unit/test_hardware.py checks them against
# llama-cpp-python's constants), so this module need not load llama.cpp.
KV_CACHE_TYPES = {
    "f32": KvCacheType(0, 1, 4),
    "f16": KvCacheType(1, 1, 2),
    "bf16": KvCacheType(30, 1, 2),  # GGML_TYPE_BF16 (not bound by llama-cpp-python)
    "q8_0": KvCacheType(8, 32, 34),
    "q4_0": KvCacheType(2, 32, 18),
    "q4_1": KvCacheType(3, 32, 20),
    "iq4_nl": KvCacheType(20, 32, 18),
    "q5_0": KvCacheType(6, 32, 22),
    "q5_1": KvCacheType(7, 32, 24),
}


@dataclass(frozen=True, slots=True)
class GpuConfig:
    """The GPU settings of one model. `n_gpu_layers` None: as many layers as fit (auto)."""

    n_gpu_layers: int | None = None
    main_gpu: int = 0
    split_mode: str = "layer"  # "none" | "layer" | "row" | "tensor"
    tensor_split: tuple[float, ...] = ()


@dataclass(frozen=True, slots=True)
class EngineConfig:
    model_path: str
    context: ContextConfig
    use_mmap: bool = True
    prefix_cache: bool = True
    memory: MemoryConfig | None = None  # RAM and disk tiers; None: live context only
    reuse_generated: bool = True  # also reuse KV of generated tokens (off: prompt KV only)
    prefill_chunk_while_decoding: int | None = None  # None: the whole step budget
    gpu: GpuConfig = GpuConfig()  # layers offloaded (default: as many as fit), devices


@dataclass(frozen=True, slots=True)
class ClientLimits:
    """Per-model request limits enforced in the API process (docs/security.md)."""

    max_in_flight: int | None = None  # generation requests submitted and not finished
    deadline_s: float | None = None  # from submission to the last token
    max_prompt_tokens: int | None = None
    max_tokens: int | None = None  # cap on each choice's max_tokens
    log_prompts: bool = False
    log_format: str = "text"  # the worker's log lines: "text" or "json"
