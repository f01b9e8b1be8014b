"""What `show`, `list` and `ps` say about a model, from its GGUF metadata and manifest (shared
by the CLI and the Ollama-style HTTP routes)."""

from __future__ import annotations

import json
from typing import Any

from pensieve.store.gguf import ArraySummary, GgufInfo
from pensieve.store.store import Manifest, ModelDefaults


def parameter_size(num_params: int) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if num_params >= scale:
            return f"{num_params / scale:.3g}{unit}"
    return str(num_params)


def details(info: GgufInfo) -> dict[str, Any]:
    """Ollama's `details` object."""
    return {"parent_model": "", "format": "gguf", "family": info.architecture,
            "families": [info.architecture], "parameter_size": parameter_size(info.num_params),
            "quantization_level": info.quantization}


def model_info(info: GgufInfo) -> dict[str, Any]:
    """GGUF metadata as JSON (long arrays stay summarised, the template is shown apart)."""
    shown: dict[str, Any] = {}
    for key, value in info.metadata.items():
        if key == "tokenizer.chat_template":
            continue
        if isinstance(value, ArraySummary):
            shown[key] = f"[{value.length} x {value.type_name}]"
        else:
            shown[key] = value
    shown["general.parameter_count"] = info.num_params
    return shown


def summary(info: GgufInfo) -> dict[str, Any]:
    """The handful of facts a person looks for first."""
    license_ = info.metadata.get("general.license")
    return {"architecture": info.architecture, "parameters": parameter_size(info.num_params),
            "quantization": info.quantization, "context_length": info.context_length,
            "embedding_length": info.arch_value("embedding_length"),
            "license": license_ if isinstance(license_, str) else None,
            "file_size": info.file_size, "tensors": len(info.tensors),
            "gguf_version": info.version}


def model_defaults(manifest: Manifest | None, info: GgufInfo) -> ModelDefaults:
    """What a request to this model starts from: its store entry's defaults over those its GGUF
    file brings (`general.sampling.*`)."""
    stored = manifest.defaults if manifest is not None else ModelDefaults()
    return stored.over(ModelDefaults.from_gguf(info))


def parameters(defaults: ModelDefaults) -> dict[str, object]:
    """The defaults that are Modelfile PARAMETERs (all but the system prompt and template)."""
    return {k: v for k, v in defaults.to_dict().items() if k not in ("system", "template")}


def parameters_text(defaults: ModelDefaults) -> str:
    """Ollama's `parameters`: one `name value` line per default."""
    lines = []
    for key, value in parameters(defaults).items():
        for item in value if isinstance(value, list) else [value]:
            lines.append(f"{key:<15} {json.dumps(item)}")
    return "\n".join(lines)


def modelfile(name: str, defaults: ModelDefaults, info: GgufInfo) -> str:
    lines = [f"# Modelfile for {name}", f"FROM {info.path}"]
    if defaults.template:
        lines.append(f'TEMPLATE """{defaults.template}"""')
    if defaults.system:
        lines.append(f'SYSTEM """{defaults.system}"""')
    for line in parameters_text(defaults).splitlines():
        lines.append(f"PARAMETER {line}")
    return "\n".join(lines) + "\n"
