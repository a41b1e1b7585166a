"""Visit recordings on the application side: policy and consent, serving with Range and access
control, crash recovery of files without rows, and the retention purge with its audit trail."""

from __future__ import annotations

import json
import time
from fractions import Fraction
from pathlib import Path

import av
import pytest

from consult.audit import chain as audit
from consult.calls import recordings
from consult.core.seats import SEAT_OF_ROLE
from consult.ops import cli
from tests.test_reports import ADMIN, DOCTOR, OTHER_DOCTOR, PATIENT, World, build_world, sign_in

DATA = bytes(range(256)) * 40  # 10 KiB; the content does not matter to serving


@pytest.fixture
def world(client, settings, make_user) -> World:
    w = build_world(client, settings, make_user)
    w.db.write_sync(lambda d: d.execute("UPDATE visits SET status = 'confirmed' WHERE id = ?", [w.visit_id]))
    yield w
    w.db.close()


def add_recording(world: World, *, role: str = "doctor", data: bytes = DATA, age_days: float = 0) -> int:
    directory = recordings.room_dir(world.data_dir, world.public_id)
    seat = SEAT_OF_ROLE[role]
    path = directory / f"{seat}-20240101T000000Z-{time.time_ns() % 16**12:012x}.webm"
    path.write_bytes(data)
    path.chmod(0o600)
    created = time.time() - age_days * 86400
    files = [{"role": seat, "path": str(path), "size": len(data), "sha256": "0" * 64, "duration_s": 1.0}]

    def write(d) -> int:
        recordings.store_files_sync(d, world.data_dir, world.visit_id, files, created)
        return d.execute("SELECT id FROM recordings WHERE path LIKE ?", ["%" + path.name]).fetchone()[0]

    return world.db.write_sync(write)


def audit_rows(world: World, action: str) -> list[dict]:
    return world.db.read_sync(
        lambda d: [
            dict(r) for r in d.execute("SELECT * FROM audit_log WHERE action = ? ORDER BY id", [action])
        ]
    )


def webm(path: Path, seconds: float = 2.0) -> None:
    """A small VP8 + Opus WebM, like the recorder's (for recovery)."""
    with av.open(str(path), "w", format="webm") as out:
        video = out.add_stream("libvpx", rate=10)
        video.width, video.height, video.pix_fmt = 160, 120, "yuv420p"
        audio = out.add_stream("libopus", rate=48000)
        for i in range(int(seconds * 10)):
            frame = av.VideoFrame(160, 120, "yuv420p")
            for plane in frame.planes:
                plane.update(bytes([i * 10 % 255]) * plane.buffer_size)
            frame.pts = i
            frame.time_base = Fraction(1, 10)
            for packet in video.encode(frame):
                out.mux(packet)
        for i in range(int(seconds * 50)):
            frame = av.AudioFrame(format="s16", layout="mono", samples=960)
            frame.planes[0].update(bytes(frame.planes[0].buffer_size))
            frame.sample_rate = 48000
            frame.pts = i * 960
            for packet in audio.encode(frame):
                out.mux(packet)
        for stream in (video, audio):
            for packet in stream.encode():
                out.mux(packet)


# -- policy and consent -------------------------------------------------------------------------


def test_terms_need_both_sides_and_always_needs_consent_to_join():
    asked = recordings.VisitRecording("on_request", None, None)
    assert asked.asks and not asked.records("doctor") and asked.may_join("patient")
    doctor_yes = recordings.VisitRecording("on_request", None, True)
    assert doctor_yes.records("doctor") and not doctor_yes.records("patient") and not doctor_yes.recorded
    patient_no = recordings.VisitRecording("on_request", False, True)
    assert not patient_no.records("doctor") and patient_no.may_join("patient")
    always = recordings.VisitRecording("always", False, True)
    assert not always.may_join("patient") and always.may_join("doctor")
    both = recordings.VisitRecording("always", True, True)
    assert both.recorded and both.records("patient") and both.records("doctor")
    off = recordings.VisitRecording("off", True, True)
    assert not off.records("doctor") and off.may_join("patient")
    assert recordings.effective_policy("off", "always", None) == "always"
    assert recordings.effective_policy("always", "always", "off") == "off"
    assert recordings.effective_policy("on_request", None, None) == "on_request"


async def test_consent_is_stored_with_the_visit_and_audited(world: World, make_settings):
    client = world.client
    # Overrides: the department asks, the doctor's own setting wins over it.
    world.db.write_sync(lambda d: d.execute("UPDATE departments SET recording_policy = 'on_request'"))
    terms = world.db.read_sync(lambda d: recordings.terms_sync(d, world.visit_id, "off"))
    assert terms.policy == "on_request"
    world.db.write_sync(
        lambda d: d.execute(
            "UPDATE doctors SET recording_policy = 'always' WHERE user_id = ?", [world.doctor_id]
        )
    )
    token = await sign_in(client, DOCTOR)
    url = f"/doctor/visits/{world.public_id}/room/recording-consent"
    resp = await client.post(url, json={"consent": "yes"}, headers={"X-CSRF-Token": token})
    assert resp.status == 400
    resp = await client.post(url, json={"consent": True})
    assert resp.status == 403  # CSRF
    resp = await client.post(url, json={"consent": True}, headers={"X-CSRF-Token": token})
    assert resp.status == 200
    body = await resp.json()
    assert body == {"policy": "always", "patient": None, "doctor": True, "may_join": True, "records": True}
    stored = world.db.read_sync(
        lambda d: d.execute(
            "SELECT recording, recording_consent_doctor, recording_consent_patient FROM visits WHERE id = ?",
            [world.visit_id],
        ).fetchone()
    )
    assert tuple(stored) == ("always", 1, None)
    # The visit's policy is fixed now: changing the doctor's setting does not flip it.
    world.db.write_sync(lambda d: d.execute("UPDATE doctors SET recording_policy = 'off'"))
    assert world.db.read_sync(lambda d: recordings.terms_sync(d, world.visit_id, "off")).policy == "always"
    (entry,) = audit_rows(world, "visit.recording_consent")
    assert entry["actor_id"] == world.doctor_id and json.loads(entry["detail"])["consent"] is True
    # Another doctor cannot answer for this visit.
    token = await sign_in(client, OTHER_DOCTOR)
    resp = await client.post(url, json={"consent": False}, headers={"X-CSRF-Token": token})
    assert resp.status in (403, 404)


# -- serving --------------------------------------------------------------------------------------


async def test_doctor_gets_the_file_with_range_and_one_audit_entry_per_play(world: World):
    rid = add_recording(world)
    client = world.client
    await sign_in(client, DOCTOR)
    resp = await client.get(f"/recordings/{rid}")
    assert resp.status == 200
    assert await resp.read() == DATA
    assert resp.headers["Content-Type"] == "video/webm"
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert resp.headers["Cache-Control"] == "private, no-store"
    assert resp.headers.get("Accept-Ranges") == "bytes"
    resp = await client.get(f"/recordings/{rid}", headers={"Range": "bytes=100-199"})
    assert resp.status == 206
    assert await resp.read() == DATA[100:200]
    assert resp.headers["Content-Range"] == f"bytes 100-199/{len(DATA)}"
    assert resp.headers["Content-Type"] == "video/webm"
    resp = await client.get(f"/recordings/{rid}", headers={"Range": "bytes=0-"})
    assert resp.status == 206 and await resp.read() == DATA
    plays = audit_rows(world, "recording.play")
    assert len(plays) == 2  # the full GET and the bytes=0- opening; not the follow-up range
    assert plays[0]["object_id"] == str(rid) and plays[0]["subject_user_id"] == world.patient_id
    # The visit page shows both participants' players to the doctor.
    add_recording(world, role="patient")
    page = await (await client.get(f"/visits/{world.public_id}")).text()
    assert page.count('data-testid="recording-video"') == 2 and f'src="/recordings/{rid}"' in page


async def test_only_the_visits_doctor_and_admins_can_play(world: World):
    rid = add_recording(world)
    client = world.client
    assert (await client.get(f"/recordings/{rid}", allow_redirects=False)).status in (302, 303, 401)
    for who, status in ((PATIENT, 404), (OTHER_DOCTOR, 404), (ADMIN, 200), (DOCTOR, 200)):
        await sign_in(client, who)
        resp = await client.get(f"/recordings/{rid}")
        assert resp.status == status, (who, resp.status)
    await sign_in(client, PATIENT)
    page = await (await client.get(f"/visits/{world.public_id}")).text()
    assert "recording-video" not in page
    assert (await client.get("/recordings/999999")).status == 404
    # Refusals leave no play entry: only the admin's and the doctor's plays are there.
    assert len(audit_rows(world, "recording.play")) == 2


async def test_files_left_by_a_crash_get_rows_at_start(world: World, settings):
    directory = recordings.room_dir(world.data_dir, world.public_id)
    path = directory / "guest-20240101T000000Z-0123456789ab.webm"
    webm(path)
    cut = path.read_bytes()
    path.write_bytes(cut[: len(cut) * 3 // 4])  # cut like a kill -9 would
    (directory / "notes.txt").write_text("not a recording")
    touched = world.db.write_sync(lambda d: recordings.recover_sync(d, world.data_dir))
    assert touched == [f"recordings/{world.public_id}/{path.name}"]
    (row,) = world.db.read_sync(lambda d: recordings.for_visit_sync(d, world.visit_id))
    assert row["role"] == "patient" and row["complete"] == 0
    assert row["size"] == path.stat().st_size and len(row["sha256"]) == 64
    assert 0.5 < row["duration_s"] <= 2.1
    assert {t["kind"] for t in row["tracks"]} == {"audio", "video"}
    # The file was repaired once (finished, with its seek index) and marked so: a second start
    # neither re-reads it nor touches its row.
    assert world.db.write_sync(lambda d: recordings.recover_sync(d, world.data_dir)) == []


# -- retention ------------------------------------------------------------------------------------


def test_purge_deletes_old_files_and_rows_each_audited(world: World, settings, monkeypatch, capsys):
    if settings.database_url:  # the command finds the test's PostgreSQL database as a node would
        monkeypatch.setenv("CONSULT_DATABASE_URL", settings.database_url)
    old = add_recording(world, age_days=40)
    old2 = add_recording(world, role="patient", age_days=35)
    new = add_recording(world, age_days=1)
    paths = {
        r["id"]: world.data_dir / r["path"]
        for r in world.db.read_sync(lambda d: recordings.for_visit_sync(d, world.visit_id))
    }
    argv = ["--data-dir", str(world.data_dir), "recordings", "purge", "--older-than-days", "30"]
    assert cli.main([*argv, "--dry-run"]) == 0
    assert "Would delete 2 recordings" in capsys.readouterr().out
    assert all(p.exists() for p in paths.values())
    assert cli.main(argv) == 0
    assert "Deleted 2 recordings" in capsys.readouterr().out
    assert not paths[old].exists() and not paths[old2].exists() and paths[new].exists()
    remaining = world.db.read_sync(lambda d: recordings.for_visit_sync(d, world.visit_id))
    assert [r["id"] for r in remaining] == [new]
    deletions = audit_rows(world, "recording.delete")
    assert [int(e["object_id"]) for e in deletions] == [old, old2]
    assert all(e["subject_user_id"] == world.patient_id for e in deletions)
    assert json.loads(deletions[0]["detail"])["reason"] == "retention"
    assert world.db.read_sync(audit.verify)[0]
    # The default comes from the setting; 0 keeps everything.
    assert cli.main(["--data-dir", str(world.data_dir), "recordings", "purge"]) == 0
    assert "Deleted 0 recordings older than 3650 days" in capsys.readouterr().out


async def test_admin_sets_the_department_policy_on_its_page(world: World):
    client = world.client
    token = await sign_in(client, ADMIN)
    page = await (await client.get("/admin/catalogue/departments/1")).text()
    assert 'name="recording_policy"' in page
    form = {
        "code": "cardio",
        "name_zh": "心内科",
        "name_en": "Cardiology",
        "active": "1",
        "csrf_token": token,
    }
    resp = await client.post(
        "/admin/catalogue/departments/1", data={**form, "recording_policy": "always"}, allow_redirects=False
    )
    assert resp.status == 303
    assert world.db.read_sync(lambda d: recordings.terms_sync(d, world.visit_id, "off")).policy == "always"
    (entry,) = audit_rows(world, "department.recording_policy")
    assert json.loads(entry["detail"]) == {"from": None, "to": "always"}
    resp = await client.post(
        "/admin/catalogue/departments/1", data={**form, "recording_policy": "bogus"}, allow_redirects=False
    )
    assert resp.status == 400
    resp = await client.post(
        "/admin/catalogue/departments/1", data={**form, "recording_policy": ""}, allow_redirects=False
    )
    assert world.db.read_sync(lambda d: recordings.terms_sync(d, world.visit_id, "off")).policy == "off"
