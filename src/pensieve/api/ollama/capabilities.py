"""What a model can do, in Ollama's words (`/api/show` `capabilities`), read from its GGUF
metadata and its chat template:

    embedding   the GGUF names a pooling type (an embedding model); otherwise completion
    tools       every generative model: a template without tool syntax of its own gets
                Pensieve's generic convention (Ollama lists it only for templates that have one)
    thinking    the template has reasoning markers (`<think>`, ...) or an `enable_thinking` switch
    insert      the GGUF has fill-in-the-middle tokens (`suffix` on /api/generate)
"""

from __future__ import annotations

from collections.abc import Mapping

from pensieve.api.reply import THINK_MARKERS

_FIM_KEYS = (("fim_pre", "prefix"), ("fim_suf", "suffix"), ("fim_mid", "middle"))


def capabilities(template: str | None, metadata: Mapping[str, object]) -> list[str]:
    if is_embedding_model(metadata):
        return ["embedding"]
    found = ["completion", "tools"]
    if fim_token_ids(metadata) is not None:
        found.append("insert")
    if can_think(template):
        found.append("thinking")
    return found


def is_embedding_model(metadata: Mapping[str, object]) -> bool:
    """A model whose GGUF names its pooling (BERT-style embedders), as Ollama tells them."""
    return f"{metadata.get('general.architecture', '')}.pooling_type" in metadata


def can_think(template: str | None) -> bool:
    """Whether the chat template knows reasoning: its markers, or a switch for it."""
    if not template:
        return False
    return "enable_thinking" in template or any(start in template for start, _ in THINK_MARKERS)


def fim_token_ids(metadata: Mapping[str, object]) -> tuple[int, int, int] | None:
    """The model's fill-in-the-middle tokens (prefix, suffix, middle), if its GGUF names them."""
    ids: list[int] = []
    for new, old in _FIM_KEYS:
        value = metadata.get(f"tokenizer.ggml.{new}_token_id",
                             metadata.get(f"tokenizer.ggml.{old}_token_id"))
        text = str(value) if value is not None else ""
        if not text.lstrip("-").isdigit() or int(text) < 0:
            return None
        ids.append(int(text))
    return ids[0], ids[1], ids[2]
