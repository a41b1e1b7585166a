"""Behind a reverse proxy (core/proxy.py): forwarding headers believed only from trusted_proxies,
read from the right; address, scheme and host reach throttling, sessions, cookies, HSTS, the
CSRF origin check, the signaling Origin check and the access log. The same through a real nginx:
tests/test_nginx.py."""

from __future__ import annotations

import logging
from http.cookies import SimpleCookie

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from consult.app import create_app
from consult.core import keys, proxy
from consult.core.config import ConfigError
from consult.core.logs import RedactingAccessLogger
from consult.ops.edge import ConnectionLimiter
from tests.conftest import csrf_of

TRUSTED = proxy.parse_networks(["127.0.0.1", "10.0.0.0/8"])
SITE = "consult.hospital.example"
VIA_HTTPS = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": SITE}


def view(peer, headers: list[proxy.Hop] | None, scheme="http", host="127.0.0.1:8000"):
    return proxy.resolve(peer, headers, TRUSTED, scheme, host)


def xff(*clients: str, proto: str | None = None, host: str | None = None) -> list[proxy.Hop]:
    hops = [proxy.Hop(c) for c in clients]
    hops[-1] = proxy.Hop(clients[-1], proto, host)
    return hops


def test_the_right_most_untrusted_address_is_the_client() -> None:
    # The client wrote "1.2.3.4"; nginx appended the address it really came from.
    assert view("127.0.0.1", xff("1.2.3.4", "198.51.100.7")).remote == "198.51.100.7"
    # Two proxies of ours (10.1.2.3 in front of 127.0.0.1): skipped, the one before them counts.
    assert view("127.0.0.1", xff("1.2.3.4", "198.51.100.7", "10.1.2.3")).remote == "198.51.100.7"
    # Only proxies: the left-most of them.
    assert view("127.0.0.1", xff("10.9.9.9", "10.1.2.3")).remote == "10.9.9.9"
    # An address nobody can read ends the walk at the last proxy: never further left.
    assert view("127.0.0.1", xff("1.2.3.4", "unknown")).remote == "127.0.0.1"
    assert view("127.0.0.1", xff("1.2.3.4", "_hidden", "10.1.2.3")).remote == "10.1.2.3"


def test_headers_from_an_untrusted_peer_are_ignored() -> None:
    got = view("198.51.100.7", xff("1.2.3.4", proto="https", host="evil.example"))
    assert got == proxy.View("198.51.100.7", "http", "127.0.0.1:8000")


def test_scheme_and_host_come_from_the_proxy_that_met_the_client() -> None:
    got = view("127.0.0.1", xff("198.51.100.7", proto="HTTPS", host=f"{SITE}:8443"))
    assert got == proxy.View("198.51.100.7", "https", f"{SITE}:8443")
    # Values that are no scheme or no host are not taken.
    got = view("127.0.0.1", xff("198.51.100.7", proto="gopher", host="a b/c"))
    assert got == proxy.View("198.51.100.7", "http", "127.0.0.1:8000")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("192.0.2.43", "192.0.2.43"),
        ("192.0.2.43:4711", "192.0.2.43"),
        ('"[2001:db8:cafe::17]:4711"', "2001:db8:cafe::17"),
        ("2001:db8::1", "2001:db8::1"),
        ("::ffff:192.0.2.1", "192.0.2.1"),
        ("unknown", None),
        ("_gazonk", None),
        ("", None),
    ],
)
def test_addresses_in_headers(text: str, expected: str | None) -> None:
    ip = proxy.parse_address(text)
    assert (str(ip) if ip else None) == expected


def test_bad_trusted_proxies_are_refused(make_settings) -> None:
    with pytest.raises(ConfigError, match="trusted_proxies"):
        make_settings(trusted_proxies=("10.0.0.0/33",))
    assert make_settings(trusted_proxies="127.0.0.1, ::1").trusted_proxies == ("127.0.0.1", "::1")


def test_trusted_proxies_are_not_counted_against_the_connection_cap() -> None:
    limiter = ConnectionLimiter(1, TRUSTED)
    assert limiter.key_of("127.0.0.1") is None
    assert all(limiter.acquire(limiter.key_of("10.1.2.3")) for _ in range(5))
    key = limiter.key_of("198.51.100.7")
    assert limiter.acquire(key) and not limiter.acquire(key)


# -- through the application (the test client connects from 127.0.0.1) ------------------------


@pytest.fixture
def behind_proxy(make_settings):
    return make_settings(trusted_proxies=("127.0.0.1",))


def set_cookies(resp) -> dict[str, str]:
    return {SimpleCookie(h).popitem()[0]: h for h in resp.headers.getall("Set-Cookie", [])}


async def failed_sign_in(client, headers: dict[str, str]) -> int:
    token = await csrf_of(client)
    resp = await client.post(
        "/login",
        data={"identifier": "13900000001", "password": "wrong", "csrf_token": token},
        headers=headers,
        allow_redirects=False,
    )
    return resp.status


async def address_keys(client) -> set[str]:
    rows = await client.app[keys.DB].query("SELECT key FROM login_throttle WHERE key LIKE 'a:%'")
    return {row["key"] for row in rows}


async def test_the_throttle_and_sessions_see_the_forwarded_client(aiohttp_client, behind_proxy, make_user):
    make_user("patient", "13900000001")
    client = await aiohttp_client(create_app(behind_proxy))
    forged = {"X-Forwarded-For": "203.0.113.9, 198.51.100.7"}
    assert await failed_sign_in(client, forged) == 401
    assert await address_keys(client) == {"a:198.51.100.7"}
    token = await csrf_of(client)
    resp = await client.post(
        "/login",
        data={"identifier": "13900000001", "password": "correct horse", "csrf_token": token},
        headers={"X-Forwarded-For": "198.51.100.8"},
        allow_redirects=False,
    )
    assert resp.status == 303
    rows = await client.app[keys.DB].query("SELECT remote FROM sessions")
    assert [row["remote"] for row in rows] == ["198.51.100.8"]


async def test_without_trusted_proxies_the_headers_are_ignored(aiohttp_client, settings, make_user):
    make_user("patient", "13900000001")
    client = await aiohttp_client(create_app(settings))
    assert await failed_sign_in(client, {"X-Forwarded-For": "198.51.100.7", **VIA_HTTPS}) == 401
    assert await address_keys(client) == {"a:127.0.0.1"}
    client.session.cookie_jar.clear()
    resp = await client.get("/login", headers={"Forwarded": "for=198.51.100.7;proto=https", **VIA_HTTPS})
    assert "consult_csrf" in set_cookies(resp)
    assert "Strict-Transport-Security" not in resp.headers


async def test_https_at_the_proxy_gives_host_cookies_and_hsts(aiohttp_client, behind_proxy):
    client = await aiohttp_client(create_app(behind_proxy))
    resp = await client.get("/login", headers=VIA_HTTPS)
    header = set_cookies(resp)["__Host-consult_csrf"]
    assert "secure" in header.lower()
    assert resp.headers["Strict-Transport-Security"].startswith("max-age=")
    # Also on a response no handler made (a redirect raised before any view): HSTS is there.
    resp = await client.get("/patient", headers=VIA_HTTPS, allow_redirects=False)
    assert resp.status == 303 and "Strict-Transport-Security" in resp.headers
    # Plain HTTP at the proxy: plain names, no HSTS.
    resp = await client.get("/login", headers={"X-Forwarded-Proto": "http"})
    assert "consult_csrf" in set_cookies(resp)
    assert "Strict-Transport-Security" not in resp.headers


async def test_forwarded_wins_over_x_forwarded(aiohttp_client, behind_proxy, make_user):
    make_user("patient", "13900000001")
    client = await aiohttp_client(create_app(behind_proxy))
    chain = 'for=203.0.113.9, for="198.51.100.7:5555"'
    headers = {"Forwarded": chain, "X-Forwarded-For": "198.51.100.99"}
    assert await failed_sign_in(client, headers) == 401
    assert await address_keys(client) == {"a:198.51.100.7"}
    headers = {"Forwarded": f"{chain};proto=https;host={SITE}", "X-Forwarded-Proto": "http"}
    client.session.cookie_jar.clear()
    resp = await client.get("/login", headers=headers)
    assert "__Host-consult_csrf" in set_cookies(resp)


async def test_the_csrf_origin_check_uses_the_forwarded_host(aiohttp_client, behind_proxy, settings):
    """A wrong token either way: which of the two refusals comes back shows whether the
    Origin was taken as our own."""
    for app_settings, origin_ok in ((behind_proxy, True), (settings, False)):
        client = await aiohttp_client(create_app(app_settings))
        resp = await client.post(
            "/login",
            data={"identifier": "x", "password": "y", "csrf_token": "bad"},
            headers={"Origin": f"https://{SITE}", **VIA_HTTPS},
        )
        assert resp.status == 403
        refused_as_foreign = "came from another site" in await resp.text()
        assert refused_as_foreign is not origin_ok


async def test_the_signaling_origin_check_uses_the_forwarded_origin(aiohttp_client, behind_proxy, settings):
    headers = {"Origin": f"https://{SITE}", **VIA_HTTPS}
    client = await aiohttp_client(create_app(behind_proxy))
    ws = await client.ws_connect("/ws/rooms/no-such-room", headers=headers)
    await ws.close()
    client = await aiohttp_client(create_app(settings))
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect("/ws/rooms/no-such-room", headers=headers)
    assert refused.value.status == 403


async def test_the_access_log_names_the_forwarded_client(aiohttp_client, behind_proxy, caplog):
    server = TestServer(create_app(behind_proxy))
    await server.start_server(access_log_class=RedactingAccessLogger)
    client = await aiohttp_client(server)
    with caplog.at_level(logging.INFO, logger="aiohttp.access"):
        await client.get("/healthz", headers={"X-Forwarded-For": "203.0.113.9, 198.51.100.7"})
    lines = [r.getMessage() for r in caplog.records if r.name == "aiohttp.access"]
    assert lines and lines[-1].startswith("198.51.100.7 "), lines
