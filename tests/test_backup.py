"""Backups: consistent under load, only referenced files, atomic, verifiable, restorable."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import sqlite3
import time
from pathlib import Path

import aiohttp
import pytest

from consult import booking
from consult.calls import links as calllinks
from consult.core.config import ensure_secrets
from consult.core.db import Database
from consult.core.engine import open_database
from consult.core.migrations import migrate
from consult.ops import backup as backups
from tests.booking_helpers import free_slots, make_clinic, write
from tests.harness.server import ConsultServer
from tests.test_cli import FAST, consult
from tests.test_reports import pdf_bytes

# `consult backup` / `restore` copy the SQLite file and the data dir; a PostgreSQL deployment is
# backed up with PostgreSQL's own tools.
pytestmark = pytest.mark.sqlite_only("backup and restore of the SQLite file")

PDF = b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\nstartxref\n0\n%%EOF\n"


# -- a data directory with reports and recordings, written straight to disk and database ------


def add_report(data_dir: Path, visit_id: int, owner_id: int, content: bytes) -> tuple[int, Path]:
    name = secrets.token_hex(32)
    path = data_dir / "uploads" / name[:2] / name
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.write_bytes(content)
    sha = hashlib.sha256(content).hexdigest()
    db = Database(data_dir / "consult.db")
    try:
        row = db.write_sync(
            lambda d: (
                d.execute(
                    "INSERT INTO reports (visit_id, owner_id, display_name, stored_name, content_type, size,"
                    " sha256, created) VALUES (?, ?, 'r.pdf', ?, 'application/pdf', ?, ?, ?)",
                    [visit_id, owner_id, f"{name[:2]}/{name}", len(content), sha, time.time()],
                ).lastrowid
            )
        )
    finally:
        db.close()
    return int(row), path


@pytest.fixture
def filled(settings, make_user):
    """A data dir with secrets, a key, 3 reports, a recording, an orphan and upload temp files."""
    data_dir = settings.data_dir
    migrate(data_dir / "consult.db")
    ensure_secrets(settings)
    from consult.clinical import signing

    signing.load_or_create(data_dir)
    patient = make_user("patient", "13900000001")
    doctor = make_user("doctor", "drwang")
    public_id = secrets.token_urlsafe(12)
    now = time.time()
    db = Database(data_dir / "consult.db")
    visit_id = db.write_sync(
        lambda d: (
            d.execute("INSERT INTO departments (code, name_zh, name_en) VALUES ('c', '心内科', 'Cardio')"),
            d.execute("INSERT INTO doctors (user_id, fee_minor) VALUES (?, 5000)", [doctor]),
            d.execute(
                "INSERT INTO visits (public_id, patient_id, doctor_id, department_id, starts_at, ends_at,"
                " status, hold_expires, fee_minor, currency, created, updated, call_nonce)"
                " VALUES (?, ?, ?, 1, ?, ?, 'confirmed', NULL, 5000, 'CNY', ?, ?, 'nonce')",
                [public_id, patient, doctor, now + 86400, now + 87300, now, now],
            ).lastrowid,
        )[-1]
    )
    rec_dir = data_dir / "recordings" / public_id
    rec_dir.mkdir(parents=True, mode=0o700)
    rec = rec_dir / "guest-20260101T000000Z-0123456789ab.webm"
    rec.write_bytes(b"\x1aE\xdf\xa3 webm" * 100)
    db.write_sync(
        lambda d: d.execute(
            "INSERT INTO recordings (visit_id, role, path, size, sha256, created, complete)"
            " VALUES (?, 'patient', ?, ?, ?, ?, 1)",
            [
                visit_id,
                f"recordings/{public_id}/{rec.name}",
                rec.stat().st_size,
                hashlib.sha256(rec.read_bytes()).hexdigest(),
                now,
            ],
        )
    )
    db.close()
    reports = [add_report(data_dir, visit_id, patient, PDF + bytes([i])) for i in range(3)]
    # What must never be in a backup: an upload in progress, a cleaned image, an orphan, a
    # recording still being written (no row yet).
    (data_dir / "uploads" / "tmp").mkdir(mode=0o700)
    (data_dir / "uploads" / "tmp" / "abc.part").write_bytes(b"half")
    (data_dir / "uploads" / "tmp" / "abc.clean").write_bytes(b"half")
    orphan = data_dir / "uploads" / "ff" / ("f" * 64)
    orphan.parent.mkdir(exist_ok=True)  # a report's random name may start with "ff" too
    orphan.write_bytes(b"orphan")
    (rec_dir / "host-20260101T000000Z-0123456789ab.webm").write_bytes(b"recording now")
    return {"data_dir": data_dir, "reports": reports, "recording": rec, "visit_id": visit_id}


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_backup_holds_exactly_the_referenced_files_and_a_manifest(filled, tmp_path):
    data_dir = filled["data_dir"]
    result = backups.backup(data_dir, tmp_path / "b")
    assert result.problems == [] and result.integrity == "ok"
    b = tmp_path / "b"
    expected = {
        "consult.db",
        "manifest.json",
        "secrets.json",
        "keys/prescription-ed25519.pem",
        "keys/prescription-ed25519.pub.pem",
        filled["recording"].relative_to(data_dir).as_posix(),
        *(p.relative_to(data_dir).as_posix() for _row, p in filled["reports"]),
    }
    assert files_under(b) == expected  # no .part, .clean, orphan or unfinished recording
    assert result.linked == 4 and result.copied == 0  # same file system: hard links
    manifest = json.loads((b / "manifest.json").read_text())
    listed = {e["path"]: e for e in manifest["files"]}
    assert set(listed) == expected - {"manifest.json"}
    for path, entry in listed.items():
        content = (b / path).read_bytes()
        assert entry["size"] == len(content) and entry["sha256"] == hashlib.sha256(content).hexdigest()
    assert manifest["database"]["integrity_check"] == "ok"
    assert manifest["database"]["audit_chain"]["ok"] is True
    assert manifest["consult_version"] and manifest["created"] <= time.time()
    assert (b / "secrets.json").stat().st_mode & 0o777 == 0o600
    assert not list(tmp_path.glob(".b.partial-*"))
    assert backups.verify(b).ok

    # Across file systems (or asked to): copies, same content.
    result = backups.backup(data_dir, tmp_path / "c", link=False)
    assert result.linked == 0 and result.copied == 4 and files_under(tmp_path / "c") == expected


def test_a_file_that_vanishes_mid_backup_is_reported_not_fatal(filled, tmp_path):
    data_dir = filled["data_dir"]
    row, victim = filled["reports"][1]

    def vanish(stage: str) -> None:
        if stage == "files":
            victim.unlink(missing_ok=True)  # gone from disk, but the database still lists it

    result = backups.backup(data_dir, tmp_path / "b", on_stage=vanish)
    assert (tmp_path / "b" / "manifest.json").exists()  # the backup completed
    assert len(result.problems) == 1 and f"report {row}" in result.problems[0]
    assert "missing from the data directory" in result.problems[0]
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert [m["row"] for m in manifest["missing"]] == [row]
    # The rest is there; verify names the missing file.
    assert (tmp_path / "b" / filled["reports"][0][1].relative_to(data_dir)).exists()
    checked = backups.verify(tmp_path / "b")
    assert len(checked.problems) == 1 and f"report {row}" in checked.problems[0]


def test_a_report_deleted_after_the_snapshot_retakes_it(filled, tmp_path):
    data_dir = filled["data_dir"]
    row, victim = filled["reports"][0]
    deleted = []

    def delete_report(stage: str) -> None:
        if stage == "files" and not deleted:  # what reports.delete_report does: row, then file
            write_db(data_dir, lambda d: d.execute("DELETE FROM reports WHERE id = ?", [row]))
            victim.unlink()
            deleted.append(row)

    result = backups.backup(data_dir, tmp_path / "b", on_stage=delete_report)
    assert result.problems == [] and result.snapshots == 2
    assert not (tmp_path / "b" / victim.relative_to(data_dir)).exists()
    assert backups.verify(tmp_path / "b").ok


def test_a_report_deleted_and_replaced_during_the_backup_is_not_mistaken_for_a_lost_file(filled, tmp_path):
    # Found under load, when report ids were reused: "does row 3 still exist?" was true for the
    # next upload's row 3 although the snapshot's row 3 was deleted. Ids are no longer reused
    # (migration 0010), and the backup matches a row by its id and its file name either way.
    data_dir = filled["data_dir"]
    row, victim = filled["reports"][-1]
    replaced = []

    def delete_and_upload(stage: str) -> None:
        if stage == "files" and not replaced:
            write_db(data_dir, lambda d: d.execute("DELETE FROM reports WHERE id = ?", [row]))
            victim.unlink()
            replaced.append(add_report(data_dir, filled["visit_id"], 1, PDF + b"new"))

    result = backups.backup(data_dir, tmp_path / "b", on_stage=delete_and_upload)
    new_row, new_path = replaced[0]
    assert new_row > row  # a new id, never the deleted one
    assert result.problems == [] and result.snapshots == 2
    assert (tmp_path / "b" / new_path.relative_to(data_dir)).read_bytes() == PDF + b"new"
    assert backups.verify(tmp_path / "b").ok


def write_db(data_dir: Path, fn) -> None:
    db = Database(data_dir / "consult.db")
    try:
        db.write_sync(fn)
    finally:
        db.close()


@pytest.mark.parametrize("stage", ["secrets", "database", "files", "manifest", "rename"])
def test_an_interrupted_backup_leaves_no_directory(filled, tmp_path, stage):
    class Killed(Exception):
        pass

    def die(name: str) -> None:
        if name == stage:
            raise Killed(name)

    with pytest.raises(Killed):
        backups.backup(filled["data_dir"], tmp_path / "b", on_stage=die)
    assert not (tmp_path / "b").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".b")] == []
    # The data directory is untouched and the next backup works.
    assert backups.backup(filled["data_dir"], tmp_path / "b").problems == []


def test_verify_finds_a_tampered_file_and_a_broken_audit_chain(filled, tmp_path):
    data_dir = filled["data_dir"]
    backups.backup(data_dir, tmp_path / "b", link=False)
    proc = consult(data_dir, "backup", "verify", str(tmp_path / "b"))
    assert proc.returncode == 0 and proc.stdout.startswith("  note: audit chain") and "OK:" in proc.stdout

    row, report = filled["reports"][2]
    relative = report.relative_to(data_dir).as_posix()
    with open(tmp_path / "b" / relative, "r+b") as fh:  # one flipped byte
        fh.seek(3)
        fh.write(b"X")
    conn = sqlite3.connect(tmp_path / "b" / "consult.db")
    conn.execute("UPDATE audit_log SET action = 'tampered' WHERE id = 1")
    conn.commit()
    conn.close()
    proc = consult(data_dir, "backup", "verify", str(tmp_path / "b"), check=False)
    assert proc.returncode == 1
    out = proc.stdout
    assert f"PROBLEM: report {row}: {relative} does not match its SHA-256" in out
    assert "PROBLEM: audit chain broken: row 1 was altered" in out
    assert "PROBLEM: manifest: consult.db does not match its SHA-256" in out
    assert "FAILED" in out and "Traceback" not in proc.stderr

    # A directory an interrupted old-style backup left: said plainly.
    (tmp_path / "half").mkdir()
    proc = consult(data_dir, "backup", "verify", str(tmp_path / "half"), check=False)
    assert (
        proc.returncode == 1
        and "no manifest.json" in proc.stdout
        and "secrets.json is missing" in proc.stdout
    )


def test_restore_verifies_refuses_to_overwrite_and_keeps_secrets_private(filled, tmp_path):
    data_dir = filled["data_dir"]
    backups.backup(data_dir, tmp_path / "b")
    new = tmp_path / "new"
    proc = consult(new, "restore", str(tmp_path / "b"))
    assert proc.returncode == 0, proc.stderr
    assert (new / "secrets.json").read_bytes() == (data_dir / "secrets.json").read_bytes()
    assert (new / "secrets.json").stat().st_mode & 0o777 == 0o600
    assert (new / "keys").stat().st_mode & 0o777 == 0o700
    assert (new / "keys" / "prescription-ed25519.pem").stat().st_mode & 0o777 == 0o600
    assert (new / "uploads").stat().st_mode & 0o777 == 0o700
    assert not (new / "manifest.json").exists()
    for _row, path in filled["reports"]:
        restored = new / path.relative_to(data_dir)
        assert restored.read_bytes() == path.read_bytes()
        assert os.stat(restored).st_ino != os.stat(path).st_ino  # copies, not links to the backup
    # The data dir option also works after the command, as the docs write it.
    proc = consult(tmp_path / "unused", "restore", str(tmp_path / "b"), "--data-dir", str(new), check=False)
    assert proc.returncode == 2 and "not empty" in proc.stderr
    proc = consult(new, "restore", str(tmp_path / "b"), "--force")
    assert proc.returncode == 0 and "Moved the previous data directory aside" in proc.stdout
    assert len(list(tmp_path.glob("new.replaced-*"))) == 1

    # A damaged backup is not restored (unless asked to).
    (tmp_path / "b" / "secrets.json").write_text("{}")
    proc = consult(tmp_path / "other", "restore", str(tmp_path / "b"), check=False)
    assert proc.returncode == 2 and "secrets.json does not match" in proc.stderr
    assert not (tmp_path / "other").exists()


def test_backup_command_output_and_exit_status(filled, tmp_path):
    data_dir = filled["data_dir"]
    proc = consult(data_dir, "backup", str(tmp_path / "b"))
    assert proc.stdout.startswith(f"Backup written to {tmp_path / 'b'}: database ")
    assert "4 hard links" in proc.stdout and "database integrity: ok" in proc.stdout
    filled["reports"][0][1].unlink()
    proc = consult(data_dir, "backup", str(tmp_path / "c"), check=False)
    assert proc.returncode == 1 and "PROBLEM: report" in proc.stdout and (tmp_path / "c").is_dir()
    proc = consult(data_dir, "backup", "verify", str(tmp_path / "b"), "extra", check=False)
    assert proc.returncode == 2


# -- the real server under write load -----------------------------------------------------------


async def _patient_session(origin: str, phone: str) -> tuple[aiohttp.ClientSession, str]:
    import re

    session = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
    text = await (await session.get(f"{origin}/login")).text()
    token = re.search(r'name="csrf_token" value="([0-9a-f]+)"', text).group(1)
    resp = await session.post(
        f"{origin}/login",
        data={"identifier": phone, "password": "correct horse", "csrf_token": token},
        allow_redirects=False,
    )
    assert resp.status == 303, await resp.text()
    text = await (await session.get(f"{origin}/account")).text()
    return session, re.search(r'name="csrf_token" value="([0-9a-f]+)"', text).group(1)


async def _hold(session, origin, csrf, clinic, starts_at) -> str | None:
    resp = await session.post(
        f"{origin}/book/hold",
        data={
            "doctor_id": clinic.doctor_ids[0],
            "department_id": clinic.department_id,
            "starts_at": starts_at,
            "csrf_token": csrf,
        },
        headers={"Accept": "application/json"},
    )
    if resp.status not in (200, 201):
        raise AssertionError(f"hold: {resp.status} {await resp.text()}")
    return (await resp.json())["public_id"]


@pytest.mark.netns
async def test_backup_under_write_load_restores_and_keeps_call_links(tmp_path, make_settings, make_user):
    settings = make_settings(booking_lead_minutes=0)
    clinic = make_clinic(settings, make_user, minutes=5)
    make_user("patient", login="13900000001")
    env = {
        **FAST,
        "CONSULT_BOOKING_LEAD_MINUTES": "0",
        "CONSULT_DEFAULT_LOCALE": "en",
        "CONSULT_ARGON2_TIME_COST": "1",
    }
    server = ConsultServer(settings.data_dir, log_dir=tmp_path, env=env, name="live")
    restored_server: ConsultServer | None = None
    await server.astart()
    session, csrf = await _patient_session(server.origin, "13900000001")
    try:
        slots = free_slots(settings, clinic.doctor_ids[0], 0, count=40)
        # A confirmed visit starting within the call link's early window, and its patient link.
        public_id = await _hold(session, server.origin, csrf, clinic, slots[0].starts_at)
        db = open_database(settings)
        visit = db.read_sync(
            lambda d: dict(d.execute("SELECT * FROM visits WHERE public_id = ?", [public_id]).fetchone())
        )
        db.close()
        write(settings, lambda d: booking.confirm_paid_sync(d, visit["id"], time.time()))
        keyed = ensure_secrets(settings)
        link = calllinks.call_path(
            calllinks.make_token(
                keyed, public_id, "patient", visit["call_nonce"], slots[0].starts_at, slots[0].ends_at
            )
        )
        page = await session.get(f"{server.origin}{link}")
        assert page.status == 200 and "Your visit starts at" in await page.text()

        stop = asyncio.Event()
        done = {"holds": 0, "uploads": 0, "deletes": 0, "errors": []}
        held: list[str] = []

        pdf = pdf_bytes()

        async def load() -> None:
            free = iter(slots[1:])
            i = 0
            while not stop.is_set():
                i += 1
                if i % 5 == 1 and (slot := next(free, None)) is not None:  # booking
                    if pid := await _hold(session, server.origin, csrf, clinic, slot.starts_at):
                        held.append(pid)
                        done["holds"] += 1
                    continue
                if not held:
                    continue
                form = aiohttp.FormData()
                form.add_field("file", pdf, filename="lab.pdf", content_type="application/pdf")
                target = held[i % len(held)]
                resp = await session.post(
                    f"{server.origin}/api/visits/{target}/reports", data=form, headers={"X-CSRF-Token": csrf}
                )
                if resp.status != 201 and resp.status != 200:
                    done["errors"].append((resp.status, await resp.text()))
                    continue
                done["uploads"] += 1
                if i % 3 == 0:  # delete what was just uploaded: row first, then the file
                    report_id = (await resp.json())["report"]["id"]
                    resp = await session.delete(
                        f"{server.origin}/api/reports/{report_id}", headers={"X-CSRF-Token": csrf}
                    )
                    if resp.status >= 300:
                        done["errors"].append((resp.status, await resp.text()))
                    else:
                        done["deletes"] += 1

        loader = asyncio.create_task(load())
        await asyncio.sleep(1.0)  # reports exist before the first backup
        outputs = []
        for n in range(3):
            proc = await asyncio.to_thread(server.cli, "backup", str(tmp_path / f"backup{n}"))
            outputs.append(proc.stdout)
            await asyncio.sleep(0.3)
        stop.set()
        await loader
        assert done["errors"] == [], (done["uploads"], done["holds"], done["errors"][:3])
        assert done["uploads"] >= 10 and done["deletes"] >= 3 and done["holds"] >= 2, done

        for n in range(3):
            b = tmp_path / f"backup{n}"
            proc = await asyncio.to_thread(consult, tmp_path / "x", "backup", "verify", str(b))
            assert "OK:" in proc.stdout
            conn = sqlite3.connect(b / "consult.db")
            named = {f"uploads/{r[0]}" for r in conn.execute("SELECT stored_name FROM reports")}
            conn.close()
            assert {
                p for p in files_under(b) if p.startswith("uploads/")
            } == named  # no orphans, no temp files
            assert (b / "secrets.json").read_bytes() == (settings.data_dir / "secrets.json").read_bytes()
            assert (b / "keys").is_dir()
        assert not list(tmp_path.glob(".backup*"))

        # The last backup in a fresh data dir: the same call link opens the call page there.
        fresh = tmp_path / "restored-data"
        await asyncio.to_thread(consult, fresh, "restore", str(tmp_path / "backup2"))
        restored_server = ConsultServer(fresh, log_dir=tmp_path, env=env, name="restored")
        await restored_server.astart()
        async with aiohttp.ClientSession() as anon:
            page = await anon.get(f"{restored_server.origin}{link}")
            assert page.status == 200 and "Your visit starts at" in await page.text()
        print(outputs, done)  # shown with -s: the timings under load
    finally:
        await session.close()
        await server.astop()
        if restored_server is not None:
            await restored_server.astop()
