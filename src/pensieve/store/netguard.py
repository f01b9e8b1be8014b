"""Which addresses a pull may connect to (server-side request forgery guard).

`POST /api/pull` takes a URL from a client, so without a guard anyone who may pull could make
the server probe its own network (`http://169.254.169.254/...`, `http://127.0.0.1:6379/`).
By default a pull connects only to public addresses; the operator opens more with the
`pull_allow` setting (host names, host:port, IP addresses, CIDR networks, or `*`).

    URL -> host (IDNA) -> addresses (literal, or one getaddrinfo) -> every one allowed?
        -> Target(url, address): store/fetch.py connects to exactly that address

Refused unless allowed: loopback, private (RFC 1918, unique local), link-local, shared
(100.64/10), "this network" (0/8), multicast, documentation, benchmarking, reserved and the
IPv6 ranges outside global unicast (2000::/3). IPv6 forms that carry an IPv4 address
(IPv4-mapped `::ffff:a.b.c.d`, 6to4 `2002::/16`, NAT64 `64:ff9b::/96`) are judged by the IPv4
address inside; IPv4-compatible `::a.b.c.d`, Teredo and local-use NAT64 are refused. The table
is our own (IANA's special-purpose registries) rather than `ipaddress.is_global` alone, whose
answers differ between Python versions (3.11 calls `::ffff:127.0.0.1` global); `is_global` is
asked as well, so either one refusing refuses. A name with several addresses is refused if any
of them is refused.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import httpx

from pensieve.errors import InvalidRequest

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], list[IPAddress]]

SETTING_HINT = "the pull_allow setting (--pull-allow, PENSIEVE_PULL_ALLOW or pull_allow in " \
    "the config file)"

_V4_REFUSED: tuple[tuple[str, str], ...] = (
    ("0.0.0.0/8", "a 'this network' address"), ("10.0.0.0/8", "a private address"),
    ("100.64.0.0/10", "a shared (carrier-grade NAT) address"),
    ("127.0.0.0/8", "a loopback address"), ("169.254.0.0/16", "a link-local address"),
    ("172.16.0.0/12", "a private address"), ("192.0.0.0/24", "an IETF protocol address"),
    ("192.0.2.0/24", "a documentation address"), ("192.88.99.0/24", "a 6to4 relay address"),
    ("192.168.0.0/16", "a private address"), ("198.18.0.0/15", "a benchmarking address"),
    ("198.51.100.0/24", "a documentation address"),
    ("203.0.113.0/24", "a documentation address"), ("224.0.0.0/4", "a multicast address"),
    ("240.0.0.0/4", "a reserved address"),
)
_V6_REFUSED: tuple[tuple[str, str], ...] = (
    ("::/128", "the unspecified address"), ("::1/128", "a loopback address"),
    ("64:ff9b:1::/48", "a local-use NAT64 address"),
    ("::/8", "a reserved address (IPv4-compatible or other ::/8 form)"),
    ("2001::/23", "an IETF protocol address (Teredo, benchmarking, ORCHID)"),
    ("2001:db8::/32", "a documentation address"), ("3fff::/20", "a documentation address"),
    ("fc00::/7", "a private (unique local) address"), ("fe80::/10", "a link-local address"),
    ("fec0::/10", "a site-local address"), ("ff00::/8", "a multicast address"),
)
_V4_TABLE = tuple((ipaddress.IPv4Network(net), why) for net, why in _V4_REFUSED)
_V6_TABLE = tuple((ipaddress.IPv6Network(net), why) for net, why in _V6_REFUSED)
_V6_GLOBAL_UNICAST = ipaddress.IPv6Network("2000::/3")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_HOST_RE = re.compile(r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*\.?")
_DEFAULT_PORTS = {"http": 80, "https": 443}


class PullRefused(InvalidRequest):
    """A pull would connect to an address the policy does not allow (nothing was sent)."""

    def __init__(self, message: str):
        super().__init__(message, param="model", code="pull_refused")


def embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (IPv4-mapped, 6to4, NAT64), if any."""
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFF_FFFF)
    return None


def refusal_reason(address: IPAddress) -> str | None:
    """Why a pull may not connect to `address` by default; None for a public address."""
    inner = embedded_ipv4(address)
    if inner is not None:
        reason = refusal_reason(inner)
        return f"{reason} (as {inner}, inside the IPv6 address)" if reason else None
    table = _V4_TABLE if isinstance(address, ipaddress.IPv4Address) else _V6_TABLE
    for network, why in table:
        if address in network:
            return why
    if isinstance(address, ipaddress.IPv6Address) and address not in _V6_GLOBAL_UNICAST:
        return "not a global unicast address"
    if not address.is_global or address.is_multicast or address.is_reserved:
        return "not a globally reachable address"
    return None


@dataclass(frozen=True, slots=True)
class AllowRule:
    """One `pull_allow` entry: a host name or a network, optionally on one port only."""

    host: str | None = None
    network: IPNetwork | None = None
    port: int | None = None

    def matches(self, host: str, port: int, address: IPAddress) -> bool:
        if self.port is not None and self.port != port:
            return False
        if self.host is not None:
            return self.host == host
        assert self.network is not None
        inner = embedded_ipv4(address)
        return address in self.network or (inner is not None and inner in self.network)


def parse_allow_entry(entry: str) -> AllowRule:
    """`mirror.lan`, `mirror.lan:8000`, `10.0.0.5`, `[fd00::5]:8000`, `192.168.0.0/16`."""
    text = entry.strip().lower()
    host, port = _split_port(text, entry)
    host = host.removeprefix("[").removesuffix("]")
    try:
        return AllowRule(network=ipaddress.ip_network(host, strict=False), port=port)
    except ValueError:
        pass
    if not _HOST_RE.fullmatch(host):
        raise ValueError(f"pull_allow: {entry!r} is not a host name, host:port, IP address or "
                         "CIDR network")
    return AllowRule(host=host.rstrip("."), port=port)


def _split_port(text: str, entry: str) -> tuple[str, int | None]:
    if text.startswith("[") and "]:" in text:
        host, _, port = text.rpartition(":")
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        return text, None
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"pull_allow: {entry!r} has an invalid port")
    return host, int(port)


def system_resolve(host: str, port: int) -> list[IPAddress]:
    """The host's addresses, as the system resolver answers (one lookup)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(ipaddress.ip_address(str(info[4][0])) for info in infos))


@dataclass(frozen=True, slots=True)
class Target:
    """A checked hop: the URL as asked and the address the connection must go to."""

    url: httpx.URL
    host: str  # as sent to DNS (IDNA), lower case
    port: int
    address: IPAddress


@dataclass(frozen=True, slots=True)
class NetPolicy:
    """Where pulls may connect: public addresses, plus what `pull_allow` names."""

    allow: tuple[AllowRule, ...] = ()
    allow_any: bool = False
    resolve: Resolver = field(default=system_resolve, compare=False)

    @classmethod
    def from_entries(cls, entries: Iterable[str]) -> NetPolicy:
        entries = [e for e in (e.strip() for e in entries) if e]
        return cls(tuple(parse_allow_entry(e) for e in entries if e != "*"), "*" in entries)

    def check(self, url: str | httpx.URL) -> Target:
        """Resolve the URL's host and refuse it unless every address is allowed. Raises
        PullRefused, or httpx.ConnectError when the name does not resolve."""
        try:
            url = httpx.URL(url)
        except httpx.InvalidURL as exc:
            raise InvalidRequest(f"Invalid URL {str(url)!r}: {exc}", param="model") from None
        if url.scheme not in _DEFAULT_PORTS:
            raise PullRefused(f"Cannot pull from {url}: only http and https URLs are pulled.")
        if not url.raw_host:
            raise InvalidRequest(f"Invalid URL {str(url)!r}: it names no host.", param="model")
        host = url.raw_host.decode("ascii").lower().rstrip(".")
        port = url.port or _DEFAULT_PORTS[url.scheme]
        addresses = self._addresses(host, port)
        for address in addresses:
            self._refuse_unless_allowed(url, host, port, address)
        return Target(url, host, port, addresses[0])

    def _addresses(self, host: str, port: int) -> list[IPAddress]:
        if _is_literal(host):
            return [ipaddress.ip_address(host)]
        try:
            addresses = self.resolve(host, port)
        except OSError as exc:
            raise httpx.ConnectError(f"could not resolve {host}: {exc}") from exc
        if not addresses:
            raise httpx.ConnectError(f"could not resolve {host}: no addresses")
        return addresses

    def _refuse_unless_allowed(self, url: httpx.URL, host: str, port: int,
                               address: IPAddress) -> None:
        reason = refusal_reason(address)
        if reason is None or self.allow_any:
            return
        if any(rule.matches(host, port, address) for rule in self.allow):
            return
        named = host if _is_literal(host) else f"{host} ({address})"
        suggestion = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raise PullRefused(
            f"Refusing to pull from {url}: {named} is {reason}, and pulls connect only to "
            f"public addresses. To allow it, add {suggestion} (or its network) to "
            f"{SETTING_HINT}.")


def _is_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
