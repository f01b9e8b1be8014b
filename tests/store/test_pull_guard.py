"""Pulls connect only to public addresses unless `pull_allow` says more (store/netguard.py), at
every redirect, and to the address that was checked (store/fetch.py).

No test here sends a byte anywhere but loopback: refusals are checked on literal addresses or on
names answered by a stub resolver, and an autouse guard fails any test whose code would open a
connection to a non-loopback address."""

from __future__ import annotations

import ipaddress
import shutil
import socket
import ssl
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from pensieve.store.default_model import SHA256
from pensieve.store.fetch import guarded_get
from pensieve.store.netguard import (
    IPAddress,
    NetPolicy,
    PullRefused,
    parse_allow_entry,
    refusal_reason,
)
from pensieve.store.pull import check_source, pull
from pensieve.store.store import ModelStore
from tests.store.fake_hub import FakeHub, HubRepo

TIMEOUT = httpx.Timeout(10.0)


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail, instead of connecting, if code under test dials anything but loopback."""
    real = socket.create_connection

    def create_connection(address: tuple[str, int], *args: object,
                          **kwargs: object) -> socket.socket:
        assert ipaddress.ip_address(address[0]).is_loopback, f"connection to {address}"
        return real(address, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "create_connection", create_connection)


def stub_resolver(answers: dict[str, list[str]]) -> Callable[[str, int], list[IPAddress]]:
    def resolve(host: str, _port: int) -> list[IPAddress]:
        if host not in answers:
            raise socket.gaierror(f"{host}: unknown to the stub")
        return [ipaddress.ip_address(a) for a in answers[host]]
    return resolve


# --- which addresses ----------------------------------------------------------------------

@pytest.mark.parametrize("address, why", [
    ("127.0.0.1", "loopback"), ("127.255.0.9", "loopback"), ("10.1.2.3", "private"),
    ("172.16.0.1", "private"), ("172.31.255.254", "private"), ("192.168.1.1", "private"),
    ("169.254.169.254", "link-local"), ("0.0.0.0", "this network"), ("0.1.2.3", "this network"),
    ("100.64.0.1", "shared"), ("100.127.255.254", "shared"), ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"), ("255.255.255.255", "reserved"), ("240.0.0.1", "reserved"),
    ("198.18.0.1", "benchmarking"), ("192.0.2.1", "documentation"), ("192.0.0.8", "IETF"),
    ("::1", "loopback"), ("::", "unspecified"), ("fe80::1", "link-local"),
    ("fc00::1", "unique local"), ("fd12:3456::1", "unique local"), ("ff02::1", "multicast"),
    ("ff0e::1", "multicast"), ("fec0::1", "site-local"), ("2001:db8::1", "documentation"),
    ("100::1", "global unicast"), ("2001::1", "Teredo"), ("64:ff9b:1::a00:1", "NAT64"),
    ("::127.0.0.1", "IPv4-compatible"), ("::a00:1", "IPv4-compatible"),
    ("::ffff:127.0.0.1", "loopback"), ("::ffff:10.0.0.1", "private"),
    ("::ffff:169.254.169.254", "link-local"), ("::ffff:0.0.0.0", "this network"),
    ("2002:7f00:1::1", "loopback"), ("2002:a9fe:a9fe::", "link-local"),
    ("64:ff9b::7f00:1", "loopback"), ("64:ff9b::a9fe:a9fe", "link-local"),
    ("64:ff9b::a00:1", "private"),
])
def test_non_public_addresses_are_refused(address: str, why: str) -> None:
    reason = refusal_reason(ipaddress.ip_address(address))
    assert reason is not None and why in reason


@pytest.mark.parametrize("address", [
    "8.8.8.8", "1.1.1.1", "151.101.1.1", "100.63.255.255", "100.128.0.0", "172.32.0.1",
    "2001:4860:4860::8888", "2606:4700::1111", "::ffff:8.8.8.8", "2002:808:808::1",
    "64:ff9b::808:808",
])
def test_public_addresses_pass(address: str) -> None:
    assert refusal_reason(ipaddress.ip_address(address)) is None


# --- the allow list -----------------------------------------------------------------------

@pytest.mark.parametrize("entry, host, network, port", [
    ("mirror.lan", "mirror.lan", None, None), ("Mirror.LAN.:8000", "mirror.lan", None, 8000),
    ("10.0.0.5", None, "10.0.0.5/32", None), ("10.0.0.5:8000", None, "10.0.0.5/32", 8000),
    ("192.168.0.0/16", None, "192.168.0.0/16", None), ("fd00::/8", None, "fd00::/8", None),
    ("::1", None, "::1/128", None), ("[::1]:9000", None, "::1/128", 9000),
])
def test_allow_entries_parse(entry: str, host: str | None, network: str | None,
                             port: int | None) -> None:
    rule = parse_allow_entry(entry)
    assert rule.host == host and rule.port == port
    assert (str(rule.network) if rule.network else None) == network


@pytest.mark.parametrize("entry", ["mirror.lan:http", "bad host", "10.0.0.0/33", "a:0",
                                   "x:70000", "http://mirror.lan/"])
def test_bad_allow_entries_are_refused(entry: str) -> None:
    with pytest.raises(ValueError, match="pull_allow"):
        parse_allow_entry(entry)


def test_the_setting_builds_the_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    from pensieve.config import Settings

    monkeypatch.setenv("PENSIEVE_PULL_ALLOW", "mirror.lan:8000, 10.0.0.0/8")
    policy = Settings().pull_policy()
    assert [r.host or str(r.network) for r in policy.allow] == ["mirror.lan", "10.0.0.0/8"]
    assert policy.check("http://10.9.8.7/x.gguf").address == ipaddress.ip_address("10.9.8.7")
    assert not Settings(pull_allow="").pull_policy().allow  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="pull_allow"):
        Settings(pull_allow="not a host")  # type: ignore[arg-type]


# --- checking a URL -----------------------------------------------------------------------

@pytest.mark.parametrize("url, named", [
    ("http://169.254.169.254/latest/meta-data", "169.254.169.254 is a link-local address"),
    ("http://127.0.0.1:8080/x.gguf", "127.0.0.1 is a loopback address"),
    ("http://[::1]:8080/x.gguf", "::1 is a loopback address"),
    ("http://[::ffff:7f00:1]/x.gguf", "::ffff:7f00:1 is a loopback address"),
    ("https://[fd00::1]/x.gguf", "fd00::1 is a private (unique local) address"),
    ("http://0.0.0.0:11434/", "0.0.0.0 is a 'this network' address"),
])
def test_literal_addresses_are_refused_and_the_setting_named(url: str, named: str) -> None:
    with pytest.raises(PullRefused) as caught:
        NetPolicy().check(url)
    assert named in caught.value.message and "pull_allow" in caught.value.message
    assert caught.value.status_code == 400 and caught.value.code == "pull_refused"


def test_names_are_judged_by_what_they_resolve_to() -> None:
    policy = NetPolicy(resolve=stub_resolver({
        "internal.test": ["10.0.0.5"], "mixed.test": ["8.8.8.8", "127.0.0.1"],
        "mapped.test": ["::ffff:192.168.0.1"], "public.test": ["8.8.8.8"]}))
    for host, shown in [("internal.test", "internal.test (10.0.0.5) is a private"),
                        ("mixed.test", "mixed.test (127.0.0.1) is a loopback"),
                        ("mapped.test", f"mapped.test ({ipaddress.ip_address('::ffff:c0a8:1')})"
                                        " is a private")]:
        with pytest.raises(PullRefused, match=r"add " + host + r":80 .*pull_allow") as caught:
            policy.check(f"http://{host}/x.gguf")
        assert shown in caught.value.message
    target = policy.check("https://PUBLIC.test/x.gguf")
    assert (target.host, target.port, str(target.address)) == ("public.test", 443, "8.8.8.8")


def test_a_name_that_does_not_resolve_is_a_connection_error() -> None:
    with pytest.raises(httpx.ConnectError, match="could not resolve nowhere.test"):
        NetPolicy(resolve=stub_resolver({})).check("http://nowhere.test/x")


def test_other_schemes_are_refused() -> None:
    with pytest.raises(PullRefused, match="only http and https"):
        NetPolicy(allow_any=True).check("ftp://8.8.8.8/x.gguf")


@pytest.mark.parametrize("entries, url, allowed", [
    (["internal.test"], "http://internal.test:9000/x", True),
    (["internal.test:9000"], "http://internal.test:9000/x", True),
    (["internal.test:9000"], "http://internal.test:9001/x", False),
    (["other.test"], "http://internal.test/x", False),
    (["10.0.0.0/8"], "http://internal.test/x", True),
    (["10.0.0.0/8:80"], "http://internal.test/x", True),
    (["10.0.0.0/8:80"], "https://internal.test/x", False),
    (["192.168.0.0/16"], "http://internal.test/x", False),
    (["*"], "http://internal.test/x", True),
    (["*"], "http://[::1]/x", True),
    (["127.0.0.1"], "http://[::ffff:127.0.0.1]/x", True),
    (["127.0.0.1"], "http://127.0.0.2/x", False),
    (["[::1]:8080"], "http://[::1]:8080/x", True),
    (["::1"], "http://127.0.0.1/x", False),
])
def test_the_allow_list_opens_exactly_what_it_names(entries: list[str], url: str,
                                                    allowed: bool) -> None:
    policy = NetPolicy.from_entries(entries)
    policy = NetPolicy(policy.allow, policy.allow_any,
                       stub_resolver({"internal.test": ["10.0.0.5"]}))
    if allowed:
        policy.check(url)
    else:
        with pytest.raises(PullRefused):
            policy.check(url)


# --- connecting: pinned address, redirects, TLS --------------------------------------------

@pytest.fixture
def blob(tmp_path: Path) -> Path:
    path = tmp_path / "blob.bin"
    path.write_bytes(b"model bytes " * 1000)
    return path


@pytest.fixture
def hub(blob: Path) -> Iterator[FakeHub]:
    fake = FakeHub(files={"blob.bin": blob}).start()
    yield fake
    fake.stop()


def names_for_hub(*allowed: str) -> NetPolicy:
    """`hub.test` and `cdn.test` both answer 127.0.0.1 (the fake hub); neither exists in DNS,
    so a fetch that works proves the connection went to the address that was checked."""
    rules = NetPolicy.from_entries(allowed)
    return NetPolicy(rules.allow, rules.allow_any,
                     stub_resolver({"hub.test": ["127.0.0.1"], "cdn.test": ["127.0.0.1"]}))


def fetch(url: str, policy: NetPolicy, headers: dict[str, str] | None = None) -> bytes:
    with guarded_get(url, policy, headers=headers or {}, timeout=TIMEOUT) as response:
        assert response.status_code in (200, 206)
        return response.read()


def test_a_refused_pull_opens_no_connection() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    port = listener.getsockname()[1]
    try:
        for url in (f"http://127.0.0.1:{port}/x.gguf", f"http://hub.test:{port}/x.gguf"):
            with pytest.raises(PullRefused):
                fetch(url, names_for_hub())
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing ever knocked
    finally:
        listener.close()


def test_the_connection_goes_to_the_checked_address_with_the_host_name(
        hub: FakeHub, blob: Path) -> None:
    assert fetch(f"http://hub.test:{hub.port}/files/blob.bin", names_for_hub("hub.test")) \
        == blob.read_bytes()
    ((path, headers),) = hub.requests
    assert path == "/files/blob.bin" and headers["host"] == f"hub.test:{hub.port}"


def test_a_redirect_to_a_refused_host_is_refused_at_the_hop(hub: FakeHub) -> None:
    hub.redirects["/files/jump"] = f"http://cdn.test:{hub.port}/files/blob.bin"
    with pytest.raises(PullRefused, match=r"cdn.test \(127.0.0.1\) is a loopback") as caught:
        fetch(f"http://hub.test:{hub.port}/files/jump", names_for_hub("hub.test"))
    assert f"http://cdn.test:{hub.port}/files/blob.bin" in caught.value.message
    assert [path for path, _ in hub.requests] == ["/files/jump"]  # cdn.test got nothing


def test_a_redirect_to_a_literal_private_address_is_refused(hub: FakeHub) -> None:
    hub.redirects["/files/jump"] = "http://169.254.169.254/latest/meta-data"
    with pytest.raises(PullRefused, match="169.254.169.254 is a link-local"):
        fetch(f"http://hub.test:{hub.port}/files/jump", names_for_hub("hub.test"))


def test_redirects_are_followed_and_credentials_stay_with_their_origin(
        hub: FakeHub, blob: Path) -> None:
    hub.redirects["/files/a"] = "/files/b"  # relative: joined to hub.test, not the IP
    hub.redirects["/files/b"] = f"http://cdn.test:{hub.port}/files/blob.bin"
    body = fetch(f"http://hub.test:{hub.port}/files/a", names_for_hub("hub.test", "cdn.test"),
                 {"Authorization": "Bearer secret", "Range": "bytes=12-"})
    assert body == blob.read_bytes()[12:]
    seen = [(p, h["host"], h.get("authorization"), h.get("range")) for p, h in hub.requests]
    assert seen == [("/files/a", f"hub.test:{hub.port}", "Bearer secret", "bytes=12-"),
                    ("/files/b", f"hub.test:{hub.port}", "Bearer secret", "bytes=12-"),
                    ("/files/blob.bin", f"cdn.test:{hub.port}", None, "bytes=12-")]


def test_a_redirect_loop_ends(hub: FakeHub) -> None:
    hub.redirects["/files/loop"] = "/files/loop"
    with pytest.raises(httpx.TooManyRedirects):
        fetch(f"http://hub.test:{hub.port}/files/loop", names_for_hub("hub.test"))
    assert len(hub.requests) == 11


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Self-signed certificates for hub.test and other.test (made with the openssl tool)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    folder = tmp_path_factory.mktemp("tls")
    made = {}
    for name in ("hub.test", "other.test"):
        cert, key = folder / f"{name}.pem", folder / f"{name}.key"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
                        "-keyout", str(key), "-out", str(cert), "-subj", f"/CN={name}",
                        "-addext", f"subjectAltName=DNS:{name}"],
                       check=True, capture_output=True)
        made[name] = (cert, key)
    return made


@pytest.mark.parametrize("served_as, works", [("hub.test", True), ("other.test", False)])
def test_tls_verifies_the_host_name_over_the_pinned_address(
        certificates: dict[str, tuple[Path, Path]], blob: Path, served_as: str, works: bool,
        monkeypatch: pytest.MonkeyPatch) -> None:
    cert, key = certificates[served_as]
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    hub = FakeHub(files={"blob.bin": blob}).start(tls=context)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # trust the certificate, whichever it is
    try:
        url = f"https://hub.test:{hub.port}/files/blob.bin"
        if works:
            assert fetch(url, names_for_hub("hub.test")) == blob.read_bytes()
        else:  # the certificate is trusted but names another host: refused
            with pytest.raises(httpx.ConnectError, match="certificate verify failed"):
                fetch(url, names_for_hub("hub.test"))
    finally:
        hub.stop()


# --- the pull itself: URLs and Hugging Face -------------------------------------------------

@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "models")


def test_a_pull_of_a_loopback_url_is_refused_by_default(store: ModelStore) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    port = listener.getsockname()[1]
    try:
        with pytest.raises(PullRefused, match=f"add 127.0.0.1:{port} .*pull_allow"):
            pull(store, f"http://127.0.0.1:{port}/x.gguf")
        with pytest.raises(BlockingIOError):
            listener.accept()
    finally:
        listener.close()
    assert store.list() == [] and not any(store.partial.iterdir())


def test_the_cloud_metadata_address_is_refused(store: ModelStore) -> None:
    with pytest.raises(PullRefused, match="169.254.169.254 is a link-local address"):
        pull(store, "http://169.254.169.254/latest/meta-data")
    with pytest.raises(PullRefused, match="link-local"):
        check_source("http://169.254.169.254/latest/meta-data", NetPolicy())


@pytest.fixture
def hf_hub(default_model: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """A Hugging Face stand-in reached as hub.test, whose downloads redirect to cdn.test."""
    fake = FakeHub(files={"smol.gguf": default_model}).start()
    fake.repos["owner/repo"] = HubRepo({"smol.Q4_1.gguf": default_model})
    fake.redirects["/owner/repo/resolve/main/smol.Q4_1.gguf"] = \
        f"http://cdn.test:{fake.port}/files/smol.gguf"
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    yield fake
    fake.stop()


def test_an_hf_endpoint_inside_the_network_needs_the_setting(
        hf_hub: FakeHub, store: ModelStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", hf_hub.url)
    for attempt in (lambda: pull(store, "hf.co/owner/repo:Q4_1"),
                    lambda: check_source("hf.co/owner/repo:Q4_1", NetPolicy())):
        with pytest.raises(PullRefused, match=f"HF_ENDPOINT is {hf_hub.url}.*pull_allow"):
            attempt()
    assert hf_hub.requests == []  # refused before any call


def test_hf_downloads_that_redirect_stay_under_the_policy(
        hf_hub: FakeHub, store: ModelStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", f"http://hub.test:{hf_hub.port}")
    with pytest.raises(PullRefused, match=r"cdn.test \(127.0.0.1\) is a loopback"):
        pull(store, "hf.co/owner/repo:Q4_1", policy=names_for_hub("hub.test"))
    assert store.list() == []
    hf_hub.requests.clear()
    manifest = pull(store, "hf.co/owner/repo:Q4_1", policy=names_for_hub("hub.test", "cdn.test"))
    assert manifest.digest == SHA256
    seen = [(path, h["host"].split(":")[0], h.get("authorization"))
            for path, h in hf_hub.requests]
    assert seen == [("/api/models/owner/repo/tree/main", "hub.test", "Bearer hf_secret"),
                    ("/owner/repo/resolve/main/smol.Q4_1.gguf", "hub.test", "Bearer hf_secret"),
                    ("/files/smol.gguf", "cdn.test", None)]  # the token stays with the hub
