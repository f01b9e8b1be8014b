"""The safety middleware on the real app (no model: an empty runtime), via Starlette's client."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient
from starlette.routing import Route

from pensieve.api.app import create_app
from pensieve.api.errors import ApiFamily, family_for_path
from pensieve.api.middleware.access import AccessConfig, host_name, key_matches, presented_key
from pensieve.api.middleware.limits import LimitsConfig
from pensieve.api.middleware.safety import SafetyConfig
from pensieve.cli.serve import check_exposure
from pensieve.config import Settings
from pensieve.errors import InvalidRequest
from pensieve.runtime import ModelRuntime
from pensieve.templates import ChatTemplate

KEYS = ("first-key", "second-key")
PUBLIC = {"/health", "/ready"}


def make_client(**access: object) -> TestClient:
    config = SafetyConfig(AccessConfig(**access), LimitsConfig(max_body_bytes=4096))  # type: ignore[arg-type]
    return TestClient(create_app(ModelRuntime(), config), base_url="http://127.0.0.1:8080",
                      raise_server_exceptions=False)  # no model here: some routes cannot work


def assert_family_error(path: str, body: dict, status: int) -> None:
    family = family_for_path(path)
    if family is ApiFamily.OLLAMA:
        assert isinstance(body["error"], str)
    elif family is ApiFamily.ANTHROPIC:
        assert body["type"] == "error" and body["error"]["message"]
    else:
        assert body["error"]["message"], (status, body)


def every_route() -> list[tuple[str, str]]:
    """(method, path) of every route: the OpenAPI document's, plus those outside it (/docs)."""
    app = create_app(ModelRuntime())
    found = {(m.upper(), p) for p, ops in app.openapi()["paths"].items() for m in ops}
    for route in app.routes:
        if isinstance(route, Route):
            found |= {(m, route.path) for m in route.methods or () if m != "HEAD"}
    return sorted((m, re.sub(r"\{[^}]+\}", "x", p)) for m, p in found)


def test_the_app_has_routes_to_check() -> None:
    paths = {p for _, p in every_route()}
    assert {"/v1/chat/completions", "/metrics", "/openapi.json", "/health"} <= paths


@pytest.mark.parametrize(("method", "path"), every_route())
def test_every_route_requires_the_key(method: str, path: str) -> None:
    with make_client(api_keys=KEYS) as client:
        without = client.request(method, path)
        wrong = client.request(method, path, headers={"Authorization": "Bearer nope"})
        right = client.request(method, path, headers={"x-api-key": KEYS[1]})
    if path in PUBLIC:
        assert without.status_code == right.status_code != 401
        return
    for resp in (without, wrong):
        assert resp.status_code == 401
        assert resp.headers["www-authenticate"] == "Bearer"
        if method != "HEAD":  # a HEAD answer has no body
            assert_family_error(path, resp.json(), 401)
    assert right.status_code != 401


def test_bearer_and_x_api_key_both_work() -> None:
    with make_client(api_keys=KEYS) as client:
        assert client.get("/v1/models", headers={"Authorization": "Bearer first-key"}).is_success
        assert client.get("/v1/models", headers={"x-api-key": "second-key"}).is_success
        assert client.get("/v1/models", headers={"Authorization": "Basic first-key"}
                          ).status_code == 401


def test_key_helpers() -> None:
    assert key_matches("b", ("a", "b")) and not key_matches("c", ("a", "b"))
    assert not key_matches("", ("a",)) and not key_matches("a", ())
    assert presented_key({"authorization": "Bearer  t0k "}) == "t0k"
    assert presented_key({"x-api-key": "k"}) == "k"
    assert presented_key({"authorization": "Bearer "}) is None
    assert host_name("[::1]:8080") == "::1" and host_name("Example.com:1") == "example.com"
    assert host_name("localhost") == "localhost"


def test_no_keys_means_open_on_loopback() -> None:
    with make_client() as client:
        assert client.get("/v1/models").is_success


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8080", "127.0.0.1.evil.example"])
def test_foreign_host_header_is_refused(host: str) -> None:
    with make_client() as client:
        resp = client.get("/v1/models", headers={"Host": host})
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "host_not_allowed"


def test_allowed_hosts_and_wildcard_bind() -> None:
    with make_client(allowed_hosts=("box.lan",)) as client:
        assert client.get("/v1/models", headers={"Host": "box.lan:8080"}).is_success
        assert client.get("/v1/models", headers={"Host": "[::1]:8080"}).is_success
    with make_client(bind_host="0.0.0.0", api_keys=KEYS) as client:
        assert client.get("/v1/models", headers={"Host": "10.1.2.3", "x-api-key": KEYS[0]}
                          ).is_success


def test_origin_check_and_cors_allow_list() -> None:
    with make_client() as client:
        resp = client.get("/api/tags", headers={"Origin": "http://evil.example"})
        assert resp.status_code == 403 and isinstance(resp.json()["error"], str)
        same = client.get("/v1/models", headers={"Origin": "http://127.0.0.1:8080"})
        assert same.is_success
        assert "access-control-allow-origin" not in same.headers
    origin = "http://localhost:3000"
    with make_client(cors_origins=(origin,)) as client:
        pre = client.options("/v1/chat/completions", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST"})
        assert pre.status_code == 200
        assert pre.headers["access-control-allow-origin"] == origin
        resp = client.get("/v1/models", headers={"Origin": origin})
        assert resp.headers["access-control-allow-origin"] == origin
        assert client.get("/v1/models", headers={"Origin": "http://other:1"}).status_code == 403


def test_request_id_is_returned_and_sane_ones_are_kept() -> None:
    with make_client() as client:
        kept = client.get("/health", headers={"X-Request-Id": "abc-123"})
        replaced = client.get("/health", headers={"X-Request-Id": "bad id\twith spaces"})
        fresh = client.get("/health")
    assert kept.headers["x-request-id"] == "abc-123"
    assert re.fullmatch(r"[0-9a-f]{32}", replaced.headers["x-request-id"])
    assert fresh.headers["x-request-id"] != replaced.headers["x-request-id"]


def test_body_limit_by_length_and_by_stream() -> None:
    with make_client() as client:
        big = client.post("/v1/messages", content=b"x" * 5000,
                          headers={"Content-Type": "application/json"})
        assert big.status_code == 413 and big.json()["type"] == "error"

        def chunks():  # no Content-Length: chunked transfer
            for _ in range(10):
                yield b"y" * 1000

        streamed = client.post("/v1/completions", content=chunks())
        assert streamed.status_code == 413
        assert streamed.json()["error"]["code"] == "request_too_large"
        bad_length = client.post("/v1/completions", content=b"{}",
                                 headers={"Content-Length": "abc"})
        assert bad_length.status_code == 400


def test_metrics_count_requests_by_route_and_status() -> None:
    with make_client() as client:
        client.get("/v1/models")
        client.get("/nowhere")
        text = client.get("/metrics").text
    assert 'pensieve_http_requests_total{method="GET",route="/v1/models",status="200"} 1.0' in text
    assert 'route="unmatched",status="404"' in text


def test_ready_is_503_without_a_model() -> None:
    with make_client() as client:
        resp = client.get("/ready")
    assert resp.status_code == 503 and resp.json()["status"] == "not ready"


def test_remote_bind_needs_keys_or_explicit_consent() -> None:
    assert check_exposure(Settings(host="127.0.0.1")) is None
    assert check_exposure(Settings(host="localhost")) is None
    assert "API keys" in (check_exposure(Settings(host="0.0.0.0")) or "")
    assert check_exposure(Settings(host="0.0.0.0", api_keys="k")) is None  # type: ignore[arg-type]
    assert check_exposure(Settings(host="0.0.0.0", allow_unauthenticated_remote=True)) is None


def test_keys_from_env_list_and_file(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    key_file = tmp_path / "keys"
    key_file.write_text("# team keys\nfile-key  # laptop\n\nfirst\n")
    monkeypatch.setenv("PENSIEVE_API_KEYS", "first, second")
    settings = Settings(api_key_file=key_file)
    assert settings.all_api_keys() == ("first", "second", "file-key")


def test_template_output_budget() -> None:
    src = "{% for i in range(99999) %}{{ messages[0].content }}{% endfor %}"
    msgs = [{"role": "user", "content": "x" * 1000}]
    with pytest.raises(InvalidRequest, match="budget"):
        ChatTemplate.for_model(src, "", "").render(msgs)


def test_template_time_budget_catches_silent_loops(monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setattr("pensieve.templates.MAX_RENDER_SECONDS", 0.2)
    src = "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}"
    with pytest.raises(InvalidRequest, match="budget"):  # unbudgeted, this runs for hours
        ChatTemplate.for_model(src, "", "").render([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("src", ["{{ 'x' * 10**10 }}", "{{ [1] * 99999999999 }}",
                                 "{{ 7 ** 99999999 }}"])
def test_template_arithmetic_bombs_are_refused_before_computing(src: str) -> None:
    with pytest.raises(InvalidRequest, match="budget"):
        ChatTemplate.for_model(src, "", "").render([{"role": "user", "content": "hi"}])


def test_template_arithmetic_within_budget_still_works() -> None:
    src = "{{ '=' * 3 }}{{ 2 ** 3 }}{{ 3 * 4 }}"
    assert ChatTemplate.for_model(src, "", "").render([]) == "===812"


def test_template_syntax_in_messages_is_data() -> None:
    msgs = [{"role": "user", "content": "{{ 7*7 }}{% for x in range(3) %}a{% endfor %}"}]
    out = ChatTemplate.for_model(None, "", "").render(msgs)
    assert "{{ 7*7 }}{% for x in range(3) %}a{% endfor %}" in out and "49" not in out


def test_engine_client_limits_without_a_worker() -> None:
    import asyncio

    from pensieve.engine.client import EngineClient
    from pensieve.engine.config import ClientLimits
    from pensieve.engine.types import EngineRequest, SamplingParams
    from pensieve.errors import Overloaded

    client = EngineClient("m", None, limits=ClientLimits(max_in_flight=2, max_tokens=5))  # type: ignore[arg-type]
    capped = client._capped(EngineRequest("r", SamplingParams(max_tokens=None), prompt="x"))
    assert capped.params.max_tokens == 5
    kept = client._capped(EngineRequest("r", SamplingParams(max_tokens=3), prompt="x"))
    assert kept.params.max_tokens == 3
    client.num_in_flight = 2
    with pytest.raises(Overloaded) as info:
        asyncio.run(anext(client.generate(EngineRequest("r", SamplingParams(), prompt="x"))))
    assert info.value.headers == {"Retry-After": "1"} and info.value.status_code == 503
    assert client.num_in_flight == 2  # a refused request is not counted
