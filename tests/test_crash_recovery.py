"""Nothing lost in a crash: what a killed or failing server leaves on disk converges to rows.

Real files, real SQLite: recordings whose write failed, interrupted recordings repaired once,
report ids never reused, and the periodic sweep of upload temp files and orphan report files.
"""

from __future__ import annotations

import os
import sqlite3

import pytest

from consult.calls import recordings
from consult.core import migrations
from consult.core.db import Database
from signaling.recording.writer import ParticipantWriter
from tests.test_recording_writer import OPUS
from tests.test_reports import PATIENT, World, build_world, pdf_bytes, report_rows, sign_in, upload


@pytest.fixture
def world(client, settings, make_user) -> World:
    w = build_world(client, settings, make_user)
    yield w
    w.db.close()


def rows(world: World, sql: str, params=()) -> list[dict]:
    return world.db.read_sync(lambda d: [dict(r) for r in d.execute(sql, list(params)).fetchall()])


# -- a recording whose write failed ----------------------------------------------------------


def test_a_recording_whose_write_failed_is_stored_as_incomplete(world: World, caplog):
    directory = recordings.room_dir(world.data_dir, world.public_id)
    writer = ParticipantWriter(directory, "guest", audio=True, video_codec=None)
    for i in range(50):
        writer.write("audio", 48000, OPUS, i * 960)
    writer.drain()
    full = os.open("/dev/full", os.O_WRONLY)  # every later write fails with ENOSPC
    try:
        os.dup2(full, writer._file.fileno())
    finally:
        os.close(full)
    for i in range(50, 2000):
        writer.write("audio", 48000, OPUS, i * 960)
    writer.drain()
    result = writer.close()
    assert result is not None and not result.complete
    # What the room's recording_stopped event carries, stored as consult.calls does.
    files = [result.as_dict()]
    world.db.write_sync(lambda d: recordings.store_files_sync(d, world.data_dir, world.visit_id, files, 1.0))
    (row,) = world.db.read_sync(lambda d: recordings.for_visit_sync(d, world.visit_id))
    assert row["complete"] == 0 and row["role"] == "patient"
    assert row["size"] == result.path.stat().st_size and row["sha256"] == result.sha256
    assert any(
        "stored as incomplete" in r.getMessage() and "No space left" in r.getMessage() for r in caplog.records
    )


# -- report ids are never reused ------------------------------------------------------------


async def test_a_deleted_reports_id_is_never_given_again(world: World):
    client = world.client
    token = await sign_in(client, PATIENT)
    ids = [(await (await upload(client, world, token, pdf_bytes())).json())["report"]["id"] for _ in range(2)]
    last = ids[-1]
    resp = await client.delete(f"/api/reports/{last}", headers={"X-CSRF-Token": token})
    assert resp.status == 200
    resp = await upload(client, world, token, pdf_bytes())
    assert resp.status == 201
    new = (await resp.json())["report"]["id"]
    assert new not in ids and new > last
    assert [r["id"] for r in report_rows(world)] == [ids[0], new]


def test_the_reports_rebuild_keeps_rows_indexes_and_foreign_keys(tmp_path, monkeypatch):
    path = tmp_path / "c.db"
    before = [m for m in migrations.MIGRATIONS if m[0] != "0009_reports_autoincrement"]
    monkeypatch.setattr(migrations, "MIGRATIONS", before)
    migrations.migrate(path)
    db = Database(path)

    def fill(d) -> None:
        d.execute(
            "INSERT INTO users (id, role, phone, username, display_name, password_hash, created,"
            " password_changed) VALUES (1, 'patient', '139', NULL, 'P', 'x', 0, 0),"
            " (2, 'doctor', NULL, 'dr', 'D', 'x', 0, 0)"
        )
        d.execute("INSERT INTO departments (id, code, name_zh, name_en) VALUES (1, 'c', 'c', 'c')")
        d.execute("INSERT INTO doctors (user_id) VALUES (2)")
        d.execute(
            "INSERT INTO visits (id, public_id, patient_id, doctor_id, department_id, starts_at, ends_at,"
            " status, fee_minor, currency, created, updated, call_nonce)"
            " VALUES (1, 'pub', 1, 2, 1, 100, 200, 'confirmed', 0, 'CNY', 0, 0, 'n')"
        )
        for rid in (3, 5):
            d.execute(
                "INSERT INTO reports (id, visit_id, owner_id, display_name, stored_name, content_type,"
                " size, sha256, created) VALUES (?, 1, 1, ?, ?, 'application/pdf', ?, ?, ?)",
                [rid, f"r{rid}.pdf", f"ab/{rid:064x}", rid * 10, f"{rid:064x}", rid + 0.5],
            )
        # Report 9 was uploaded and deleted before the migration: only the audit trail knows it.
        d.execute(
            "INSERT INTO audit_log (created, action, object_type, object_id, prev_hash, hash)"
            " VALUES (0, 'report.delete', 'report', '9', '', '')"
        )

    db.write_sync(fill)
    old_rows = db.read_sync(lambda d: [tuple(r) for r in d.execute("SELECT * FROM reports ORDER BY id")])
    monkeypatch.undo()
    assert migrations.migrate(path) == ["0009_reports_autoincrement"]
    conn = sqlite3.connect(path)
    assert [tuple(r) for r in conn.execute("SELECT * FROM reports ORDER BY id")] == old_rows
    schema = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'reports'").fetchone()[0]
    assert "AUTOINCREMENT" in schema
    indexes = {r[1] for r in conn.execute("PRAGMA index_list(reports)")}
    assert "reports_visit" in indexes
    assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'reports_new'").fetchone() is None

    def add(d) -> int:
        return d.execute(
            "INSERT INTO reports (visit_id, owner_id, display_name, stored_name, content_type, size, sha256,"
            " created) VALUES (1, 1, 'n.pdf', 'cd/new', 'application/pdf', 1, 'x', 1)"
        ).lastrowid

    assert db.write_sync(add) == 10  # above every id the table or the audit trail ever named
    with pytest.raises(sqlite3.IntegrityError):  # the foreign keys still hold
        db.write_sync(lambda d: d.execute("UPDATE reports SET visit_id = 42 WHERE id = 3"))
    with pytest.raises(sqlite3.IntegrityError):  # and stored names stay unique
        db.write_sync(lambda d: d.execute("UPDATE reports SET stored_name = 'cd/new' WHERE id = 3"))
    db.close()
