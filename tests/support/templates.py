"""Chat templates written for these tests in the styles real model families use for tools and
reasoning, so that the small default model (SmolLM2, ChatML, no tool syntax of its own) can be
served under each and produce native-format output that the parsers meet as real tokens.

Each is a Hugging Face-style Jinja template: `tools` is a list of {"type": "function",
"function": {...}}, an assistant turn's `tool_calls[].function.arguments` is an object, a
`tool` turn has `content` and `tool_call_id`. `enable_thinking` opens a `<think>` block in the
generation prompt, as Qwen 3's template does.
"""

from __future__ import annotations

import httpx

# Hermes / Qwen 2.5 / Qwen 3 style: <tool_call>{...}</tool_call>, results in <tool_response>.
HERMES = """\
{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}You can call these functions:
<tools>
{% for t in tools %}{{ t | tojson }}
{% endfor %}</tools>
To call one, write <tool_call>{"name": <name>, "arguments": <arguments>}</tool_call>.<|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for m in messages %}
{%- if m.role == 'system' %}
{%- elif m.role == 'tool' %}<|im_start|>user
<tool_response>
{{ m.content }}
</tool_response><|im_end|>
{% elif m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant
{{ m.content or '' }}{% for c in m.tool_calls %}<tool_call>
{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}
</tool_call>{% endfor %}<|im_end|>
{% else %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% if enable_thinking is defined and enable_thinking %}<think>
{% endif %}{% endif %}"""

# Llama 3.1 style, on ChatML turns: the call is the whole reply, {"name", "parameters"}, and a
# result comes back in an "ipython" turn.
LLAMA3 = """\
{%- for m in messages %}
{%- if m.role == 'tool' %}<|im_start|>ipython
{{ m.content }}<|im_end|>
{% elif m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant
{% for c in m.tool_calls %}{"name": "{{ c.function.name }}", "parameters": \
{{ c.function.arguments | tojson }}}{% endfor %}<|im_end|>
{% elif m.role == 'user' and loop.last and tools %}<|im_start|>user
Given these functions, reply with a JSON call {"name": name, "parameters": arguments}:
{% for t in tools %}{{ t | tojson }}
{% endfor %}
{{ m.content }}<|im_end|>
{% else %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

# Mistral v3 style: [AVAILABLE_TOOLS] before the last user turn, [TOOL_CALLS][...] replies,
# nine-character call ids, [TOOL_RESULTS] for results.
MISTRAL = """\
{%- for m in messages %}
{%- if m.role == 'user' %}
{%- if tools and loop.last %}<|im_start|>system
[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]
Call tools as [TOOL_CALLS][{"name": ..., "arguments": {...}}].<|im_end|>
{% endif %}<|im_start|>user
{{ m.content }}<|im_end|>
{% elif m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant
[TOOL_CALLS][{% for c in m.tool_calls %}{% if c.id | length != 9 %}\
{{ raise_exception('Tool call ids must be nine letters and digits') }}{% endif %}\
{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}, \
"id": "{{ c.id }}"}{% if not loop.last %}, {% endif %}{% endfor %}]<|im_end|>
{% elif m.role == 'tool' %}<|im_start|>user
[TOOL_RESULTS]{"call_id": "{{ m.tool_call_id }}", "content": {{ m.content | tojson }}}\
[/TOOL_RESULTS]<|im_end|>
{% else %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

NATIVE = {"hermes": HERMES, "llama3": LLAMA3, "mistral": MISTRAL}

WEATHER = {"name": "get_weather", "description": "The current weather in a city.",
           "parameters": {"type": "object",
                          "properties": {"city": {"type": "string", "maxLength": 40}},
                          "required": ["city"]}}


def create_model(base_url: str, name: str, base: str, template: str) -> None:
    """A store model `name`: the default model's weights under `template` (Ollama's
    /api/create, as a user would make one)."""
    r = httpx.post(f"{base_url}/api/create", json={"model": name, "from": base,
                                                  "template": template, "stream": False},
                   timeout=120)
    r.raise_for_status()
