"""A full disk and a lost database are clear errors, and /healthz says so.

The in-process tests here check /healthz and the error pipeline; ``test_full_disk_end_to_end``
runs the real server on a small tmpfs and fills it.
"""

from __future__ import annotations

import asyncio
import errno
import html
import os
import sqlite3
import subprocess
from pathlib import Path

import aiohttp
import pytest
from yarl import URL

from consult.accounts import users as accounts
from consult.accounts.passwords import Passwords
from consult.app import create_app
from consult.audit import chain as audit_chain
from consult.core import health
from consult.core.config import load_settings
from consult.core.db import Database
from consult.core.engine import open_database
from consult.core.migrations import migrate
from tests.booking_helpers import free_slots, make_clinic
from tests.conftest import FAST_ARGON2, csrf_of, login
from tests.harness.server import ConsultServer
from tests.test_reports import DOCTOR, PATIENT, build_world, pdf_bytes, upload

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


@pytest.mark.locale("en")  # asserts English texts
async def test_enospc_from_a_handler_is_507_and_never_claims_nothing_was_lost(client, monkeypatch):
    from consult.core import health as health_module

    async def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(health_module, "check", full)
    resp = await client.get("/healthz")  # not under /api/: the page
    assert resp.status == 507
    text = html.unescape(await resp.text())
    assert STORAGE_FULL_EN in text and "Nothing you entered was lost" not in text


# -- the real server on a full disk -----------------------------------------------------------

DISK_MB = 48


class _Tmpfs:
    """A tmpfs of ``size_mb`` at ``mountpoint``, for as long as this test process lives.

    A holder process mounts it and unmounts it when its stdin closes: on ``close()``, and also
    when the test process dies, so no mount outlives the test. (A private mount namespace,
    reached through /proc/<pid>/root, does not work: SQLite resolves that magic link to the
    host's path, where the database is not.)
    """

    def __init__(self, mountpoint: Path, size_mb: int) -> None:
        mountpoint.mkdir(parents=True, exist_ok=True)
        self.mountpoint = mountpoint
        self.proc = subprocess.Popen(
            [
                "sh", "-c",
                'mount -t tmpfs -o size="$2"m,mode=0700 tmpfs "$1" && echo ready && read _;'
                ' umount "$1" || umount -l "$1"',
                "sh", str(mountpoint), str(size_mb),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        assert self.proc.stdout is not None and self.proc.stderr is not None
        line = self.proc.stdout.readline()
        if line.strip() != b"ready":
            self.proc.kill()
            self.proc.wait()
            pytest.skip(f"cannot mount a tmpfs here: {self.proc.stderr.read()!r}")

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


def _fill(directory: Path) -> Path:
    """Write a file until the disk is full, to the last page; returns it."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as fh:
        for size in (1024 * 1024, 4096, 512, 1):
            block = b"\0" * size
            try:
                while fh.write(block):
                    pass
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    return filler


def _make_user_in(settings):
    passwords = Passwords(1, 1024)

    def make(role="patient", login=None, password="correct horse", name="Test Person"):
        db = open_database(settings)
        kwargs = {"phone": login or "13900000001"} if role == "patient" else {"username": login or role}
        try:
            return db.write_sync(
                lambda d: accounts.create_user_sync(
                    d, role=role, display_name=name, password_hash=passwords.hash(password), **kwargs
                )
            )
        finally:
            db.close()

    return make


def _session(server, locale: str) -> aiohttp.ClientSession:
    jar = aiohttp.CookieJar(unsafe=True)
    session = aiohttp.ClientSession(base_url=server.origin, cookie_jar=jar)
    if locale == "en":
        jar.update_cookies({"consult_lang": "en"}, URL(server.origin))
    return session


STORAGE_FULL = {"zh_CN": STORAGE_FULL_ZH, "en": STORAGE_FULL_EN}


async def _assert_507(resp, locale: str, *, json_body: bool) -> None:
    assert resp.status == 507, (resp.method, str(resp.url), resp.status, await resp.text())
    if json_body:
        assert resp.content_type == "application/json"
        body = await resp.json()
        assert body == {"error": "storage_full", "message": STORAGE_FULL[locale]}
    else:
        assert resp.content_type == "text/html"
        text = html.unescape(await resp.text())
        assert STORAGE_FULL[locale] in text
        assert f'<html lang="{"zh-CN" if locale == "zh_CN" else "en"}"' in text or locale in text
    assert "Nothing you entered was lost" not in await resp.text()


@pytest.mark.netns
@pytest.mark.sqlite_only("a full disk under the SQLite file")
async def test_full_disk_end_to_end(tmp_path):
    """The real server on a 48 MB tmpfs: fill it, every path answers 507 in the user's language,
    the database stays intact, and everything works again once space is freed."""
    disk = _Tmpfs(tmp_path / "disk", DISK_MB)
    server = None
    sessions: list[aiohttp.ClientSession] = []
    try:
        data = tmp_path / "disk" / "data"
        seen = data
        seen.mkdir()
        settings = load_settings(env={}, data_dir=seen, tls=False, **FAST_ARGON2)
        migrate(seen / "consult.db")
        make_user = _make_user_in(settings)
        world = build_world(None, settings, make_user)
        world.db.close()
        clinic = make_clinic(settings, make_user)
        slots = free_slots(settings, clinic.doctor_ids[0], 3600, count=4)
        env = {
            "CONSULT_DISK_MIN_FREE_MB": "1",
            "CONSULT_ARGON2_TIME_COST": "1",
            "CONSULT_ARGON2_MEMORY_KIB": "1024",
        }
        server = ConsultServer(data, log_dir=tmp_path, env=env)
        await server.astart()

        def new(locale):
            s = _session(server, locale)
            sessions.append(s)
            return s

        async def hold(session, slot):
            token = await csrf_of(session, f"/book/{clinic.department_id}")
            return await session.post(
                "/book/hold",
                data={
                    "doctor_id": str(clinic.doctor_ids[0]),
                    "department_id": str(clinic.department_id),
                    "starts_at": str(int(slot.starts_at)),
                    "csrf_token": token,
                },
                allow_redirects=False,
            )

        # Before: signed in as the patient and the doctor, in each language; one report uploaded.
        users = {}
        for locale in ("zh_CN", "en"):
            patient, doctor = new(locale), new(locale)
            await login(patient, PATIENT)
            await login(doctor, DOCTOR)
            users[locale] = (patient, doctor, await csrf_of(patient, "/"))
        patient, doctor, token = users["en"]
        resp = await upload(patient, world, token, pdf_bytes())
        assert resp.status == 201, await resp.text()
        report_id = (await resp.json())["report"]["id"]
        assert (await doctor.get(f"/reports/{report_id}")).status == 200

        # Fill: the WAL is emptied first so that any write must grow a file.
        with sqlite3.connect(seen / "consult.db") as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        filler = await asyncio.to_thread(_fill, seen)
        before = {"audit": None}
        with sqlite3.connect(f"file:{seen / 'consult.db'}?mode=ro", uri=True) as conn:
            before["audit"] = conn.execute("SELECT count(*) FROM audit_log").fetchone()[0]

        async with _session(server, "en") as probe:
            resp = await probe.get("/healthz")
            assert resp.status == 503
            body = await resp.json()
            assert body["disk"]["ok"] is False and body["writer"]["state"] == "up"

        for locale in ("zh_CN", "en"):
            patient, doctor, token = users[locale]
            stranger = new(locale)
            await _assert_507(await login(stranger, PATIENT, expect=507), locale, json_body=False)
            await _assert_507(await hold(patient, slots[0]), locale, json_body=False)
            resp = await upload(patient, world, token, pdf_bytes())
            await _assert_507(resp, locale, json_body=True)
            await _assert_507(await doctor.get(f"/reports/{report_id}"), locale, json_body=False)
            resp = await patient.get(f"/api/visits/{world.public_id}/reports")
            await _assert_507(resp, locale, json_body=True)

        # Nothing was shown unaudited, nothing half-written, no upload left behind.
        with sqlite3.connect(f"file:{seen / 'consult.db'}?mode=ro", uri=True) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            assert conn.execute("SELECT count(*) FROM audit_log").fetchone()[0] == before["audit"]
            assert conn.execute("SELECT count(*) FROM reports").fetchone()[0] == 1
        assert list((seen / "uploads" / "tmp").iterdir()) == []

        # Space freed: everything works again, without a restart.
        filler.unlink()
        async with _session(server, "en") as probe:
            assert (await probe.get("/healthz")).status == 200
        patient, doctor, token = users["en"]
        await login(new("en"), PATIENT)
        resp = await hold(patient, slots[1])
        assert resp.status == 303, await resp.text()
        resp = await upload(patient, world, token, pdf_bytes())
        assert resp.status == 201, await resp.text()
        assert (await doctor.get(f"/reports/{report_id}")).status == 200
        assert (await patient.get(f"/api/visits/{world.public_id}/reports")).status == 200
        await server.astop()
        server = None
        with sqlite3.connect(seen / "consult.db") as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            assert conn.execute("SELECT count(*) FROM reports").fetchone()[0] == 2
        ok, message = Database(seen / "consult.db").read_sync(audit_chain.verify)
        assert ok, message
    finally:
        for s in sessions:
            await s.close()
        if server is not None:
            server.stop()
        disk.close()
    assert not await asyncio.to_thread(os.path.ismount, tmp_path / "disk")
