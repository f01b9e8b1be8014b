"""Where a model runs: the GPU settings, the devices llama.cpp sees, and how many layers go to
them. The arithmetic (`plan_placement`) is pure so the memory budget can be tested on the CPU.

llama.cpp counts `n_gpu_layers` over the repeating layers plus the output layer:

    layers  0 .. n_layer-1 | output
            ^ CPU ...   ^ offloaded from the top: n_gpu_layers > n_layer takes the output too
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from pensieve.engine.config import KV_CACHE_TYPES, ContextConfig, GpuConfig
from pensieve.engine.types import OffloadInfo
from pensieve.errors import ModelLoadError
from pensieve.store.gguf import GgufInfo, read_gguf

log = logging.getLogger("pensieve.devices")

# Free memory llama-server's fit leaves on each device (compute buffers, the driver, others).
DEVICE_MARGIN_BYTES = 1 << 30
# ggml_backend_dev_type: 0 CPU, 1 GPU, 2 iGPU, 3 accelerators that work in host memory (BLAS)
_UNLIMITED = 1 << 62
_GPU_KINDS = {1: "gpu", 2: "igpu"}
_HOST_BACKENDS = {"base", "cpu", "blas"}  # ggml backend libraries that are not devices


@dataclass(frozen=True, slots=True)
class Device:
    name: str  # ggml's name: CUDA0, Metal, Vulkan0, ROCm0 ...
    description: str
    kind: str  # "gpu" | "igpu"
    free_bytes: int
    total_bytes: int


@dataclass(frozen=True, slots=True)
class Placement:
    """How much of a model goes to the device(s) and how much stays in host memory."""

    num_layers: int  # offloadable layers: the repeating ones plus the output layer
    num_offloaded: int
    host_bytes: int
    device_bytes: int


@dataclass(frozen=True, slots=True)
class ModelShape:
    """What the placement needs to know of a model (from its GGUF header)."""

    num_layers: int  # repeating layers (block_count)
    weight_bytes: int
    kv_bytes: int  # KV for the whole context, at the chosen cache types


def model_shape(info: GgufInfo, n_ctx: int, type_k: str, type_v: str) -> ModelShape:
    per_token = info.kv_bytes_per_token(KV_CACHE_TYPES[type_k].bytes_per_element,
                                        KV_CACHE_TYPES[type_v].bytes_per_element)
    return ModelShape(info.num_layers(), info.file_size, per_token * n_ctx)


def kv_type_problem(info: GgufInfo, type_k: str, type_v: str) -> str | None:
    """Why llama.cpp would refuse these cache types for this model (a quantized type needs
    the head size to be a multiple of its block), or None."""
    for what, name, dim in zip(("K", "V"), (type_k, type_v), info.head_dims(), strict=True):
        block = KV_CACHE_TYPES[name].block_size
        if dim % block:
            return (f"--cache-type-{what.lower()} {name} needs a head size divisible by "
                    f"{block}, but this model's {what} heads have {dim} values; use f16, "
                    "bf16 or f32 for it")
    return None


def plan_placement(shape: ModelShape, gpu: GpuConfig, device_bytes: int) -> Placement:
    """Split a model between host and device memory.

    `device_bytes` is the device memory it may use (0: no usable GPU). Auto offloads as many
    layers as fit in it; a number offloads that many (capped at the model's layers). Each
    offloadable layer counts an equal share of the weights; the KV of an offloaded repeating
    layer lives on the device too (llama.cpp's default, offload_kqv).
    """
    num_layers = shape.num_layers + 1
    per_layer_weights = shape.weight_bytes / num_layers
    per_layer_kv = shape.kv_bytes / max(shape.num_layers, 1)
    if device_bytes <= 0:
        offloaded = 0
    elif gpu.n_gpu_layers is None:
        offloaded = min(num_layers, int(device_bytes // (per_layer_weights + per_layer_kv)))
    else:
        offloaded = min(num_layers, gpu.n_gpu_layers)
    on_device = int(offloaded * per_layer_weights
                    + min(offloaded, shape.num_layers) * per_layer_kv)
    return Placement(num_layers, offloaded, shape.weight_bytes + shape.kv_bytes - on_device,
                     on_device)


def supports_gpu_offload() -> bool:
    """Whether this llama-cpp-python build can offload to a GPU at all."""
    import llama_cpp as C  # not at import time: the API process plans before it needs llama.cpp

    return bool(C.llama_supports_gpu_offload())


def _backend_libraries() -> set[str] | None:
    """The ggml backends built as libraries beside libllama (`libggml-cuda.so` -> "cuda"),
    found without loading llama.cpp; None when the package's files cannot be listed."""
    package = importlib.util.find_spec("llama_cpp")
    if package is None or not package.submodule_search_locations:
        return None
    return backends_in(Path(next(iter(package.submodule_search_locations))) / "lib") or None


def backends_in(lib_dir: Path) -> set[str]:
    return {m.group(1) for f in lib_dir.glob("*ggml-*")
            if (m := re.match(r"(?:lib)?ggml-([a-z0-9]+)", f.name))}


def may_have_gpus() -> bool:
    """False when this build certainly has no GPU backend (only ggml's base, CPU and BLAS
    backends beside libllama): then `list_gpus` need not load llama.cpp to say so."""
    backends = _backend_libraries()
    return backends is None or bool(backends - _HOST_BACKENDS)


def list_gpus() -> list[Device]:
    """The GPUs (and other accelerators) llama.cpp's backends see, in ggml's order."""
    if not may_have_gpus() or not supports_gpu_offload():
        return []
    ggml = _ggml()
    if ggml is None:
        return []
    devices = []
    for i in range(ggml.ggml_backend_dev_count()):
        dev = ggml.ggml_backend_dev_get(i)
        kind = _GPU_KINDS.get(ggml.ggml_backend_dev_type(dev))
        if kind is None:
            continue
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        ggml.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        devices.append(Device(_text(ggml.ggml_backend_dev_name(dev)),
                              _text(ggml.ggml_backend_dev_description(dev)), kind,
                              free.value, total.value))
    return devices


def main_gpu_problem(devices: list[Device], gpu: GpuConfig) -> str | None:
    if not devices or gpu.main_gpu < len(devices):
        return None
    names = ", ".join(f"{i}: {d.name}" for i, d in enumerate(devices))
    return f"--main-gpu {gpu.main_gpu} does not exist; the GPUs are {names}"


def usable_bytes(devices: list[Device], gpu: GpuConfig, *, free: bool) -> int:
    """Device memory a model may take on the devices it would use, less a margin on each."""
    chosen = used_devices(devices, gpu)
    return sum(max(0, (d.free_bytes if free else d.total_bytes) - DEVICE_MARGIN_BYTES)
               for d in chosen)


def used_devices(devices: list[Device], gpu: GpuConfig) -> list[Device]:
    if gpu.split_mode == "none":
        return devices[gpu.main_gpu : gpu.main_gpu + 1]
    if gpu.tensor_split:
        return [d for i, d in enumerate(devices)
                if i < len(gpu.tensor_split) and gpu.tensor_split[i] > 0]
    return devices


def resolve(shape: ModelShape, gpu: GpuConfig) -> tuple[GpuConfig, OffloadInfo]:
    """Turn `auto` into a layer count for the devices as they are now (free memory), and
    describe where the model runs. Called where the model loads (the worker)."""
    devices = list_gpus()
    problem = main_gpu_problem(devices, gpu)
    if problem is not None:
        raise ModelLoadError(problem, code="invalid_main_gpu")
    if gpu.n_gpu_layers is None:
        room = usable_bytes(devices, gpu, free=True)
    else:  # a number is the user's call, as in llama.cpp: no fitting
        room = _UNLIMITED if devices else 0
    placement = plan_placement(shape, gpu, room)
    resolved = GpuConfig(placement.num_offloaded, gpu.main_gpu, gpu.split_mode,
                         gpu.tensor_split)
    return resolved, describe(placement, used_devices(devices, gpu))


def place_model(path: str, context: ContextConfig,
                gpu: GpuConfig) -> tuple[GpuConfig, OffloadInfo]:
    """The GPU settings to load this model with, and where it will run (logged)."""
    resolved, info = plan_for(read_gguf(path), context, gpu)
    level = logging.DEBUG if info.cpu_reason else logging.INFO  # the server said so already
    log.log(level, "%s: %s", Path(path).name, summary(info))
    return resolved, info


def plan_for(info: GgufInfo, context: ContextConfig,
              gpu: GpuConfig) -> tuple[GpuConfig, OffloadInfo]:
    return resolve(model_shape(info, context.n_ctx, context.type_k, context.type_v), gpu)


def describe(placement: Placement, devices: list[Device]) -> OffloadInfo:
    if placement.num_offloaded == 0 or not devices:
        gpu_build = may_have_gpus() and supports_gpu_offload()
        reason = None if gpu_build else "this build has no GPU support"
        return OffloadInfo("CPU", ("CPU",), 0, placement.num_layers, reason)
    backend = devices[0].name.rstrip("0123456789") or devices[0].name
    names = tuple(f"{d.name} ({d.description})" for d in devices)
    return OffloadInfo(backend, names, placement.num_offloaded, placement.num_layers, None)


def summary(info: OffloadInfo) -> str:
    """One line for the banner and the log."""
    if info.num_gpu_layers == 0:
        why = f" ({info.cpu_reason})" if info.cpu_reason else ""
        return f"CPU only{why}"
    return (f"{info.backend}: {info.num_gpu_layers}/{info.num_layers} layers on "
            f"{', '.join(info.devices)}")


def _text(raw: bytes | None) -> str:
    return raw.decode("utf-8", errors="replace") if raw else ""


def _ggml() -> ctypes.CDLL | None:
    """ggml's device registry (llama-cpp-python binds llama.h only). libllama has loaded it
    already, so this finds the same library."""
    import llama_cpp as C

    lib_dir = Path(C.__file__).parent / "lib"
    for name in ("libggml.so", "libggml.dylib", "ggml.dll"):
        path = lib_dir / name
        if path.exists():
            return _declare(ctypes.CDLL(str(path)))
    log.debug("libggml not found under %s: GPU devices are not listed", lib_dir)
    return None


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    ptr = ctypes.c_void_p
    lib.ggml_backend_dev_count.restype = ctypes.c_size_t
    lib.ggml_backend_dev_get.argtypes, lib.ggml_backend_dev_get.restype = [ctypes.c_size_t], ptr
    for fn in (lib.ggml_backend_dev_name, lib.ggml_backend_dev_description):
        fn.argtypes, fn.restype = [ptr], ctypes.c_char_p
    lib.ggml_backend_dev_type.argtypes, lib.ggml_backend_dev_type.restype = [ptr], ctypes.c_int
    lib.ggml_backend_dev_memory.argtypes = [ptr, ctypes.POINTER(ctypes.c_size_t),
                                            ctypes.POINTER(ctypes.c_size_t)]
    lib.ggml_backend_dev_memory.restype = None
    return lib
