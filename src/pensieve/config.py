"""Configuration: one pydantic-settings model feeds CLI flags, PENSIEVE_* environment variables and
a TOML config file (precedence in that order, then the defaults). Everything below the CLI gets
frozen dataclasses built from it once at start-up."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from pensieve.cluster.options import ADMIN_HEADROOM, ClusterOptions
from pensieve.engine.config import (
    KV_CACHE_TYPES,
    ClientLimits,
    ContextConfig,
    EngineConfig,
    GpuConfig,
)
from pensieve.engine.devices import list_gpus, usable_bytes
from pensieve.errors import PensieveError
from pensieve.memory.config import DEFAULT_BLOCK_TOKENS, MemoryConfig, namespace_for
from pensieve.memory.shared_store import INSTALL_HINT, SCHEMES, SharedConfig, redacted
from pensieve.store.netguard import NetPolicy

SHARED_URL_FORM = ("--memory-shared takes redis://[:password@]host:port/db, or rediss://... for "
                   "TLS")
KvCacheTypeName = Literal["f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl", "f32"]

if TYPE_CHECKING:  # the HTTP stack is imported where used: `serve` reads the settings (and
    # starts loading the model) before it imports FastAPI and uvicorn
    from pensieve.api.middleware.access import AccessConfig
    from pensieve.api.middleware.limits import LimitsConfig
    from pensieve.api.openai.responses_store import ResponseStoreConfig


def llama_cpp_version() -> str:
    """The llama-cpp-python version (which pins llama.cpp), read without importing it."""
    try:
        return importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(Path.home(), ".local", "share")
    return Path(base) / "pensieve"


class Settings(BaseSettings):
    """Pensieve server settings. Every field is a `--flag`, a `PENSIEVE_FIELD` variable and a
    key of the TOML config file."""

    model_config = SettingsConfigDict(env_prefix="PENSIEVE_", extra="forbid",
                                      validate_default=True)

    host: str = Field("127.0.0.1", description="Address to listen on. Loopback by default.")
    port: int = Field(8080, ge=1, le=65535, description="TCP port to listen on.")
    model: str | None = Field(
        None, description="Path of the GGUF model file to serve. Empty: the embedded default "
        "model, SmolLM2-135M-Instruct.")
    model_alias: str | None = Field(
        None, description="Name clients use for the model (the `model` field). Default: derived "
        "from the file name.")
    data_dir: Path = Field(default_factory=default_data_dir,
                           description="Where Pensieve keeps models and state.")
    ctx_size: int = Field(16384, ge=256, le=1 << 20,
                          description="KV cache size in tokens, shared by all sequences.")
    parallel: int = Field(16, ge=1, le=256,
                          description="Maximum number of sequences decoded together.")
    threads: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1, le=1024,
                         description="CPU threads for generation. Default: all cores.")
    threads_batch: int | None = Field(None, ge=1, le=1024,
                                      description="CPU threads for prompt processing. "
                                      "Default: same as --threads.")
    batch_size: int = Field(512, ge=16, le=8192,
                            description="Most tokens computed in one engine step.")
    prefill_chunk_while_decoding: int = Field(
        128, ge=1, le=8192,
        description="Most prompt tokens computed in a step while other answers are streaming. "
        "A step takes time in proportion to its tokens (about 3 ms a token for the default "
        "model on 2 cores), so a long prompt arriving is computed in chunks this size and the "
        "running streams keep getting tokens meanwhile instead of stalling. Set it to "
        "--batch-size to compute prompts as fast as possible regardless.")
    flash_attn: Literal["auto", "on", "off"] = Field("on", description="Flash attention.")
    kv_unified: bool = Field(
        True, description="One KV buffer shared by all sequences (a long conversation may use "
        "the whole --ctx-size). Off: each sequence gets ctx_size/parallel cells.")
    mmap: bool = Field(True, description="Memory-map the model file.")
    prefix_cache: bool = Field(
        True, description="Reuse the KV of earlier requests that share an exact token prefix "
        "(a conversation's earlier turns, a common system prompt). Off: no memory at all.")
    memory_reuse_generated: bool = Field(
        True, description="Also reuse the KV of generated answers, as llama-server and vLLM do: "
        "a follow-up turn computes only the new message. Off: each turn recomputes the previous "
        "answer as prompt, so a turn restored from memory matches a fresh computation "
        "bit for bit when the KV layout is the same (see docs/memory.md, Determinism).")
    memory_ram_mb: int = Field(2048, ge=0, le=1 << 24,
                               description="RAM budget for conversations' KV outside the "
                               "llama context, in MiB. 0: no RAM tier.")
    memory_disk_mb: int = Field(10240, ge=0, le=1 << 30,
                                description="Disk budget for conversations' KV, in MiB; it "
                                "survives restarts. 0: no disk tier.")
    cache_type_k: KvCacheTypeName = Field(
        "f16", description="KV cache type of K. q8_0 about halves the bytes of every "
        "remembered token (RAM and disk tiers hold twice the conversations) at a small cost "
        "in accuracy; q4_0 quarters them at a larger one.")
    cache_type_v: KvCacheTypeName = Field(
        "f16", description="KV cache type of V. A quantized type (q8_0, q4_0, ...) needs "
        "--flash-attn on or auto.")
    # --- hardware: GPU offload (README, "Building for a GPU") ---
    n_gpu_layers: Annotated[int, Field(ge=0, le=100_000)] | Literal["auto"] = Field(
        "auto", description="Model layers to offload to the GPU(s): auto (as many as fit in "
        "their free memory, as llama-server's -ngl auto), a number, or 0 for the CPU only. A "
        "build of llama-cpp-python without GPU support runs on the CPU and says so at start.")
    main_gpu: int = Field(0, ge=0, le=255, description="The GPU that holds the whole model "
                          "with --split-mode none (and the scratch buffers with row).")
    split_mode: Literal["none", "layer", "row", "tensor"] = Field(
        "layer", description="How a model is split across several GPUs: none (--main-gpu "
        "only), layer (layers and their KV spread over the GPUs), row (tensors split by rows), "
        "tensor (tensor parallelism, where the backend supports it).")
    tensor_split: Annotated[list[float], NoDecode] = Field(
        default_factory=list, description="Proportion of the model each GPU takes, "
        "comma-separated (e.g. 3,1). Empty: in proportion to their free memory.")
    max_device_memory_mb: int = Field(
        0, ge=0, le=1 << 30, description="GPU memory budget for resident models (the layers "
        "and KV offloaded), in MiB, counted apart from --max-memory-mb. 0: the GPUs' memory "
        "less 1 GiB each.")
    memory_block_tokens: int = Field(
        DEFAULT_BLOCK_TOKENS, ge=0, le=4096,
        description="Tokens per KV block in the RAM and disk tiers: a turn stores only its new "
        "blocks, and conversations sharing a prefix share its blocks. 0: whole snapshots.")
    memory_shared: str | None = Field(
        None, description="A shared memory tier behind RAM and disk, so that every server of "
        "the same model (cluster replicas) can continue any conversation: a Redis URL, "
        "redis://[:password@]host:port/db, or rediss://... for TLS. Each new KV block is "
        "written to it behind the request; a request reads the blocks it lacks from it ahead "
        "of its turn. If it is down, requests compute instead. Needs the cluster extra: pip "
        "install 'pensieve-server[cluster]'. See docs/memory.md, Shared tier.")
    memory_shared_ttl_s: int = Field(
        7 * 86400, ge=0, le=1 << 31, description="Seconds a block stays in the shared tier "
        "after it was last written or read, so the store does not grow forever. 0: no expiry "
        "(bound the store with its own maxmemory policy instead).")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Log level.")
    # --- model store and lifecycle (docs/models.md) ---
    models_dir: Path | None = Field(
        None, description="The model store (blobs and manifests). Default: DATA_DIR/models.")
    keep_alive: str = Field(
        "5m", description="How long a model loaded on demand stays loaded while idle: "
        "seconds or a duration like 30s, 5m, 1h; 0 unloads at once, a negative value never. "
        "Requests may set their own (Ollama's keep_alive).")
    max_memory_mb: int = Field(
        0, ge=0, le=1 << 30, description="Memory budget for resident models (weights plus "
        "KV for their context), in MiB; the least recently used idle model is unloaded to "
        "make room. 0: three quarters of the machine's RAM.")
    max_loaded_models: int = Field(
        3, ge=0, le=64, description="Most models resident at once. 0: only the memory budget "
        "limits it.")
    # --- stored responses of /v1/responses (docs/api.md, "Responses") ---
    responses_max_stored: int = Field(
        1000, ge=0, le=1 << 20, description="Most responses of /v1/responses kept for GET "
        "and previous_response_id (one JSON file each under DATA_DIR/responses; they survive "
        "restarts); the oldest are removed first. 0: none are kept.")
    responses_max_age_days: float = Field(
        30.0, ge=0, le=36500, description="Stored responses older than this many days are "
        "removed. 0: no age limit.")

    # --- cluster mode: engines as Ray Serve replicas (docs/cluster.md) ---
    cluster: str | None = Field(
        None, description="Run the model's engines as Ray Serve replicas on this Ray cluster "
        "(needs the `cluster` extra): host:port as `ray start --head` prints it, auto (the "
        "cluster this machine is a node of) or ray://host:port. This server stays the "
        "ingress and routes each conversation to one replica. Empty: one local worker, no "
        "Ray.")
    replicas: int = Field(1, ge=1, le=1024, description="Engine replicas to deploy with "
                          "--cluster (the initial number under autoscaling).")
    replicas_min: int | None = Field(
        None, ge=0, le=1024, description="With --cluster, let Serve autoscale the replicas "
        "down to this many (set it or --replicas-max to autoscale).")
    replicas_max: int | None = Field(
        None, ge=1, le=1024, description="With --cluster, let Serve autoscale the replicas up "
        "to this many.")
    max_replicas_per_node: int = Field(
        1, ge=0, le=1024, description="With --cluster, replicas one Ray node runs at most "
        "(each holds its own copy of the model and KV). 0: no limit.")
    replica_cpus: float | None = Field(
        None, gt=0, le=1024, description="With --cluster, CPUs Ray reserves for each replica. "
        "Default: --threads.")

    @field_validator("cluster")
    @classmethod
    def _empty_cluster_is_none(cls, value: str | None) -> str | None:
        return value.strip() or None if value is not None else None

    @model_validator(mode="after")
    def _replica_bounds(self) -> Settings:
        low, high = self.replicas_min, self.replicas_max
        if low is not None and high is not None and low > high:
            raise ValueError(f"--replicas-min {low} is above --replicas-max {high}")
        return self

    @field_validator("tensor_split", mode="before")
    @classmethod
    def _split_floats(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("tensor_split")
    @classmethod
    def _valid_split(cls, value: list[float]) -> list[float]:
        if value and (any(not 0 <= v < float("inf") for v in value) or sum(value) <= 0):
            raise ValueError("tensor_split takes non-negative proportions, at least one above 0")
        return value

    @model_validator(mode="after")
    def _kv_types_fit_flash_attn(self) -> Settings:
        if KV_CACHE_TYPES[self.cache_type_v].is_quantized and self.flash_attn == "off":
            raise ValueError(
                f"--cache-type-v {self.cache_type_v} needs flash attention, which "
                "--flash-attn off turns off: use --flash-attn on (or auto), or an unquantized "
                "V cache (f16, bf16, f32)")
        return self

    @field_validator("memory_shared")
    @classmethod
    def _valid_shared_tier(cls, value: str | None) -> str | None:
        if not value:
            return None
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            raise ValueError(f"{SHARED_URL_FORM}, not {redacted(value)}") from None
        if parts.scheme not in SCHEMES or not parts.hostname:
            raise ValueError(f"{SHARED_URL_FORM}, not {redacted(value)}")
        return value

    @model_validator(mode="after")
    def _shared_tier_needs_blocks(self) -> Settings:
        if self.memory_shared and self.memory_block_tokens == 0:
            raise ValueError("--memory-shared stores KV blocks: it needs --memory-block-tokens "
                             "above 0")
        return self

    @field_validator("keep_alive")
    @classmethod
    def _valid_keep_alive(cls, value: str) -> str:
        from pensieve.errors import InvalidRequest
        from pensieve.store.durations import parse_keep_alive

        try:
            parse_keep_alive(value)
        except InvalidRequest as exc:
            raise ValueError(exc.message) from None
        return value

    # --- safety: access, limits, shutdown, logs (docs/security.md) ----------------------------
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="API keys clients must send (`Authorization: Bearer "
        "KEY` or `x-api-key: KEY`), comma-separated. Empty (and no --api-key-file): no auth.")
    api_key_file: Path | None = Field(
        None, description="File with more API keys, one per line ('#' starts a comment).")
    allow_unauthenticated_remote: bool = Field(
        False, description="Allow listening on a non-loopback address without API keys.")
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Host header values accepted besides the loopback "
        "names and --host (comma-separated; '*': any). Guards against DNS rebinding. Default "
        "on a non-loopback --host: any.")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Browser origins allowed to call the API (CORS), "
        "comma-separated, e.g. http://localhost:3000; '*': any. Default: none (CORS off).")
    pull_allow: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Where pulls (`pensieve pull`, /api/pull, "
        "HF_ENDPOINT) may connect besides public addresses, comma-separated: host names, "
        "host:port, IP addresses or CIDR networks, e.g. mirror.lan,10.0.0.5:8000,"
        "192.168.0.0/16; '*': anywhere. Default: none (loopback, private, link-local and other "
        "non-public addresses are refused).")
    ssl_certfile: Path | None = Field(None, description="TLS certificate (PEM): serve HTTPS.")
    ssl_keyfile: Path | None = Field(None, description="TLS private key (PEM) for --ssl-certfile.")
    max_body_bytes: int = Field(8 << 20, ge=1024, le=1 << 30,
                                description="Largest request body accepted (413 above).")
    max_header_bytes: int = Field(16 << 10, ge=1024, le=1 << 20,
                                  description="Largest request head (request line and headers).")
    read_timeout: float = Field(30.0, gt=0, le=3600, description="Seconds a client may take to "
                                "send a request's headers, and then its body (slow clients).")
    max_connections: int = Field(1024, ge=1, le=1 << 20, description="Open connections served "
                                 "at once; more get a 503.")
    max_queue: int = Field(256, ge=0, le=1 << 20, description="Requests a model may have "
                           "waiting beyond --parallel; more get a 503 with Retry-After.")
    request_timeout: float = Field(600.0, ge=0, le=86400, description="Deadline of one "
                                   "generation request in seconds, 0: none.")
    max_prompt_tokens: int | None = Field(None, ge=1, le=1 << 24, description="Longest prompt "
                                          "accepted, in tokens. Default: the context size.")
    max_tokens_limit: int | None = Field(None, ge=1, le=1 << 24, description="Cap on the "
                                         "tokens one choice may generate (max_tokens above it "
                                         "is lowered). Default: the context size.")
    shutdown_timeout: float = Field(30.0, ge=0, le=3600, description="On SIGTERM or Ctrl-C, "
                                    "seconds in-flight requests get to finish before they are "
                                    "aborted.")
    log_format: Literal["text", "json"] = Field("text", description="Log line format.")
    log_prompts: bool = Field(False, description="Log prompt text (at info level). Off: logs "
                              "never contain prompt or output text.")

    @field_validator("api_keys", "allowed_hosts", "cors_origins", "pull_allow", mode="before")
    @classmethod
    def _split_list(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("pull_allow")
    @classmethod
    def _valid_pull_allow(cls, value: list[str]) -> list[str]:
        NetPolicy.from_entries(value)  # raises ValueError naming a bad entry
        return value

    @field_validator("model", "model_alias")
    @classmethod
    def _empty_is_none(cls, value: str | None) -> str | None:
        return value or None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml_file = settings_cls.model_config.get("toml_file")
        if toml_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)

    def memory_config(self, model_digest: str) -> MemoryConfig | None:
        if not self.prefix_cache or (self.memory_ram_mb == 0 and self.memory_disk_mb == 0):
            return None
        namespace = namespace_for(model_digest, flash_attn=self.flash_attn,
                                  kv_unified=self.kv_unified, kv_type=self.kv_type_label)
        disk_dir = str(self.data_dir / "memory") if self.memory_disk_mb > 0 else None
        return MemoryConfig(ram_bytes=self.memory_ram_mb << 20,
                            disk_bytes=self.memory_disk_mb << 20, disk_dir=disk_dir,
                            namespace=namespace, block_tokens=self.memory_block_tokens,
                            shared=self.shared_config(namespace))

    def shared_config(self, namespace: str) -> SharedConfig | None:
        """The shared tier's keys are namespaced by the llama.cpp version too: servers of
        different versions may share a store, and their KV state need not be the same. Raises
        PensieveError (`pensieve serve`: cannot start) when the redis package is missing."""
        if not self.memory_shared:
            return None
        if importlib.util.find_spec("redis") is None:
            raise PensieveError(f"--memory-shared needs the redis package: {INSTALL_HINT}")
        return SharedConfig(self.memory_shared, self.memory_shared_ttl_s,
                            namespace_for(namespace, llama_cpp=llama_cpp_version()))

    @property
    def kv_type_label(self) -> str:
        """The KV cache types in one word: "f16" when both are (the name snapshots of an f16
        cache have always had), else "K/V", e.g. "q8_0/q8_0"."""
        if self.cache_type_k == self.cache_type_v == "f16":
            return "f16"
        return f"{self.cache_type_k}/{self.cache_type_v}"

    def gpu_config(self) -> GpuConfig:
        layers = None if self.n_gpu_layers == "auto" else self.n_gpu_layers
        return GpuConfig(layers, self.main_gpu, self.split_mode, tuple(self.tensor_split))

    def engine_config(self, model_path: str, model_digest: str | None = None) -> EngineConfig:
        ctx = ContextConfig(
            n_ctx=self.ctx_size,
            n_batch=self.batch_size,
            n_ubatch=self.batch_size,
            n_seq_max=self.parallel,
            n_threads=self.threads,
            n_threads_batch=self.threads_batch or self.threads,
            flash_attn=self.flash_attn,
            kv_unified=self.kv_unified,
            type_k=self.cache_type_k,
            type_v=self.cache_type_v,
        )
        memory = self.memory_config(model_digest) if model_digest else None
        return EngineConfig(model_path=model_path, context=ctx, use_mmap=self.mmap,
                            prefix_cache=self.prefix_cache, memory=memory,
                            prefill_chunk_while_decoding=self.prefill_chunk_while_decoding,
                            reuse_generated=self.memory_reuse_generated,
                            gpu=self.gpu_config())


    def all_api_keys(self) -> tuple[str, ...]:
        from pensieve.api.middleware.access import load_key_file

        keys = list(self.api_keys)
        if self.api_key_file is not None:
            keys.extend(load_key_file(self.api_key_file))
        return tuple(dict.fromkeys(keys))

    def access_config(self) -> AccessConfig:
        from pensieve.api.middleware.access import AccessConfig

        return AccessConfig(api_keys=self.all_api_keys(), bind_host=self.host,
                            allowed_hosts=tuple(self.allowed_hosts),
                            cors_origins=tuple(self.cors_origins))

    def pull_policy(self) -> NetPolicy:
        return NetPolicy.from_entries(self.pull_allow)

    def limits_config(self) -> LimitsConfig:
        from pensieve.api.middleware.limits import LimitsConfig

        return LimitsConfig(max_body_bytes=self.max_body_bytes,
                            max_header_bytes=self.max_header_bytes,
                            read_timeout_s=self.read_timeout)

    def responses_config(self) -> ResponseStoreConfig:
        from pensieve.api.openai.responses_store import ResponseStoreConfig

        return ResponseStoreConfig(self.data_dir / "responses", self.responses_max_stored,
                                   self.responses_max_age_days * 86400.0 or None)

    def cluster_options(self) -> ClusterOptions:
        """The replicas' shape; a conversation's replica counts as overloaded past --parallel
        requests in flight, and Serve sends one at most what its queue takes."""
        assert self.cluster is not None
        return ClusterOptions(
            self.cluster, self.replicas, self.replicas_min, self.replicas_max,
            self.max_replicas_per_node or None, self.replica_cpus or float(self.threads),
            max_queue=self.parallel,
            max_ongoing=self.parallel + self.max_queue + ADMIN_HEADROOM)

    def client_limits(self) -> ClientLimits:
        return ClientLimits(max_in_flight=self.parallel + self.max_queue,
                            deadline_s=self.request_timeout or None,
                            max_prompt_tokens=self.max_prompt_tokens,
                            max_tokens=self.max_tokens_limit, log_prompts=self.log_prompts,
                            log_format=self.log_format)


def store_dir(settings: Settings) -> Path:
    return settings.models_dir or settings.data_dir / "models"


def memory_budget_bytes(settings: Settings) -> int:
    if settings.max_memory_mb:
        return settings.max_memory_mb << 20
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = 8 << 30
    return total * 3 // 4


def device_budget_bytes(settings: Settings) -> int:
    """GPU memory resident models may take (0: no GPU in use)."""
    if settings.n_gpu_layers == 0:
        return 0
    if settings.max_device_memory_mb:
        return settings.max_device_memory_mb << 20
    return usable_bytes(list_gpus(), settings.gpu_config(), free=False)


def load_settings(overrides: dict[str, Any], config_file: Path | None = None) -> Settings:
    """Build settings from CLI overrides, the environment and an optional TOML file."""
    config_file = config_file or _env_config_file()
    if config_file is None:
        return Settings(**overrides)
    if not config_file.is_file():
        raise FileNotFoundError(f"config file not found: {config_file}")

    class _FileSettings(Settings):
        model_config = SettingsConfigDict(toml_file=config_file)

    return _FileSettings(**overrides)


def _env_config_file() -> Path | None:
    value = os.environ.get("PENSIEVE_CONFIG")
    return Path(value) if value else None
