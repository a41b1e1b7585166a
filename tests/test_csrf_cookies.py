"""CSRF tokens bound to the session and renewed at sign-in and sign-out; __Host- cookies over TLS;
no versions in the Server header."""

from __future__ import annotations

import re
from http.cookies import SimpleCookie

from consult.app import create_app
from tests.conftest import csrf_of, login


def set_cookies(resp) -> dict[str, str]:
    """Every Set-Cookie of a response, by name, as its raw header (attributes included)."""
    out = {}
    for header in resp.headers.getall("Set-Cookie", []):
        name = header.split("=", 1)[0]
        out[name] = header
    return out


async def test_a_token_from_before_sign_in_is_refused_after_it(client, make_user):
    make_user("patient", "13900000001")
    before = await csrf_of(client, "/login")
    old_cookie = client.session.cookie_jar.filter_cookies(client.make_url("/"))["consult_csrf"].value
    resp = await login(client, "13900000001")
    # Sign-in hands out a fresh CSRF cookie.
    new_cookie = SimpleCookie(set_cookies(resp)["consult_csrf"])["consult_csrf"].value
    assert new_cookie and new_cookie != old_cookie
    # The token of the sign-in page is worthless now; the signed-in page's token works.
    resp = await client.post("/lang", data={"locale": "en", "csrf_token": before}, allow_redirects=False)
    assert resp.status == 403
    after = await csrf_of(client, "/account")
    assert after != before
    resp = await client.post("/lang", data={"locale": "en", "csrf_token": after}, allow_redirects=False)
    assert resp.status == 303


async def test_a_token_is_bound_to_its_session(client, make_user):
    """The same CSRF cookie and token, replayed with another session, are refused."""
    make_user("patient", "13900000001")
    make_user("patient", "13900000002")

    def cookie(name: str) -> str:
        return client.session.cookie_jar.filter_cookies(client.make_url("/"))[name].value

    await login(client, "13900000001")
    token, csrf, alice = await csrf_of(client, "/account"), cookie("consult_csrf"), cookie("consult_session")
    await login(client, "13900000002", expect=303)
    bob = cookie("consult_session")
    client.session.cookie_jar.clear()

    async def post(session: str) -> int:
        resp = await client.post(
            "/lang",
            data={"locale": "en", "csrf_token": token},
            headers={"Cookie": f"consult_session={session}; consult_csrf={csrf}"},
            allow_redirects=False,
        )
        return resp.status

    assert await post(bob) == 403  # Bob's session, Alice's CSRF cookie and token
    assert await post(alice) == 303


async def test_sign_out_renews_the_csrf_cookie_and_old_tokens_die(client, make_user):
    make_user("patient", "13900000001")
    await login(client, "13900000001")
    token = await csrf_of(client, "/account")
    resp = await client.post("/logout", data={"csrf_token": token}, allow_redirects=False)
    assert resp.status == 303
    cookies = set_cookies(resp)
    assert "consult_csrf" in cookies and "consult_session" in cookies  # renewed / expired
    resp = await client.post("/lang", data={"locale": "en", "csrf_token": token}, allow_redirects=False)
    assert resp.status == 403
    # The sign-in page works at once with the new cookie.
    await login(client, "13900000001")


async def test_a_fresh_password_page_carries_a_token_of_the_new_session(client, make_user):
    make_user("patient", "13900000001")
    await login(client, "13900000001")
    token = await csrf_of(client, "/account")
    resp = await client.post(
        "/account/password",
        data={
            "current": "correct horse",
            "new": "another horse",
            "new2": "another horse",
            "csrf_token": token,
        },
    )
    assert resp.status == 200
    fresh = re.search(r'name="csrf_token" value="([0-9a-f]+)"', await resp.text()).group(1)
    resp = await client.post("/lang", data={"locale": "en", "csrf_token": fresh}, allow_redirects=False)
    assert resp.status == 303


async def test_over_tls_cookies_carry_the_host_prefix(aiohttp_client, make_settings, make_user):
    make_user("patient", "13900000001")
    client = await aiohttp_client(create_app(make_settings(tls=True)))
    page = await client.get("/login")
    csrf_header = set_cookies(page)["__Host-consult_csrf"]
    csrf_value = SimpleCookie(csrf_header)["__Host-consult_csrf"].value
    token = re.search(r'name="csrf_token" value="([0-9a-f]+)"', await page.text()).group(1)
    # The test client speaks plain HTTP and would not send Secure cookies: send them by hand.
    client.session.cookie_jar.clear()
    resp = await client.post(
        "/login",
        data={"identifier": "13900000001", "password": "correct horse", "csrf_token": token},
        headers={"Cookie": f"__Host-consult_csrf={csrf_value}"},
        allow_redirects=False,
    )
    assert resp.status == 303, await resp.text()
    cookies = set_cookies(resp)
    for name in ("__Host-consult_session", "__Host-consult_csrf"):
        header = cookies[name]
        attrs = [a.strip().lower() for a in header.split(";")[1:]]
        assert "secure" in attrs and "path=/" in attrs, header
        assert not any(a.startswith("domain") for a in attrs), header
    assert "consult_session" not in cookies
    session = SimpleCookie(cookies["__Host-consult_session"])["__Host-consult_session"].value
    home = await client.get("/patient", headers={"Cookie": f"__Host-consult_session={session}"})
    assert home.status == 200
    # A plain-named cookie (planted by a plain-HTTP page or a subdomain) is not a session.
    client.session.cookie_jar.clear()
    home = await client.get(
        "/patient", headers={"Cookie": f"consult_session={session}"}, allow_redirects=False
    )
    assert home.status == 303


async def test_without_tls_cookies_keep_their_plain_names(client):
    resp = await client.get("/login")
    assert "consult_csrf" in set_cookies(resp)


async def test_no_versions_in_the_server_header(client):
    for path in ("/login", "/no-such-page", "/static/app.css", "/healthz"):
        resp = await client.get(path)
        assert resp.headers.get("Server") == "Consult", (path, resp.headers.get("Server"))
