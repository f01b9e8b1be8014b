"""GPU and KV cache settings: flags, environment and TOML reach llama.cpp's model and context
parameters; the placement and memory-budget arithmetic with device memory; KV types keep
their own memory namespace. No GPU and no model needed."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import llama_cpp as C
import pytest
from pydantic import ValidationError

from pensieve.api.ollama.protocol import Options
from pensieve.cli.main import build_parser
from pensieve.config import Settings, load_settings
from pensieve.engine import devices
from pensieve.engine.config import KV_CACHE_TYPES, GpuConfig
from pensieve.engine.devices import (
    Device,
    ModelShape,
    Placement,
    describe,
    kv_type_problem,
    main_gpu_problem,
    plan_placement,
    summary,
    usable_bytes,
)
from pensieve.engine.llama import context_params, model_params
from pensieve.errors import InvalidRequest
from pensieve.memory.config import namespace_for
from pensieve.runtime import LifecycleConfig, ModelRuntime, ServedModel
from pensieve.store.gguf import GgufInfo

MiB = 1 << 20


def _settings(*argv: str) -> Settings:
    args = build_parser().parse_args(["serve", *argv])
    overrides = {k: v for k, v in vars(args).items()
                 if k in Settings.model_fields and v is not None}
    return load_settings(overrides)


# --- settings -> llama.cpp parameters ---------------------------------------------------------
def test_gpu_flags_reach_the_model_params() -> None:
    s = _settings("--n-gpu-layers", "7", "--main-gpu", "1", "--split-mode", "row",
                  "--tensor-split", "3,1")
    gpu = s.engine_config("m.gguf").gpu
    assert gpu == GpuConfig(7, 1, "row", (3.0, 1.0))
    params = model_params(gpu, use_mmap=False)
    assert params.n_gpu_layers == 7 and params.main_gpu == 1
    assert params.split_mode == C.LLAMA_SPLIT_MODE_ROW and params.use_mmap is False
    assert [params.tensor_split[i] for i in range(2)] == [3.0, 1.0]


def test_auto_is_the_default_and_the_cpu_only_params_offload_nothing() -> None:
    assert Settings().engine_config("m.gguf").gpu.n_gpu_layers is None  # auto
    assert model_params(None, use_mmap=True).n_gpu_layers == 0
    with pytest.raises(AssertionError):
        model_params(GpuConfig(None), use_mmap=True)  # auto must be resolved first


def test_gpu_settings_from_the_environment_and_the_config_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PENSIEVE_N_GPU_LAYERS", "12")
    monkeypatch.setenv("PENSIEVE_TENSOR_SPLIT", "1, 1, 2")
    s = load_settings({})
    assert s.gpu_config() == GpuConfig(12, 0, "layer", (1.0, 1.0, 2.0))
    monkeypatch.delenv("PENSIEVE_N_GPU_LAYERS")
    config = tmp_path / "p.toml"
    config.write_text('n_gpu_layers = 0\ncache_type_k = "q8_0"\nsplit_mode = "none"\n')
    s = load_settings({}, config)
    assert s.gpu_config().n_gpu_layers == 0 and s.split_mode == "none"
    assert s.engine_config("m.gguf").context.type_k == "q8_0"


@pytest.mark.parametrize("value", ["lots", "-1", "1.5"])
def test_bad_layer_counts_are_refused(value: str) -> None:
    with pytest.raises(ValidationError):
        Settings(n_gpu_layers=value)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["-1,2", "0,0", "a,b"])
def test_bad_tensor_splits_are_refused(value: str) -> None:
    with pytest.raises(ValidationError):
        Settings(tensor_split=value)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", sorted(KV_CACHE_TYPES))
def test_cache_types_reach_the_context_params(name: str) -> None:
    s = _settings("--cache-type-k", name, "--cache-type-v", name, "--flash-attn", "on")
    params = context_params(s.engine_config("m.gguf").context)
    assert params.type_k == params.type_v == KV_CACHE_TYPES[name].ggml_type
    assert params.flash_attn_type == C.LLAMA_FLASH_ATTN_TYPE_ENABLED


@pytest.mark.parametrize("name", sorted(set(KV_CACHE_TYPES) - {"bf16"}))
def test_cache_type_ids_are_ggmls(name: str) -> None:
    # engine/config.py writes ggml_type's values out so the API process need not load llama.cpp
    assert KV_CACHE_TYPES[name].ggml_type == getattr(C, f"GGML_TYPE_{name.upper()}")


def test_a_quantized_v_cache_without_flash_attention_is_refused_clearly() -> None:
    with pytest.raises(ValidationError, match="needs flash attention"):
        Settings(cache_type_v="q8_0", flash_attn="off")
    Settings(cache_type_k="q8_0", flash_attn="off")  # a quantized K alone is fine
    Settings(cache_type_v="q4_0", flash_attn="auto")  # llama.cpp turns it on


def test_unknown_cache_types_are_refused() -> None:
    with pytest.raises(ValidationError):
        Settings(cache_type_k="q2_k")  # type: ignore[arg-type]


def _gguf(head_k: int, head_v: int, n_layer: int = 4, n_head_kv: int = 2) -> GgufInfo:
    meta = {"general.architecture": "llama", "llama.block_count": n_layer,
            "llama.embedding_length": 256, "llama.attention.head_count": 4,
            "llama.attention.head_count_kv": n_head_kv, "llama.attention.key_length": head_k,
            "llama.attention.value_length": head_v}
    return GgufInfo("m.gguf", 1000, 3, 32, 0, meta, ())


def test_a_head_size_the_quantized_block_does_not_divide_is_refused() -> None:
    info = _gguf(head_k=48, head_v=64)
    assert kv_type_problem(info, "f16", "q8_0") is None
    problem = kv_type_problem(info, "q8_0", "f16")
    assert problem is not None and "--cache-type-k q8_0" in problem and "48" in problem


def test_kv_bytes_count_the_cache_types_real_sizes() -> None:
    info = _gguf(head_k=64, head_v=64)
    f16 = info.kv_bytes_per_token()
    assert f16 == 4 * 2 * (64 + 64) * 2
    q8 = info.kv_bytes_per_token(KV_CACHE_TYPES["q8_0"].bytes_per_element,
                                 KV_CACHE_TYPES["q8_0"].bytes_per_element)
    assert q8 == f16 * 34 // 64  # 34 bytes per block of 32 values, against 64
    mixed = info.kv_bytes_per_token(KV_CACHE_TYPES["q8_0"].bytes_per_element, 2.0)
    assert q8 < mixed < f16


# --- memory namespaces -------------------------------------------------------------------------
def test_each_kv_type_has_its_own_memory_namespace() -> None:
    names = {(k, v): Settings(cache_type_k=k, cache_type_v=v).memory_config("d")
             for k in ("f16", "q8_0") for v in ("f16", "q8_0", "q4_0")}
    assert len({c.namespace for c in names.values() if c}) == len(names)
    # f16 keeps the name snapshots have always had: an upgrade does not forget memory
    legacy = namespace_for("d", flash_attn="on", kv_unified=True, kv_type="f16")
    assert names[("f16", "f16")] is not None and names[("f16", "f16")].namespace == legacy


# --- placement arithmetic ------------------------------------------------------------------------
SHAPE = ModelShape(num_layers=9, weight_bytes=1000 * MiB, kv_bytes=900 * MiB)  # 10 offloadable


def test_auto_offloads_the_layers_that_fit() -> None:
    # each layer: 100 MiB of weights + 100 MiB of KV; 450 MiB of room: 2 layers
    p = plan_placement(SHAPE, GpuConfig(None), 450 * MiB)
    assert p == Placement(10, 2, 1900 * MiB - 400 * MiB, 400 * MiB)
    everything = plan_placement(SHAPE, GpuConfig(None), 10_000 * MiB)
    assert everything.num_offloaded == 10  # all 9 layers and the output layer
    assert everything.device_bytes == 1900 * MiB and everything.host_bytes == 0


def test_a_layer_count_is_taken_as_given_and_no_device_means_the_cpu() -> None:
    assert plan_placement(SHAPE, GpuConfig(3), 1 << 40).num_offloaded == 3
    assert plan_placement(SHAPE, GpuConfig(99), 1 << 40).num_offloaded == 10
    cpu = plan_placement(SHAPE, GpuConfig(None), 0)
    assert cpu.num_offloaded == 0 and cpu.host_bytes == 1900 * MiB and cpu.device_bytes == 0
    assert plan_placement(SHAPE, GpuConfig(5), 0).num_offloaded == 0


def test_usable_device_memory_follows_the_split_and_keeps_a_margin() -> None:
    gpus = [Device("CUDA0", "A", "gpu", 5 << 30, 8 << 30),
            Device("CUDA1", "B", "gpu", 3 << 30, 8 << 30)]
    assert usable_bytes(gpus, GpuConfig(None), free=True) == (4 << 30) + (2 << 30)
    assert usable_bytes(gpus, GpuConfig(None, 1, "none"), free=True) == 2 << 30
    assert usable_bytes(gpus, GpuConfig(None, tensor_split=(1.0, 0.0)), free=False) == 7 << 30
    assert usable_bytes([], GpuConfig(None), free=True) == 0


def test_a_main_gpu_that_does_not_exist_is_named() -> None:
    gpus = [Device("Vulkan0", "A", "gpu", 1, 1)]
    assert main_gpu_problem(gpus, GpuConfig(None, 0)) is None
    assert main_gpu_problem([], GpuConfig(None, 3)) is None  # CPU only: nothing to choose
    assert main_gpu_problem(gpus, GpuConfig(None, 1)) == (
        "--main-gpu 1 does not exist; the GPUs are 0: Vulkan0")


def test_where_a_model_runs_is_described() -> None:
    gpus = [Device("CUDA0", "NVIDIA X", "gpu", 1, 1)]
    on_gpu = describe(Placement(10, 4, 0, 0), gpus)
    assert (on_gpu.backend, on_gpu.num_gpu_layers, on_gpu.num_layers) == ("CUDA", 4, 10)
    assert summary(on_gpu) == "CUDA: 4/10 layers on CUDA0 (NVIDIA X)"
    on_cpu = describe(Placement(10, 0, 0, 0), [])
    assert on_cpu.backend == "CPU" and summary(on_cpu).startswith("CPU only")
    if not C.llama_supports_gpu_offload():
        assert on_cpu.cpu_reason == "this build has no GPU support"


# --- the resident-model budget, host and device apart ------------------------------------------
class FakeClient:
    def __init__(self) -> None:
        self.is_running = False
        self.num_in_flight = 0
        self.last_active = time.monotonic()

    def touch(self) -> None:
        self.last_active = time.monotonic()

    async def stop_if_idle(self) -> bool:
        self.is_running = False
        return True


def _runtime(host_mib: int, device_mib: int) -> tuple[ModelRuntime, dict[str, ServedModel]]:
    runtime = ModelRuntime(lifecycle=LifecycleConfig(host_mib * MiB, 0, None,
                                                     device_budget_bytes=device_mib * MiB))
    models = {}
    for name in ("a", "b"):  # 100 MiB each, 80 of them on the GPU
        served = ServedModel(name, FakeClient(), num_weight_bytes=60 * MiB,  # type: ignore[arg-type]
                             num_kv_bytes=40 * MiB, num_device_bytes=80 * MiB)
        runtime._models[name] = served
        models[name] = served
    return runtime, models


def _load(runtime: ModelRuntime, served: ServedModel) -> None:
    assert asyncio.run(runtime._make_room(served))
    served.client.is_running = True  # type: ignore[misc]
    served.client.touch()


def test_host_and_device_memory_are_budgeted_apart() -> None:
    m = _runtime(host_mib=50, device_mib=200)[1]
    assert m["a"].num_host_bytes == 20 * MiB
    runtime, m = _runtime(host_mib=50, device_mib=200)  # 40 of 50 host, 160 of 200 GPU
    _load(runtime, m["a"])
    _load(runtime, m["b"])
    assert m["a"].client.is_running and m["b"].client.is_running  # though 200 > 50 in all


def test_a_full_gpu_unloads_the_least_recently_used_model() -> None:
    runtime, m = _runtime(host_mib=1000, device_mib=150)  # room on the host, not on the GPU
    _load(runtime, m["a"])
    _load(runtime, m["b"])
    assert not m["a"].client.is_running and m["b"].client.is_running


def test_a_model_bigger_than_the_gpu_budget_is_refused() -> None:
    runtime, m = _runtime(host_mib=1000, device_mib=50)
    with pytest.raises(InvalidRequest, match="GPU memory"):
        asyncio.run(runtime._make_room(m["a"]))
    runtime, m = _runtime(host_mib=10, device_mib=1000)
    with pytest.raises(InvalidRequest, match="host memory"):
        asyncio.run(runtime._make_room(m["a"]))


def test_the_footprint_splits_by_the_placement() -> None:
    from pensieve.engine.config import ContextConfig, EngineConfig

    ctx = ContextConfig(1000, 64, 64, 1, 1, 1, "on", True, type_k="q8_0", type_v="q8_0")
    served = ServedModel("m", FakeClient())  # type: ignore[arg-type]
    info = _gguf(64, 64)
    served.set_footprint(info, EngineConfig("m.gguf", ctx, gpu=GpuConfig(None)), 0)
    assert served.num_kv_bytes == info.kv_bytes_per_token(34 / 32, 34 / 32) * 1000
    assert served.num_device_bytes == 0 and served.num_host_bytes == served.num_budget_bytes
    served.set_footprint(info, EngineConfig("m.gguf", ctx, gpu=GpuConfig(None)), 1 << 40)
    assert served.num_host_bytes == 0  # everything fits on the device


# --- Ollama's num_ctx ---------------------------------------------------------------------------
def test_num_ctx_is_a_per_request_limit_within_the_servers_context() -> None:
    assert Options(num_ctx=512).to_sampling_params(4096).max_context == 512
    assert Options().to_sampling_params(4096).max_context is None
    assert Options(num_ctx=512, repeat_last_n=-1).to_sampling_params(4096).penalty_last_n == 512
    with pytest.raises(InvalidRequest, match="num_ctx=8192 is more than") as exc:
        Options(num_ctx=8192).to_sampling_params(4096)
    assert exc.value.param == "options.num_ctx"


@pytest.mark.parametrize(("files", "gpu"), [
    (["libggml-base.so.0", "libggml-cpu.so", "libggml.so", "libllama.so"], False),
    (["libggml-base.so", "libggml-cpu.so", "libggml-blas.so"], False),
    (["libggml-base.so", "libggml-cpu.so", "libggml-cuda.so"], True),
    (["ggml-base.dll", "ggml-cpu.dll", "ggml-vulkan.dll"], True),
    (["libggml-base.dylib", "libggml-metal.dylib"], True),
])
def test_a_cpu_only_build_is_told_from_its_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 files: list[str], gpu: bool) -> None:
    # so the API process can plan a CPU-only start without loading llama.cpp
    for name in files:
        (tmp_path / name).touch()
    monkeypatch.setattr(devices, "_backend_libraries", lambda: devices.backends_in(tmp_path))
    assert devices.may_have_gpus() is gpu
