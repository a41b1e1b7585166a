"""Behind a reverse proxy: who the client is, and which scheme and host it used.

A request's TCP peer is the proxy; the proxy says who its client was in `Forwarded` (RFC 7239)
or `X-Forwarded-For` / `X-Forwarded-Proto` / `X-Forwarded-Host`. Anybody can send those headers,
so they are believed only when the TCP peer is in the `trusted_proxies` setting, and then read
from the right: each proxy appends the address it received the request from, so the right-most
address that is not itself a trusted proxy is the client. Everything to its left was written by
the client (or by proxies we do not know) and is ignored: a forged `X-Forwarded-For: 1.2.3.4`
ends up left of the real address.

`proxy_middleware` runs first in the pipeline and hands every later middleware and view a clone
of the request with `remote`, `scheme` and `host` replaced, so that throttling, audit entries,
sessions, `Secure`/`__Host-` cookies, HSTS and both origin checks (CSRF and the signaling
WebSocket) see the client, not the proxy. The original request (which aiohttp gives to the
access log and to `on_response_prepare` for responses a handler returns) carries the same answer
under `VIEW`: read it with `remote_of` and `scheme_of`.

If both kinds of header arrive, `Forwarded` wins: a proxy must set or remove every header named
here (the nginx configuration in docs/install.md removes `Forwarded` and sets the others).
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from aiohttp import web

log = logging.getLogger(__name__)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# A host as it may appear in a Host header: a name or an IPv4 address, or a bracketed IPv6
# address, with an optional port. Anything else a proxy passes on is ignored.
_HOST = re.compile(
    r"^(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?$"
)
_SCHEMES = {"http", "https"}


@dataclass(frozen=True)
class View:
    """What the request looks like from the client's side."""

    remote: str | None
    scheme: str
    host: str


VIEW = web.RequestKey("proxy_view", View | None)


def parse_networks(values: Iterable[str]) -> tuple[Network, ...]:
    """The `trusted_proxies` setting as networks; ValueError names a bad entry."""
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise ValueError(f"not an IP address or network: {value!r}") from None
    return tuple(networks)


def parse_address(text: str | None) -> Address | None:
    """An address from `X-Forwarded-For` or a `for=` parameter: bare, "[v6]", "[v6]:port",
    "v4:port" or an IPv4-mapped IPv6 address (its IPv4 address); None for "unknown",
    obfuscated identifiers ("_hidden") and anything else."""
    if not text:
        return None
    text = text.strip().strip('"')
    if text.startswith("["):
        text = text[1:].split("]", 1)[0]
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def is_trusted(address: str | Address | None, trusted: Sequence[Network]) -> bool:
    ip = parse_address(address) if isinstance(address, str) or address is None else address
    return ip is not None and any(ip in net for net in trusted)


@dataclass(frozen=True)
class Hop:
    """One proxy's account of the request it received: from whom, over what, for which host."""

    client: str | None
    proto: str | None = None
    host: str | None = None


def _split(values: Iterable[str]) -> list[str]:
    return [part.strip() for value in values for part in value.split(",")]


def hops_from_headers(request: web.BaseRequest) -> list[Hop] | None:
    """The chain the proxies described, left (farthest) to right (nearest); None without one."""
    if "Forwarded" in request.headers:
        return [Hop(e.get("for"), e.get("proto"), e.get("host")) for e in request.forwarded]
    xff = request.headers.getall("X-Forwarded-For", [])
    protos = _split(request.headers.getall("X-Forwarded-Proto", []))
    hosts = _split(request.headers.getall("X-Forwarded-Host", []))
    if not xff and not protos and not hosts:
        return None
    clients: list[str | None] = list(_split(xff)) or [None]
    # Each list is written by the same proxies, right-aligned: the nearest proxy's value is last.
    n = len(clients)
    protos = ([None] * n + protos)[-n:] if protos else [None] * n
    hosts = ([None] * n + hosts)[-n:] if hosts else [None] * n
    return [Hop(c, p, h) for c, p, h in zip(clients, protos, hosts, strict=True)]


def resolve(
    peer: str | None, hops: list[Hop] | None, trusted: Sequence[Network], scheme: str, host: str
) -> View:
    """Walk the chain from the right while the address is a trusted proxy; the first one that
    is not is the client. Scheme and host come from the proxy that received the client's
    request (or the nearest one to its right that said). An address that cannot be read
    ("unknown", "_hidden", garbage) ends the walk and leaves the last trusted proxy as the
    client: never a value further left, which anyone could have written."""
    view = View(peer, scheme, host)
    if not hops or not is_trusted(peer, trusted):
        return view
    for hop in reversed(hops):
        if hop.proto is not None and hop.proto.lower() in _SCHEMES:
            view = View(view.remote, hop.proto.lower(), view.host)
        if hop.host is not None and _HOST.match(hop.host):
            view = View(view.remote, view.scheme, hop.host)
        ip = parse_address(hop.client)
        if ip is None:
            break
        view = View(str(ip), view.scheme, view.host)
        if not is_trusted(ip, trusted):
            break
    return view


def view_of(request: web.BaseRequest, trusted: Sequence[Network]) -> View:
    return resolve(request.remote, hops_from_headers(request), trusted, request.scheme, request.host)


def remote_of(request: web.BaseRequest) -> str | None:
    """The client's address, on the original request as on the clone the app handles."""
    view = request.get(VIEW)
    return view.remote if view is not None else request.remote


def scheme_of(request: web.BaseRequest) -> str:
    view = request.get(VIEW)
    return view.scheme if view is not None else request.scheme


TRUSTED = web.AppKey("trusted_proxies", tuple)


def setup(app: web.Application, trusted_proxies: Iterable[str]) -> None:
    app[TRUSTED] = parse_networks(trusted_proxies)


@web.middleware
async def proxy_middleware(request: web.Request, handler):
    """First in the pipeline: everything after it sees the client's address, scheme and host."""
    trusted = request.app[TRUSTED]
    if not trusted:
        # Said outright rather than left missing: `remote_of`/`scheme_of` run several times a
        # request, and request.get of a missing key raises and catches a KeyError each time.
        request[VIEW] = None
        return await handler(request)
    try:
        view = view_of(request, trusted)
    except Exception:  # a header nobody can parse leaves the request as it came
        log.warning("unreadable forwarding headers from %s", request.remote, exc_info=True)
        return await handler(request)
    request[VIEW] = view
    if (view.remote, view.scheme, view.host) == (request.remote, request.scheme, request.host):
        return await handler(request)
    return await handler(request.clone(remote=view.remote, scheme=view.scheme, host=view.host))
