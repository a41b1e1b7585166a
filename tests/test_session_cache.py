"""Sessions kept in memory (``session_cache_seconds``): whatever ends a session on this node ends
it at once, even while it is kept; what another node does is seen within the setting's bound."""

from __future__ import annotations

import asyncio
import time

from consult.app import create_app
from consult.core import keys
from tests.conftest import csrf_of, login

KEEP_LONG = 60.0  # longer than any test: a refusal below can only come from the drop itself


def cookies_of(client) -> dict[str, str]:
    return {c.key: c.value for c in client.session.cookie_jar}


def become(client, cookies: dict[str, str]) -> None:
    """Switch the test client to another device's cookies."""
    client.session.cookie_jar.clear()
    client.session.cookie_jar.update_cookies(cookies)


async def signed_in_device(client, identifier: str, home: str) -> dict[str, str]:
    """Sign in, open the home page (the session is now kept), return the device's cookies."""
    client.session.cookie_jar.clear()
    await login(client, identifier)
    assert (await client.get(home, allow_redirects=False)).status == 200
    return cookies_of(client)


async def status_of(client, path: str) -> int:
    return (await client.get(path, allow_redirects=False)).status


async def test_sessions_are_kept_and_a_kept_one_ends_at_once_on_sign_out(
    aiohttp_client, make_settings, make_user
):
    make_user("patient", "13900000001")
    client = await aiohttp_client(create_app(make_settings(session_cache_seconds=KEEP_LONG)))
    device = await signed_in_device(client, "13900000001", "/patient")
    sessions = client.app[keys.SESSIONS]
    assert len(sessions._kept) == 1
    token = await csrf_of(client, "/patient")
    resp = await client.post("/logout", data={"csrf_token": token}, allow_redirects=False)
    assert resp.status == 303
    assert sessions._kept == {}
    become(client, device)
    assert await status_of(client, "/patient") == 303
    assert (await client.app[keys.DB].query_one("SELECT count(*) AS n FROM sessions"))["n"] == 0


async def test_password_change_on_another_device_ends_a_kept_session_at_once(
    aiohttp_client, make_settings, make_user
):
    make_user("patient", "13900000001")
    client = await aiohttp_client(create_app(make_settings(session_cache_seconds=KEEP_LONG)))
    phone = await signed_in_device(client, "13900000001", "/patient")
    await signed_in_device(client, "13900000001", "/patient")  # the second device
    token = await csrf_of(client, "/account")
    form = {"current": "correct horse", "new": "a new long password", "new2": "a new long password"}
    resp = await client.post("/account/password", data={**form, "csrf_token": token})
    assert resp.status == 200
    assert await status_of(client, "/patient") == 200  # this device got a fresh session
    become(client, phone)
    assert await status_of(client, "/patient") == 303


async def test_deactivation_and_admin_reset_end_kept_sessions_at_once(
    aiohttp_client, make_settings, make_user
):
    doctor_id = make_user("doctor", "dr.k")
    other_id = make_user("doctor", "dr.l")
    make_user("admin", "boss")
    client = await aiohttp_client(create_app(make_settings(session_cache_seconds=KEEP_LONG)))
    doctor = await signed_in_device(client, "dr.k", "/doctor")
    other = await signed_in_device(client, "dr.l", "/doctor")
    await signed_in_device(client, "boss", "/admin")
    token = await csrf_of(client, "/admin/users")
    resp = await client.post(f"/admin/users/{doctor_id}/active", data={"active": "0", "csrf_token": token})
    assert resp.status == 200  # back on the users page
    resp = await client.post(f"/admin/users/{other_id}/reset-password", data={"csrf_token": token})
    assert resp.status == 200
    admin = cookies_of(client)
    become(client, doctor)
    assert await status_of(client, "/doctor") == 303
    become(client, other)
    assert await status_of(client, "/doctor") == 303
    become(client, admin)
    assert await status_of(client, "/admin") == 200  # the admin's own session is untouched


async def test_a_session_ended_elsewhere_is_refused_within_the_bound(
    aiohttp_client, make_settings, make_user
):
    """Another node (or the CLI) deletes the row: this node refuses the session within
    ``session_cache_seconds``; at 0 at once."""
    make_user("patient", "13900000001")
    for bound in (0.0, 0.5):
        client = await aiohttp_client(create_app(make_settings(session_cache_seconds=bound)))
        await signed_in_device(client, "13900000001", "/patient")
        db = client.app[keys.DB]
        await db.execute_write_fn(lambda d: d.execute("DELETE FROM sessions"))
        ended = time.monotonic()
        while await status_of(client, "/patient") == 200:
            assert time.monotonic() - ended < bound + 0.5, f"still served {bound} s after it ended elsewhere"
            await asyncio.sleep(0.05)
        if bound == 0:
            assert time.monotonic() - ended < 0.5


async def test_a_kept_session_still_expires_when_idle(aiohttp_client, make_settings, make_user):
    make_user("patient", "13900000001")
    client = await aiohttp_client(create_app(make_settings(session_cache_seconds=KEEP_LONG)))
    await signed_in_device(client, "13900000001", "/patient")
    sessions = client.app[keys.SESSIONS]
    sessions.idle_s = 0.3  # the setting is in minutes; the rule is the same at any length
    deadline = time.monotonic() + 20
    while await status_of(client, "/patient") == 200:
        assert time.monotonic() < deadline, "a kept session outlived its idle limit"
        await asyncio.sleep(0.1)
    assert (await client.app[keys.DB].query_one("SELECT count(*) AS n FROM sessions"))["n"] == 0
    assert sessions._kept == {}
