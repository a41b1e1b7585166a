"""Consult behind a real nginx, configured with the site block of docs/install.md.

Inside the test namespace: Consult on 127.0.0.1 with trusted_proxies = 127.0.0.1, nginx with
TLS (a development certificate) on https://10.99.0.1:<port>. Clients reach nginx from two
addresses, 10.99.0.1 and 127.0.0.2 (a source address picked on the loopback interface), so that
the database can show which client each request was counted for.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
from http.cookies import SimpleCookie

import aiohttp
import pytest
from playwright.async_api import Page

from tests.call_helpers import seed_visit
from tests.db_helpers import read
from tests.harness.browser import PageRecorder, assert_only_local_requests
from tests.harness.server import BRIDGE_ADDR, ConsultServer
from tests.test_browser_call import TEST_TIMEOUT, connect_both, prepare_call, state

pytestmark = pytest.mark.netns

OTHER_CLIENT = "127.0.0.2"
PASSWORD = "Proxy-test-pass-2024"
CSRF_RE = re.compile(r'name="csrf_token" value="([0-9a-f]+)"')
ENV = {
    "CONSULT_TRUSTED_PROXIES": "127.0.0.1",
    "CONSULT_DEFAULT_LOCALE": "en",
    # 100 sign-in failures below: each one checks a password.
    "CONSULT_ARGON2_TIME_COST": "1",
    "CONSULT_ARGON2_MEMORY_KIB": "1024",
}
# What a client may write itself; nginx must not let any of it through as the truth.
FORGED = {
    "X-Forwarded-For": "203.0.113.9",
    "Forwarded": "for=203.0.113.10;proto=https",
    "X-Forwarded-Host": "evil.example",
}


@pytest.fixture
def chromium_extra_args() -> list[str]:
    return ["--ignore-certificate-errors"]  # nginx's development certificate


async def behind_nginx(consult_server_factory, nginx_proxy):
    server = await consult_server_factory(env=ENV, host="127.0.0.1")
    return server, await nginx_proxy(server)


def client(source: str) -> aiohttp.ClientSession:
    """An HTTPS client connecting from `source`; keeps cookies set for an IP address."""
    connector = aiohttp.TCPConnector(ssl=False, local_addr=(source, 0), force_close=True)
    return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.CookieJar(unsafe=True))


async def csrf(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(url, headers=FORGED) as resp:
        assert resp.status == 200, resp.status
        return CSRF_RE.search(await resp.text()).group(1)


async def sign_in(session, origin: str, identifier: str, password: str, token: str) -> aiohttp.ClientResponse:
    async with session.post(
        origin + "/login",
        data={"identifier": identifier, "password": password, "csrf_token": token},
        headers=FORGED,
        allow_redirects=False,
    ) as resp:
        await resp.read()
        return resp


def query(server: ConsultServer, sql: str, *args) -> list[tuple]:
    return read(server, lambda d: [tuple(r) for r in d.execute(sql, list(args)).fetchall()])


def address_keys(server: ConsultServer) -> set[str]:
    return {k for (k,) in query(server, "SELECT key FROM login_throttle WHERE key LIKE 'a:%'")}


def demo_patient(server: ConsultServer) -> tuple[int, str]:
    """The first patient (the one seed_visit picks), with a known password."""
    patient_id, phone = query(server, "SELECT id, phone FROM users WHERE role = 'patient' ORDER BY id")[0]
    server.cli("user", "passwd", phone, "--password", PASSWORD)
    return patient_id, phone


def noisy_png(side: int = 1200) -> bytes:
    """About 4 MB that does not compress: more than nginx's default 1 MB body limit."""
    from PIL import Image

    buf = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(buf, "PNG")
    return buf.getvalue()


def cookie_headers(resp: aiohttp.ClientResponse) -> dict[str, str]:
    return {SimpleCookie(h).popitem()[0]: h.lower() for h in resp.headers.getall("Set-Cookie", [])}


async def test_sign_in_and_upload_through_nginx_see_the_client(consult_server_factory, nginx_proxy) -> None:
    server, proxy = await behind_nginx(consult_server_factory, nginx_proxy)
    patient_id, phone = await asyncio.to_thread(demo_patient, server)
    visit = await asyncio.to_thread(seed_visit, server, patient_id=patient_id, starts_in_s=3600)
    png = await asyncio.to_thread(noisy_png)
    async with client(BRIDGE_ADDR) as browser:
        # HTTPS at nginx: __Host- cookies, Secure, and HSTS, although Consult itself is plain HTTP.
        async with browser.get(proxy.url("/login"), headers=FORGED) as resp:
            assert resp.status == 200
            assert resp.headers["Strict-Transport-Security"].startswith("max-age=")
            csrf_cookie = cookie_headers(resp)["__Host-consult_csrf"]
            assert "secure" in csrf_cookie and "path=/" in csrf_cookie and "domain" not in csrf_cookie
            token = CSRF_RE.search(await resp.text()).group(1)
        # A wrong password, with forged forwarding headers: counted for the real client.
        assert (await sign_in(browser, proxy.origin, phone, "wrong", token)).status == 401
        assert address_keys(server) == {f"a:{BRIDGE_ADDR}"}
        resp = await sign_in(browser, proxy.origin, phone, PASSWORD, token)
        assert resp.status == 303, resp.status
        assert "secure" in cookie_headers(resp)["__Host-consult_session"]
        assert query(server, "SELECT remote FROM sessions") == [(BRIDGE_ADDR,)]
        # An upload of several MB through nginx (client_max_body_size), audited with the
        # client's address. Cross-origin check: the browser's Origin against nginx's host.
        token = await csrf(browser, proxy.url("/account"))
        form = aiohttp.FormData()
        form.add_field("file", io.BytesIO(png), filename="scan.png", content_type="image/png")
        async with browser.post(
            proxy.url(f"/api/visits/{visit.public_id}/reports"),
            data=form,
            headers={"X-CSRF-Token": token, "Origin": proxy.origin, **FORGED},
        ) as resp:
            assert resp.status == 201, await resp.text()
        rows = query(server, "SELECT remote, detail FROM audit_log WHERE action = 'report.upload'")
        assert [r[0] for r in rows] == [BRIDGE_ADDR], rows
        size = query(server, "SELECT size FROM reports")[0][0]
        assert size > 2 * 1024 * 1024, size
        # The same request from another site is refused by the origin check.
        async with browser.post(
            proxy.url(f"/api/visits/{visit.public_id}/reports"),
            data=b"x",
            headers={"X-CSRF-Token": token, "Origin": "https://evil.example", "Content-Type": "text/plain"},
        ) as resp:
            assert resp.status == 403 and (await resp.json())["error"] == "bad_origin"
    # Straight to Consult from an address that is not a trusted proxy: the headers are ignored.
    async with client(OTHER_CLIENT) as direct:
        token = await csrf(direct, server.url("/login"))
        assert (await sign_in(direct, server.origin, phone, "wrong", token)).status == 401
        async with direct.get(server.url("/login"), headers={"X-Forwarded-Proto": "https"}) as resp:
            assert "Strict-Transport-Security" not in resp.headers
    assert address_keys(server) == {f"a:{BRIDGE_ADDR}", f"a:{OTHER_CLIENT}"}
    assert "203.0.113" not in json.dumps(query(server, "SELECT * FROM login_throttle"))


async def test_failures_from_one_address_behind_nginx_hold_back_no_one_else(
    consult_server_factory, nginx_proxy
) -> None:
    """100 failed sign-ins from one client of the proxy; another client of the same proxy, and a
    user without failures on the first one, still sign in at once."""
    server, proxy = await behind_nginx(consult_server_factory, nginx_proxy)
    _patient_id, phone = await asyncio.to_thread(demo_patient, server)
    async with client(OTHER_CLIENT) as attacker, client(BRIDGE_ADDR) as neighbour:
        token = await csrf(attacker, proxy.url("/login"))
        for i in range(100):
            resp = await sign_in(attacker, proxy.origin, f"nobody{i}", "guess", token)
            assert resp.status == 401, (i, resp.status)
        # That address is now slowed on made-up names ...
        resp = await sign_in(attacker, proxy.origin, "nobody-else", "guess", token)
        assert resp.status == 429 and int(resp.headers["Retry-After"]) >= 1
        # ... another client of the same nginx is not ...
        other = await csrf(neighbour, proxy.url("/login"))
        assert (await sign_in(neighbour, proxy.origin, "someone-new", "guess", other)).status == 401
        assert (await sign_in(neighbour, proxy.origin, phone, PASSWORD, other)).status == 303
    # ... and an account without failures signs in even from the busy address.
    async with client(OTHER_CLIENT) as patient:
        token = await csrf(patient, proxy.url("/login"))
        assert (await sign_in(patient, proxy.origin, phone, PASSWORD, token)).status == 303
    counts = dict(query(server, "SELECT key, failures FROM login_throttle WHERE key LIKE 'a:%'"))
    assert counts[f"a:{OTHER_CLIENT}"] >= 100 and counts[f"a:{BRIDGE_ADDR}"] <= 2, counts
    assert "a:127.0.0.1" not in counts


async def test_a_call_through_nginx(
    consult_server_factory,
    nginx_proxy,
    patient_page: Page,
    doctor_page: Page,
    pages: PageRecorder,
) -> None:
    """Both pages and the signaling WebSocket through nginx (wss://, Origin checked against the
    forwarded host); media goes browser to browser as always."""
    async with asyncio.timeout(TEST_TIMEOUT):
        server, proxy = await behind_nginx(consult_server_factory, nginx_proxy)
        call = await asyncio.to_thread(prepare_call, server, origin=proxy.origin)
        await connect_both(call, patient_page, doctor_page, proxy.origin)
        await state(patient_page, "in_call")
        await state(doctor_page, "in_call")
        sockets = [u for log in pages.logs for u in log.requests if u.startswith("wss://")]
        assert sockets and all(u.startswith(f"wss://{BRIDGE_ADDR}:{proxy.port}/ws/") for u in sockets), (
            sockets
        )
        assert_only_local_requests(pages, proxy.origin)
        cookies = {c["name"]: c for c in await doctor_page.context.cookies()}
        assert cookies["__Host-consult_session"]["secure"], cookies
        # The room saw the browsers' address, not nginx's.
        joined = query(
            server,
            "SELECT role, data FROM session_events WHERE visit_id = ? AND name = 'joined'",
            call.visit.id,
        )
        remotes = {role: json.loads(data).get("remote") for role, data in joined}
        assert remotes == {"host": BRIDGE_ADDR, "guest": BRIDGE_ADDR}, joined
