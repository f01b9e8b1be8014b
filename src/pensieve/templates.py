"""Chat templates: the Jinja template from the GGUF metadata, rendered in Jinja2's immutable
sandbox so a template can never run code, read files or mutate what it is given.

Rendering has budgets: the output may be at most `MAX_RENDER_CHARS` and rendering may take at
most `MAX_RENDER_SECONDS` (checked as output is produced and whenever the template calls
`range`, so a loop that prints nothing is caught too). Message text is data, never template
source: `{{ ... }}` inside a message is rendered literally.

Models without a template get ChatML, the most common convention among small chat models.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import functools
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from jinja2 import Template, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment, safe_range

from pensieve.errors import InvalidRequest

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


MAX_RENDER_CHARS = 16 << 20
MAX_RENDER_SECONDS = 5.0

# When the render running in this context must stop (monotonic seconds).
_render_deadline: contextvars.ContextVar[float] = contextvars.ContextVar("render_deadline",
                                                                        default=float("inf"))


class _TemplateRaised(Exception):
    pass


class _BudgetExceeded(Exception):
    pass


def _check_deadline() -> None:
    if time.monotonic() > _render_deadline.get():
        raise _BudgetExceeded(f"rendering took longer than {MAX_RENDER_SECONDS:g} s")


def _budgeted_range(*args: int) -> range:
    _check_deadline()
    return safe_range(*args)


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _strftime_now(fmt: str) -> str:
    return dt.datetime.now().strftime(fmt)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False,
            sort_keys: bool = False) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


class _BudgetedEnvironment(ImmutableSandboxedEnvironment):
    """Refuses `*` and `**` results that would blow the budget before computing them
    (`'x' * 10**10` would otherwise allocate gigabytes in one step, between any checks)."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:  # noqa: ANN401
        if operator == "*":
            _check_repeat(left, right)
            _check_repeat(right, left)
        elif isinstance(right, int) and abs(right) > 1024:
            raise _BudgetExceeded("an exponent above 1024")
        return super().call_binop(context, operator, left, right)


def _check_repeat(seq: Any, times: Any) -> None:  # noqa: ANN401
    if isinstance(seq, str | list | tuple) and isinstance(times, int) \
            and len(seq) * times > MAX_RENDER_CHARS:
        raise _BudgetExceeded(f"a value longer than {MAX_RENDER_CHARS} items")


def _make_env() -> ImmutableSandboxedEnvironment:
    env = _BudgetedEnvironment(trim_blocks=True, lstrip_blocks=True,
                               keep_trailing_newline=True)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["range"] = _budgeted_range
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
        token = _render_deadline.set(time.monotonic() + MAX_RENDER_SECONDS)
        try:
            compiled = _compile(self.source)
            chunks = compiled.generate(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                **extra,
            )
            return _within_budget(chunks)
        except _BudgetExceeded as exc:
            raise InvalidRequest(f"The chat template exceeded its budget: {exc}.",
                                 param="messages", code="template_budget") from exc
        except _TemplateRaised as exc:
            raise InvalidRequest(f"The model's chat template refused the messages: {exc}",
                                 param="messages", code="template_error") from exc
        except (TemplateError, ArithmeticError, LookupError, TypeError, ValueError,
                AttributeError, RecursionError) as exc:
            raise InvalidRequest(
                f"The model's chat template could not render these messages: {exc}",
                param="messages", code="template_error",
            ) from exc
        finally:
            _render_deadline.reset(token)


def _within_budget(chunks: Iterator[str]) -> str:
    parts: list[str] = []
    size = 0
    for chunk in chunks:
        size += len(chunk)
        if size > MAX_RENDER_CHARS:
            raise _BudgetExceeded(f"the prompt grew past {MAX_RENDER_CHARS} characters")
        _check_deadline()
        parts.append(chunk)
    return "".join(parts)


_ENV = _make_env()


@functools.lru_cache(maxsize=32)
def _compile(source: str) -> Template:
    return _ENV.from_string(source)
