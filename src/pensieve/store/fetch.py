"""HTTP GET for pulls, under the address policy of store/netguard.py.

Redirects are followed here, not by httpx, so each hop is checked before anything is sent to
it. A hop connects to the address that was checked, never to a second DNS answer:

    https://cdn.example/f.gguf  --check-->  Target(address=203.0.113.7)
    GET https://203.0.113.7/f.gguf   Host: cdn.example   extensions={"sni_hostname": "cdn.example"}

The URL carries the checked IP, the Host header the name, and for https httpcore's
`sni_hostname` extension makes TLS send that name and verify the certificate against it, so
certificate checks are unchanged. Each hop gets a client of its own: a pooled connection
verified for one name is never reused for another name on the same address. Environment
proxies are not used (a proxy would resolve the name itself, after our check); SSL_CERT_FILE
and SSL_CERT_DIR still are. Authorization is dropped when a redirect leaves the origin, as httpx
does (a Hugging Face token never reaches the CDN).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import httpx

from pensieve.store.netguard import NetPolicy, Target

MAX_REDIRECTS = 10
_REDIRECTS = (301, 302, 303, 307, 308)


@contextlib.contextmanager
def guarded_get(url: str, policy: NetPolicy, *, headers: Mapping[str, str],
                timeout: httpx.Timeout) -> Iterator[httpx.Response]:
    """GET `url`, following redirects, and yield the final (streamed) response. Raises
    netguard.PullRefused before connecting to a hop the policy refuses, httpx errors else."""
    current, hop_headers = httpx.URL(url), dict(headers)
    for _ in range(MAX_REDIRECTS + 1):
        target = policy.check(current)
        with _client(timeout) as client:
            response = client.send(_pinned_request(client, target, hop_headers), stream=True)
            try:
                location = response.headers.get("Location")
                if response.status_code not in _REDIRECTS or not location:
                    yield response
                    return
            finally:
                response.close()
        try:
            following = current.join(location)
        except httpx.InvalidURL as exc:
            raise httpx.RemoteProtocolError(f"{current} redirected to an invalid URL "
                                            f"{location!r}") from exc
        if _origin(following) != _origin(current):
            hop_headers = {k: v for k, v in hop_headers.items()
                           if k.lower() not in ("authorization", "cookie")}
        current = following
    raise httpx.TooManyRedirects(f"more than {MAX_REDIRECTS} redirects from {url}")


def _client(timeout: httpx.Timeout) -> httpx.Client:
    # An explicit transport: no environment proxies; its trust_env keeps SSL_CERT_FILE.
    return httpx.Client(transport=httpx.HTTPTransport(), timeout=timeout,
                        follow_redirects=False)


def _pinned_request(client: httpx.Client, target: Target,
                    headers: Mapping[str, str]) -> httpx.Request:
    pinned = target.url.copy_with(host=str(target.address))
    extensions = {"sni_hostname": target.host} if target.url.scheme == "https" else {}
    host_header = target.url.netloc.decode("ascii")  # name[:port], as httpx would send it
    return client.build_request("GET", pinned, headers={**headers, "Host": host_header},
                                extensions=extensions)


def _origin(url: httpx.URL) -> tuple[str, bytes, int | None]:
    return url.scheme, url.raw_host, url.port
