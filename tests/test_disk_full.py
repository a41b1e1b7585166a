"""A full disk and a lost database are clear errors, and /healthz says so.

The in-process tests here check /healthz and the error pipeline; ``test_full_disk_end_to_end``
runs the real server on a small tmpfs and fills it.
"""

from __future__ import annotations

import asyncio
import errno
import html
import sqlite3

from consult.app import create_app
from consult.core import health
from consult.core.db import Database
from tests.conftest import login

STORAGE_FULL_EN = (
    "The hospital's server has run out of storage space. What you just did could not be"
    " completed and was not saved; please try again later or contact the hospital."
)
STORAGE_FULL_ZH = "医院服务器的存储空间已满。您刚才的操作未能完成，也没有被保存；请稍后重试或联系医院。"


async def test_healthz_reports_writer_reads_and_disk(client):
    resp = await client.get("/healthz")
    assert resp.status == 200
    body = await resp.json()
    assert body["ok"] is True
    assert body["writer"]["state"] == "up" and body["writer"]["ok"] is True
    assert body["reads"]["ok"] is True
    disk = body["disk"]
    assert disk["ok"] is True and disk["free_bytes"] > 0 and disk["total_bytes"] >= disk["free_bytes"]
    assert disk["min_free_bytes"] == 200 * 1024 * 1024  # the default setting


async def test_healthz_is_503_when_the_disk_is_nearly_full(aiohttp_client, make_settings):
    client = await aiohttp_client(create_app(make_settings(disk_min_free_mb=1e12)))  # 1 EB
    resp = await client.get("/healthz")
    assert resp.status == 503
    body = await resp.json()
    assert body["ok"] is False and body["disk"]["ok"] is False and body["writer"]["ok"] is True


async def test_health_is_503_when_the_writer_is_down(tmp_path):
    path = tmp_path / "c.db"
    path.mkdir()
    db = Database(path, retry_initial_s=0.01, retry_max_s=0.05)
    try:
        healthy, report = await asyncio.wait_for(health.check(db, tmp_path, 0), 5)
        assert not healthy
        assert report["writer"]["state"] == "down" and report["writer"]["failures"] >= 1
        assert report["disk"]["ok"] is True
    finally:
        db.close()


async def test_a_failing_session_lookup_is_an_error_page_not_a_bare_500(client, make_user, monkeypatch):
    """The session's last_seen write fails on a full disk: that error, in the user's language."""
    from consult.accounts.users import Sessions

    make_user("patient", login="13900000009")
    await login(client, "13900000009")

    async def full(self, token):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(Sessions, "lookup", full)
    resp = await client.get("/patient", headers={"Accept-Language": "zh-CN"})
    assert resp.status == 507
    assert resp.content_type == "text/html"
    assert STORAGE_FULL_ZH in await resp.text()
    resp = await client.get("/api/visits/x/reports", headers={"Accept-Language": "en"})
    assert resp.status == 507
    assert (await resp.json()) == {"error": "storage_full", "message": STORAGE_FULL_EN}


async def test_a_failing_csrf_cookie_does_not_escape(client, monkeypatch):
    from consult.core import security

    def broken(request, response):
        raise RuntimeError("cookie jar on fire")

    monkeypatch.setattr(security, "set_csrf_cookie", broken)
    resp = await client.get("/login")
    assert resp.status == 200


async def test_enospc_from_a_handler_is_507_and_never_claims_nothing_was_lost(client, monkeypatch):
    from consult.core import health as health_module

    async def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(health_module, "check", full)
    resp = await client.get("/healthz")  # not under /api/: the page
    assert resp.status == 507
    text = html.unescape(await resp.text())
    assert STORAGE_FULL_EN in text and "Nothing you entered was lost" not in text
