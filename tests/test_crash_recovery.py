"""Nothing lost in a crash: what a killed or failing server leaves on disk converges to rows.

Real files, real SQLite: recordings whose write failed, interrupted recordings repaired once,
report ids never reused, and the periodic sweep of upload temp files and orphan report files.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import av
import pytest

from consult.app import create_app
from consult.calls import recordings
from consult.clinical import reports, uploads
from consult.core import metrics, migrations
from consult.core.db import Database
from signaling.recording.writer import ParticipantWriter
from tests.test_recording_writer import OPUS
from tests.test_reports import PATIENT, World, build_world, pdf_bytes, report_rows, sign_in, upload

ROOT = Path(__file__).resolve().parents[1]


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


@pytest.mark.sqlite_only("a migration of an old SQLite file")
def test_the_reports_rebuild_keeps_rows_indexes_and_foreign_keys(tmp_path, monkeypatch):
    path = tmp_path / "c.db"
    before = [m for m in migrations.MIGRATIONS if m[0] != "0010_reports_autoincrement"]
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
    assert migrations.migrate(path) == ["0010_reports_autoincrement"]
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


# -- interrupted recordings are repaired once -----------------------------------------------

CUES = b"\x1c\x53\xbb\x6b"  # the Matroska Cues element: the seek index a clean close writes


# A recorder killed with SIGKILL after `seconds` of media, as a crashed server leaves its file.
KILLED_RECORDER = """
import os, signal, sys
from fractions import Fraction
from pathlib import Path
import av
from signaling.recording.writer import ParticipantWriter

directory, seat, seconds = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])
clock = [1000.0]
writer = ParticipantWriter(directory, seat, audio=True, video_codec="vp8", monotonic=lambda: clock[0])
video = av.CodecContext.create("libvpx", "w")
video.width, video.height, video.pix_fmt = 160, 120, "yuv420p"
video.time_base, video.gop_size = Fraction(1, 10), 10
audio = av.CodecContext.create("libopus", "w")
audio.sample_rate, audio.layout, audio.format = 48000, "mono", "s16"
for tick in range(int(seconds * 50)):  # 20 ms of audio each, a video frame every 100 ms
    frame = av.AudioFrame(format="s16", layout="mono", samples=960)
    frame.planes[0].update(bytes(frame.planes[0].buffer_size))
    frame.sample_rate, frame.pts, frame.time_base = 48000, tick * 960, Fraction(1, 48000)
    for packet in audio.encode(frame):
        writer.write("audio", 48000, bytes(packet), tick * 960)
    if tick % 5 == 0:
        n = tick // 5
        frame = av.VideoFrame(160, 120, "yuv420p")
        for plane in frame.planes:
            plane.update(bytes([n * 10 % 255]) * plane.buffer_size)
        frame.pts, frame.time_base = n, Fraction(1, 10)
        for packet in video.encode(frame):
            writer.write("video", 90000, bytes(packet), n * 9000)
    clock[0] += 0.02
    if tick % 25 == 24:
        writer.drain()
print(writer.path, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def killed_recording(world: World, seat: str, seconds: float = 4.0) -> Path:
    directory = recordings.room_dir(world.data_dir, world.public_id)
    done = subprocess.run(
        [sys.executable, "-c", KILLED_RECORDER, str(directory), seat, str(seconds)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    return Path(done.stdout.strip())


def playable(path: Path) -> float:
    """Duration from the header; every packet decodes; seeking to the middle works."""
    with av.open(str(path)) as container:
        assert container.duration is not None, "no duration in the header"
        for packet in container.demux():
            for _frame in packet.decode():
                pass
        middle = container.duration // 2
        container.seek(middle, any_frame=False)
        assert next(container.decode(video=0)) is not None
        return container.duration / av.time_base


async def test_an_interrupted_recording_is_repaired_once_and_not_read_again(
    world: World, aiohttp_client, settings, monkeypatch
):
    crashed = killed_recording(world, "guest")
    mtime = crashed.stat().st_mtime - 600
    os.utime(crashed, (mtime, mtime))
    with av.open(str(crashed)) as container:
        assert container.duration is None and CUES not in crashed.read_bytes()
    # A file whose write failed has an incomplete row already, stored by the room's event.
    failed = killed_recording(world, "host")
    files = [{"role": "host", "path": str(failed), "size": failed.stat().st_size, "complete": False}]
    world.db.write_sync(lambda d: recordings.store_files_sync(d, world.data_dir, world.visit_id, files, 1.0))

    await aiohttp_client(create_app(settings))  # a start after the crash
    by_role = {
        r["role"]: r for r in world.db.read_sync(lambda d: recordings.for_visit_sync(d, world.visit_id))
    }
    for role, path in (("patient", crashed), ("doctor", failed)):
        row = by_role[role]
        assert row["complete"] == 0
        assert CUES in path.read_bytes(), "no seek index"
        duration = playable(path)
        assert 2.0 <= duration <= 4.0 and row["duration_s"] == pytest.approx(duration, abs=0.1)
        assert row["size"] == path.stat().st_size
        assert row["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert {t["kind"] for t in row["tracks"]} == {"audio", "video"}
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert by_role["patient"]["created"] == pytest.approx(mtime)  # when it was recorded, not now
    assert not list(crashed.parent.glob("*.repair"))
    marked = rows(world, "SELECT count(*) AS n FROM recordings WHERE repaired_at IS NOT NULL")
    assert marked == [{"n": 2}]

    # The next start reads neither file again.
    reads: list[Path] = []
    for name in ("repair_file", "sha256_file", "probe"):
        real = getattr(recordings, name)
        monkeypatch.setattr(recordings, name, lambda path, real=real: reads.append(path) or real(path))
    before = rows(world, "SELECT * FROM recordings ORDER BY id")
    await aiohttp_client(create_app(settings))
    assert reads == []
    assert rows(world, "SELECT * FROM recordings ORDER BY id") == before


# -- upload files converge ------------------------------------------------------------------


def old(path: Path, seconds: float = 600) -> None:
    when = time.time() - seconds
    os.utime(path, (when, when))


async def wait_for(condition, what: str, within: float = 10) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)


async def test_temp_files_of_crashed_uploads_are_swept_but_a_live_upload_keeps_its_own(
    aiohttp_client, make_settings, make_user
):
    settings = make_settings(files_sweep_interval_seconds=0.1)
    client = await aiohttp_client(create_app(settings))
    world = build_world(client, settings, make_user)
    token = await sign_in(client, PATIENT)
    tmp = uploads.tmp_dir(world.data_dir)
    tmp.mkdir(parents=True, exist_ok=True)

    # A live upload, mid-body: its temp file exists and the rest of the body has not come yet.
    host, port = client.server.host, client.server.port
    cookies = "; ".join(f"{c.key}={c.value}" for c in client.session.cookie_jar)
    boundary = "liveboundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="live.pdf"\r\n'
            "Content-Type: application/pdf\r\n\r\n"
        ).encode()
        + pdf_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    head = (
        f"POST /api/visits/{world.public_id}/reports HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Cookie: {cookies}\r\nX-CSRF-Token: {token}\r\nConnection: close\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(head + body[: len(body) // 2])
    await writer.drain()
    await wait_for(lambda: any(tmp.glob("*.part")), "the upload never started")
    (live,) = tmp.glob("*.part")
    old(live)  # a slow client: not written to for longer than any grace, yet still in flight

    # What two crashed uploads left: a received file, and a photo's cleaned copy.
    crashed = [tmp / (uploads.new_token() + ".part"), tmp / (uploads.new_token() + ".clean")]
    for path in crashed:
        path.write_bytes(b"left by a crash")
        old(path)
    await wait_for(lambda: not any(p.exists() for p in crashed), "crashed temp files were not swept")
    await asyncio.sleep(0.3)  # a few more sweeps
    assert live.exists(), "the live upload's temp file was swept"

    writer.write(body[len(body) // 2 :])
    await writer.drain()
    response = await reader.read()
    writer.close()
    assert response.startswith(b"HTTP/1.1 201"), response[:200]
    assert [p.name for p in tmp.iterdir()] == []  # the finished upload consumed its own
    (row,) = report_rows(world)
    assert (uploads.uploads_root(world.data_dir) / row["stored_name"]).is_file()
    world.db.close()


async def test_an_orphan_file_is_quarantined_and_a_missing_file_reported(
    aiohttp_client, make_settings, make_user, caplog
):
    settings = make_settings(files_sweep_interval_seconds=0.1)
    client = await aiohttp_client(create_app(settings))
    world = build_world(client, settings, make_user)
    registry = client.server.app[metrics.METRICS].registry
    token = await sign_in(client, PATIENT)
    kept, lost = [
        (await (await upload(client, world, token, pdf_bytes())).json())["report"]["id"] for _ in range(2)
    ]
    names = {r["id"]: r["stored_name"] for r in report_rows(world)}
    root = uploads.uploads_root(world.data_dir)
    # The server died between storing a file and writing its row: a file nobody knows.
    orphan = uploads.new_stored_name()
    (root / orphan).parent.mkdir(mode=0o700, exist_ok=True)
    (root / orphan).write_bytes(b"%PDF-1.4 orphan")
    old(root / orphan)
    # A file stored a moment ago, whose row is on its way: too young to judge.
    young = uploads.new_stored_name()
    (root / young).parent.mkdir(mode=0o700, exist_ok=True)
    (root / young).write_bytes(b"%PDF-1.4 young")
    # A row whose file is gone.
    (root / names[lost]).unlink()

    quarantined = uploads.quarantine_dir(world.data_dir) / orphan.replace("/", "-")
    await wait_for(quarantined.exists, "the orphan was not quarantined")
    await asyncio.sleep(0.3)
    assert quarantined.read_bytes() == b"%PDF-1.4 orphan" and not (root / orphan).exists()
    assert (root / young).exists() and (root / names[kept]).exists()
    assert registry.get_sample_value("consult_report_files_quarantined_total") == 1
    assert registry.get_sample_value("consult_report_files_missing") == 1
    messages = [r.getMessage() for r in caplog.records]
    assert any(orphan in m and "has no row" in m for m in messages)
    missing = [m for m in messages if f"report {lost}: its file" in m and "missing" in m]
    assert len(missing) == 1, "reported once, not at every sweep"
    assert [r["id"] for r in report_rows(world)] == [kept, lost]  # rows are never removed by the sweep
    world.db.close()


async def test_a_stored_file_held_by_a_request_is_not_an_orphan(world: World):
    in_flight = uploads.InFlight()
    name = uploads.new_stored_name()
    path = uploads.uploads_root(world.data_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"linked, row not written yet")
    old(path)
    with in_flight.hold(name):
        result = await reports.converge_files(world.db, world.data_dir, in_flight)
        assert result.quarantined == [] and path.exists()
    result = await reports.converge_files(world.db, world.data_dir, in_flight)
    assert result.quarantined == [name] and not path.exists()
