"""The web chat page in headless Chromium (Debian's `chromium`, driven by Playwright) against the
real server: a streamed answer, the model picker, the stop button, conversations kept across a
reload, and the page at desktop and phone size (screenshots go to pytest's tmp dir)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import OpenAI
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.support.server import (
    MODEL,
    Server,
    assert_text_follows_greedy_run,
    free_port,
    stop_server,
)

pytestmark = pytest.mark.e2e

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
TWO_MODELS = ("smollm2-first", "smollm2-second")
STATS = re.compile(r"^\d+ tokens · [\d.]+ tok/s · \d+ of \d+ prompt tokens cached$")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is not installed: `apt-get install -y chromium` (make test does it)")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--no-sandbox"])
        yield browser
        browser.close()


def requests_elsewhere(page: Page, server: Server) -> list[str]:
    """The URLs the page asks for outside the server (filled as it goes): must stay empty."""
    outside: list[str] = []
    page.on("request", lambda r: None if r.url.startswith(server.base_url + "/")
            else outside.append(r.url))
    return outside


@pytest.fixture
def page(browser: Browser, server: Server) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1200, "height": 800})
    page = context.new_page()
    outside = requests_elsewhere(page, server)
    page.goto(server.base_url + "/")
    expect(page.locator("#model option")).not_to_have_count(0)
    yield page
    context.close()
    assert outside == []  # no CDN, no fonts, nothing from anywhere else


def set_setting(page: Page, selector: str, value: str) -> None:
    page.locator("#settings summary").click()
    page.fill(selector, value)
    page.dispatch_event(selector, "change")
    page.locator("#settings summary").click()


def send(page: Page, text: str) -> None:
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def last_answer(page: Page):  # noqa: ANN201 - a Playwright Locator
    return page.locator(".message.assistant").last


def stored_conversations(page: Page) -> list[dict]:
    return json.loads(page.evaluate("localStorage.getItem('pensieve.conversations')"))


def test_streamed_answer_equals_the_api_answer(page: Page, client: OpenAI,
                                               tmp_path: Path) -> None:
    set_setting(page, "#temperature", "0")
    set_setting(page, "#max-tokens", "40")
    send(page, "Name three colors.")
    answer = last_answer(page)
    expect(answer).to_have_attribute("data-state", "done", timeout=120_000)
    assert int(answer.get_attribute("data-chunks") or 0) > 1  # arrived in pieces
    expect(page.locator("#stats")).to_have_text(STATS)
    expected = client.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=40, logprobs=True, top_logprobs=5,
        messages=[{"role": "user", "content": "Name three colors."}])
    conv = stored_conversations(page)[0]
    # the page's run and this one are two runs on a server with memory: equal up to a near-tie
    assert_text_follows_greedy_run(conv["messages"][-1]["content"],
                                   expected.choices[0].logprobs.content)
    assert conv["title"] == "Name three colors."
    page.screenshot(path=tmp_path / "chat-desktop.png", full_page=True)

    page.reload()  # the conversation list lives in the browser
    expect(page.locator("#conversations li")).to_have_count(1)
    expect(page.locator(".message.user")).to_have_text(["Name three colors."])


@pytest.fixture(scope="module")
def two_model_server(default_model: Path, tmp_path_factory: pytest.TempPathFactory
                     ) -> Iterator[Server]:
    """The default model under two names, each in its own worker (tests/e2e/web/two_models.py)."""
    tmp = tmp_path_factory.mktemp("two-models")
    port, log_path = free_port(), tmp / "server.log"
    script = Path(__file__).with_name("two_models.py")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, str(script), str(port), str(tmp),
                                 str(default_model), *TWO_MODELS],
                                stdout=log, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", proc, log_path)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            models = server.health()["models"]
            if all(models[n]["state"] == "ready" for n in TWO_MODELS):
                break
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        time.sleep(0.2)
    else:
        stop_server(server)
        pytest.fail(f"the two-model server did not start:\n{server.log_tail()}")
    yield server
    stop_server(server)


def test_model_picker_switches_models(browser: Browser, two_model_server: Server) -> None:
    context = browser.new_context()
    page = context.new_page()
    page.goto(two_model_server.base_url + "/")
    expect(page.locator("#model option")).to_have_text(list(TWO_MODELS))
    set_setting(page, "#max-tokens", "4")
    for name in (TWO_MODELS[1], TWO_MODELS[0], TWO_MODELS[1]):
        page.select_option("#model", name)
        send(page, f"Say hi to {name}")
        expect(last_answer(page)).to_have_attribute("data-state", "done", timeout=120_000)
        expect(last_answer(page)).to_have_attribute("data-model", name)  # the server's reply
    assert stored_conversations(page)[0]["model"] == TWO_MODELS[1]

    page.click("#new-chat")  # each conversation keeps its model
    page.select_option("#model", TWO_MODELS[0])
    send(page, "Hello")
    expect(last_answer(page)).to_have_attribute("data-state", "done", timeout=120_000)
    page.locator("#conversations li .title").last.click()
    expect(page.locator("#model")).to_have_value(TWO_MODELS[1])
    context.close()


def test_stop_button_ends_the_stream_and_frees_the_sequence(page: Page, server: Server) -> None:
    set_setting(page, "#max-tokens", "4000")
    set_setting(page, "#extra", '{"ignore_eos": true}')
    send(page, "Tell me a very long story.")
    answer = last_answer(page)
    expect(page.locator("#stop")).to_be_visible()
    page.wait_for_function(
        "() => +document.querySelector('.message.assistant:last-child').dataset.chunks >= 5",
        timeout=120_000)
    page.click("#stop")
    expect(answer).to_have_attribute("data-state", "stopped")
    expect(page.locator("#send")).to_be_visible()
    chunks = answer.get_attribute("data-chunks")
    deadline = time.monotonic() + 20
    while server.model_status()["num_running"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert server.model_status()["num_running"] == 0
    assert answer.get_attribute("data-chunks") == chunks  # nothing arrived after the stop
    assert int(chunks or 0) < 4000


def test_error_is_shown_in_the_page(page: Page) -> None:
    set_setting(page, "#extra", '{"temperature": "hot"}')
    send(page, "Hello")
    answer = last_answer(page)
    expect(answer).to_have_attribute("data-state", "error")
    expect(answer).to_contain_text("Error:")


def test_markdown_is_rendered_and_model_text_is_escaped(page: Page) -> None:
    source = ("# Title\n<img src=x onerror=alert(1)> **bold** and `<i>`\n- one\n- two\n"
              "[link](https://example.org) [bad](javascript:alert(1))\n```py\nprint('<b>')\n```")
    html = page.evaluate("s => PensieveMarkdown.render(s)", source)
    assert "<img" not in html and "&lt;img src=x" in html
    assert "<h1>Title</h1>" in html and "<strong>bold</strong>" in html
    assert "<code>&lt;i&gt;</code>" in html and "<ul><li>one</li><li>two</li></ul>" in html
    assert '<a href="https://example.org"' in html and 'href="javascript' not in html
    assert '<pre><code class="language-py">print(&#39;&lt;b&gt;&#39;)</code></pre>' in html


def test_phone_layout(browser: Browser, server: Server, tmp_path: Path) -> None:
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True,
                                  has_touch=True)
    page = context.new_page()
    page.goto(server.base_url + "/")
    expect(page.locator("#sidebar")).not_to_be_in_viewport()
    expect(page.locator("#prompt")).to_be_in_viewport()
    page.click("#toggle-sidebar")
    expect(page.locator("#new-chat")).to_be_in_viewport(ratio=1)  # after the slide-in
    page.screenshot(path=tmp_path / "chat-phone-sidebar.png")
    page.click("#new-chat")
    expect(page.locator("#sidebar")).not_to_be_in_viewport()
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390  # nothing sticks out sideways
    page.screenshot(path=tmp_path / "chat-phone.png")
    context.close()


def test_api_docs_page_lists_the_routes_offline(browser: Browser, server: Server,
                                                tmp_path: Path) -> None:
    context = browser.new_context()
    page = context.new_page()
    outside = requests_elsewhere(page, server)
    page.goto(server.base_url + "/docs")
    expect(page.locator("#operations")).to_contain_text("/v1/chat/completions")
    page.locator("details.op", has_text="/v1/chat/completions").click()
    expect(page.locator("details.op[open] table")).to_contain_text("messages (required)")
    page.screenshot(path=tmp_path / "api-docs.png", full_page=True)
    assert outside == []  # nothing loaded from anywhere else
    context.close()
