from __future__ import annotations

import time

import pytest

from consult.app import create_app
from consult.core import keys
from tests.account_helpers import enter_code, last_code, start_registration
from tests.conftest import csrf_of, login


async def test_register_then_land_on_patient_home(client):
    """Registration is confirmed by a code texted to the number (read here from the outbox): no
    account, and no session, until it comes back."""
    resp = await start_registration(client, "139 0000 0002")
    assert "consult_session" not in resp.cookies
    assert await client.app[keys.DB].query_one("SELECT id FROM users WHERE phone = '13900000002'") is None
    assert (await client.get("/patient", allow_redirects=False)).status == 303
    page = await client.get("/register/verify")
    assert "139 0000 0002" in await page.text()
    resp = await enter_code(client, await last_code(client.app, "13900000002"))
    assert resp.headers["Location"] == "/patient"
    cookie = resp.cookies["consult_session"]
    assert cookie["httponly"] and cookie["samesite"] == "Lax"
    home = await client.get("/patient")
    assert home.status == 200
    assert "李雷" in await home.text()


async def test_register_refuses_weak_password_and_duplicates(client, make_user):
    make_user("patient", "13900000003")
    token = await csrf_of(client, "/register")
    base = {"name": "A", "password": "12345678", "password2": "12345678", "csrf_token": token}
    resp = await client.post("/register", data={**base, "phone": "13900000004"})
    assert resp.status == 400
    assert "too easy" in await resp.text()
    strong = {**base, "password": "long enough pw", "password2": "long enough pw"}
    resp = await client.post("/register", data={**strong, "phone": "13900000003"})
    assert resp.status == 409
    assert "already exists" in await resp.text()
    resp = await client.post("/register", data={**strong, "phone": "not a phone"})
    assert resp.status == 400


@pytest.mark.parametrize(
    ("role", "login_name", "home"),
    [
        ("patient", "13900000001", "/patient"),
        ("doctor", "dr.x", "/doctor"),
        ("admin", "boss", "/admin"),
    ],
)
async def test_each_role_lands_on_its_home(client, make_user, role, login_name, home):
    make_user(role, login_name)
    resp = await login(client, login_name)
    assert resp.headers["Location"] == home
    page = await client.get(home)
    assert page.status == 200


@pytest.mark.parametrize("path", ["/doctor", "/admin", "/admin/users", "/admin/outbox"])
async def test_patient_cannot_open_staff_pages(client, make_user, path):
    make_user("patient", "13900000001")
    await login(client, "13900000001")
    resp = await client.get(path)
    assert resp.status == 403
    assert "permission" in await resp.text()


async def test_anonymous_is_sent_to_login(client):
    resp = await client.get("/admin", allow_redirects=False)
    assert resp.status == 303
    assert resp.headers["Location"].startswith("/login?next=")


async def test_wrong_password_is_throttled_per_account(aiohttp_client, make_settings, make_user):
    client = await aiohttp_client(create_app(make_settings(login_max_failures=3)))
    make_user("doctor", "dr.y")
    for _ in range(3):
        await login(client, "dr.y", "wrong password", expect=401)
    resp = await login(client, "dr.y", "correct horse", expect=429)
    assert "Too many failed sign-in attempts" in await resp.text()
    assert int(resp.headers["Retry-After"]) > 0
    # Another account from the same address is still allowed.
    make_user("admin", "boss")
    await login(client, "boss")


async def test_wrong_password_is_throttled_per_address(aiohttp_client, make_settings):
    client = await aiohttp_client(create_app(make_settings(login_max_failures_per_address=4)))
    for i in range(4):
        await login(client, f"nobody{i}", "x", expect=401)
    await login(client, "nobody-else", "x", expect=429)


async def test_unknown_account_and_wrong_password_look_the_same(client, make_user):
    make_user("doctor", "dr.z")
    a = await login(client, "dr.z", "nope nope", expect=401)
    b = await login(client, "dr.nobody", "nope nope", expect=401)
    assert (await a.text()).count("wrong") == (await b.text()).count("wrong")


async def test_csrf_token_is_required(client, make_user):
    make_user("doctor", "dr.c")
    resp = await client.post("/login", data={"identifier": "dr.c", "password": "correct horse"})
    assert resp.status == 403
    assert "form expired" in await resp.text()
    resp = await client.post(
        "/login", data={"identifier": "dr.c", "password": "correct horse", "csrf_token": "0" * 64}
    )
    assert resp.status == 403


async def test_cross_origin_post_is_refused(client, make_user):
    make_user("doctor", "dr.o")
    token = await csrf_of(client)
    resp = await client.post(
        "/login",
        data={"identifier": "dr.o", "password": "correct horse", "csrf_token": token},
        headers={"Origin": "https://evil.example"},
    )
    assert resp.status == 403


async def test_logout_ends_the_session(client, make_user):
    make_user("doctor", "dr.l")
    await login(client, "dr.l")
    assert (await client.get("/doctor")).status == 200
    token = await csrf_of(client, "/doctor")
    resp = await client.post("/logout", data={"csrf_token": token}, allow_redirects=False)
    assert resp.status == 303
    client.session.cookie_jar.clear_domain("127.0.0.1")
    # Even a stolen copy of the old cookie no longer works: the server forgot the session.
    resp = await client.get("/doctor", allow_redirects=False)
    assert resp.status == 303


async def test_logout_everywhere(client, make_user):
    make_user("patient", "13900000009")
    await login(client, "13900000009")
    phone_cookie = client.session.cookie_jar.filter_cookies(client.make_url("/"))["consult_session"].value
    client.session.cookie_jar.clear()
    await login(client, "13900000009")  # a second device
    token = await csrf_of(client, "/account")
    await client.post("/logout-all", data={"csrf_token": token})
    assert (await client.get("/patient", allow_redirects=False)).status == 303
    client.session.cookie_jar.update_cookies({"consult_session": phone_cookie})
    assert (await client.get("/patient", allow_redirects=False)).status == 303


async def test_session_idle_and_absolute_expiry(client, make_user):
    make_user("doctor", "dr.e")
    await login(client, "dr.e")
    db = client.app[keys.DB]
    await db.execute_write_fn(lambda d: d.execute("UPDATE sessions SET last_seen = ?", [time.time() - 7200]))
    assert (await client.get("/doctor", allow_redirects=False)).status == 303
    assert (await db.query_one("SELECT count(*) AS n FROM sessions"))["n"] == 0

    await login(client, "dr.e")
    await db.execute_write_fn(
        lambda d: d.execute("UPDATE sessions SET created = ?", [time.time() - 13 * 3600])
    )
    assert (await client.get("/doctor", allow_redirects=False)).status == 303


async def test_admin_creates_doctor_and_resets_password(client, make_user):
    make_user("admin", "boss")
    await login(client, "boss")
    token = await csrf_of(client, "/admin/users")
    resp = await client.post(
        "/admin/users",
        data={
            "role": "doctor",
            "username": "Dr.New",
            "display_name": "New Doctor",
            "password": "initial pass 1",
            "csrf_token": token,
        },
        allow_redirects=False,
    )
    assert resp.status == 303
    row = await client.app[keys.DB].query_one("SELECT id, role FROM users WHERE username = 'dr.new'")
    assert row["role"] == "doctor"
    resp = await client.post(f"/admin/users/{row['id']}/reset-password", data={"csrf_token": token})
    text = await resp.text()
    assert resp.status == 200 and "shown once" in text
    audit_rows = await client.app[keys.DB].query("SELECT action FROM audit_log ORDER BY id")
    assert [r["action"] for r in audit_rows][-2:] == ["account.create", "account.reset_password"]


async def test_open_redirect_after_login_is_ignored(client, make_user):
    make_user("doctor", "dr.r")
    token = await csrf_of(client)
    resp = await client.post(
        "/login",
        data={
            "identifier": "dr.r",
            "password": "correct horse",
            "csrf_token": token,
            "next": "//evil.example/x",
        },
        allow_redirects=False,
    )
    assert resp.headers["Location"] == "/doctor"
