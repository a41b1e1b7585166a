"""The header's large-text switch (POST /text-size): a cookie that every page is written from,
so a large page is large from its first paint. The browser side: tests/test_browser_a11y.py."""

from __future__ import annotations

import re

from tests.conftest import csrf_of

HTML_TAG = re.compile(r"<html[^>]*>")


async def html_tag(client, path: str = "/login") -> str:
    return HTML_TAG.search(await (await client.get(path)).text()).group(0)


async def test_the_switch_sets_a_cookie_every_page_is_written_from(client):
    assert "text-large" not in await html_tag(client)
    token = await csrf_of(client, "/login")
    resp = await client.post(
        "/text-size", data={"size": "large", "next": "/register", "csrf_token": token}, allow_redirects=False
    )
    assert resp.status == 303 and resp.headers["Location"] == "/register"
    cookie = resp.headers["Set-Cookie"]
    assert cookie.startswith("consult_text=large;") and "HttpOnly" in cookie and "SameSite=Lax" in cookie
    for path in ("/", "/login", "/register", "/password/forgot"):
        assert 'class="text-large"' in await html_tag(client, path), path
    page = await (await client.get("/login")).text()
    assert 'data-testid="text-size"' in page and 'aria-pressed="true"' in page
    resp = await client.post(
        "/text-size", data={"size": "normal", "next": "/login", "csrf_token": token}, allow_redirects=False
    )
    assert resp.status == 303
    assert "text-large" not in await html_tag(client)


async def test_the_switch_needs_csrf_refuses_other_sizes_and_stays_on_the_site(client):
    resp = await client.post("/text-size", data={"size": "large"}, allow_redirects=False)
    assert resp.status == 403
    token = await csrf_of(client, "/login")
    resp = await client.post("/text-size", data={"size": "huge", "csrf_token": token}, allow_redirects=False)
    assert resp.status == 400
    assert "未知的字号" in await resp.text()
    resp = await client.post(
        "/text-size",
        data={"size": "large", "next": "https://evil.example/", "csrf_token": token},
        allow_redirects=False,
    )
    assert resp.status == 303 and resp.headers["Location"] == "/"
