"""The small part of Go's text/template that Ollama prompt templates (`/api/generate`'s
`template`) use: `{{ .System }}`, `{{ .Prompt }}`, `{{ .Response }}`, `{{ if .X }}` / `{{ else }}` /
`{{ end }}` and the `{{-` / `-}}` whitespace trims.

Nothing is evaluated: every other action is refused with a 400, so a template can never call a
function or reach data beyond these three strings. As in Ollama, rendering stops at
`{{ .Response }}`, where the model's answer starts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from pensieve.errors import InvalidRequest

_ACTION = re.compile(r"\{\{(-\s)?\s*(.*?)\s*(\s-)?\}\}", re.DOTALL)
_FIELDS = (".System", ".Prompt")
SUPPORTED = "{{ .System }}, {{ .Prompt }}, {{ .Response }}, {{ if .System }}, {{ if .Prompt }}, " \
    "{{ else }}, {{ end }}"


@dataclass(slots=True)
class _State:
    out: list[str] = field(default_factory=list)
    conditions: list[bool] = field(default_factory=list)

    @property
    def is_active(self) -> bool:
        return all(self.conditions)

    def emit(self, text: str) -> None:
        if self.is_active:
            self.out.append(text)


def render_go_template(source: str, system: str, prompt: str) -> str:
    values = {".System": system, ".Prompt": prompt}
    state = _State()
    pos, trim_next = 0, False
    for match in _ACTION.finditer(source):
        text = source[pos:match.start()]
        text = text.lstrip() if trim_next else text
        state.emit(text.rstrip() if match.group(1) else text)
        pos, trim_next = match.end(), bool(match.group(3))
        if match.group(2) == ".Response":
            return "".join(state.out)
        _apply(match.group(2), values, state)
    if state.conditions:
        raise _refuse("an {{ if }} has no {{ end }}")
    tail = source[pos:]
    state.emit(tail.lstrip() if trim_next else tail)
    return "".join(state.out)


def _apply(action: str, values: dict[str, str], state: _State) -> None:
    if action in _FIELDS:
        state.emit(values[action])
    elif action.startswith("if ") and action[3:].strip() in _FIELDS:
        state.conditions.append(bool(values[action[3:].strip()]))
    elif action == "else" and state.conditions:
        state.conditions[-1] = not state.conditions[-1]
    elif action == "end" and state.conditions:
        state.conditions.pop()
    else:
        raise _refuse(f"the action {{{{ {action[:80]} }}}} is not supported")


def _refuse(reason: str) -> InvalidRequest:
    return InvalidRequest(f"Cannot use this template: {reason}. Templates here may use only "
                          f"{SUPPORTED}.", param="template", code="unsupported_template")
