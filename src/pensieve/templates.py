"""Chat templates: the Jinja template from the GGUF metadata, rendered in Jinja2's immutable
sandbox so a template can never run code, read files or mutate what it is given.

Models without a template get ChatML, the most common convention among small chat models.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from pensieve.errors import InvalidRequest

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class _TemplateRaised(Exception):
    pass


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _strftime_now(fmt: str) -> str:
    return dt.datetime.now().strftime(fmt)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False,
            sort_keys: bool = False) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


def _make_env() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        keep_trailing_newline=True)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.filters["tojson"] = _tojson
    return env


@dataclass(frozen=True, slots=True)
class ChatTemplate:
    source: str
    bos_token: str
    eos_token: str
    is_fallback: bool = False

    @classmethod
    def for_model(cls, template: str | None, bos_token: str, eos_token: str) -> ChatTemplate:
        if template:
            return cls(template, bos_token, eos_token)
        return cls(CHATML, bos_token, eos_token, is_fallback=True)

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
               **extra: Any) -> str:
        """Render messages to a prompt. Template errors become a 400, never a 500."""
        try:
            compiled = _compile(self.source)
            return compiled.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                **extra,
            )
        except _TemplateRaised as exc:
            raise InvalidRequest(f"The model's chat template refused the messages: {exc}",
                                 param="messages", code="template_error") from exc
        except (TemplateError, ArithmeticError, LookupError, TypeError, ValueError,
                AttributeError, RecursionError) as exc:
            raise InvalidRequest(
                f"The model's chat template could not render these messages: {exc}",
                param="messages", code="template_error",
            ) from exc


_ENV = _make_env()


@functools.lru_cache(maxsize=32)
def _compile(source: str):  # noqa: ANN202 - jinja2.Template
    return _ENV.from_string(source)
