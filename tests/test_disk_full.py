"""A full disk and a lost database are clear errors, and /healthz says so.

The in-process tests here check /healthz and the error pipeline; ``test_full_disk_end_to_end``
runs the real server on a small tmpfs and fills it.
"""

from __future__ import annotations

import asyncio

from consult.app import create_app
from consult.core import health
from consult.core.db import Database


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
