import pytest

from pensieve.errors import InvalidRequest
from pensieve.templates import ChatTemplate

MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


def test_fallback_is_chatml_with_generation_prompt() -> None:
    t = ChatTemplate.for_model(None, "<s>", "</s>")
    assert t.is_fallback
    out = t.render(MSGS)
    assert out == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                   "<|im_start|>assistant\n")


def test_model_template_gets_special_tokens_and_messages() -> None:
    src = "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
    out = ChatTemplate.for_model(src, "<s>", "</s>").render(MSGS)
    assert out == "<s>[system]Be brief.[user]Hi"


def test_raise_exception_in_template_is_a_400() -> None:
    src = "{{ raise_exception('Roles must alternate') }}"
    with pytest.raises(InvalidRequest, match="Roles must alternate"):
        ChatTemplate.for_model(src, "", "").render(MSGS)


@pytest.mark.parametrize("src", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__init__.__globals__ }}",
    "{% set x = messages.append({'role': 'x'}) %}{{ x }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ range(10**9) | list | length }}",
])
def test_template_cannot_escape_the_sandbox(src: str) -> None:
    with pytest.raises(InvalidRequest):
        ChatTemplate.for_model(src, "", "").render(MSGS)


def test_template_syntax_error_is_a_400() -> None:
    with pytest.raises(InvalidRequest, match="could not render"):
        ChatTemplate.for_model("{% for %}", "", "").render(MSGS)


def test_tojson_filter_keeps_non_ascii() -> None:
    out = ChatTemplate.for_model("{{ messages[0] | tojson }}", "", "").render(
        [{"role": "user", "content": "héllo"}])
    assert out == '{"role": "user", "content": "héllo"}'
