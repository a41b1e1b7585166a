"""Test reports: who may read, add and remove them; what is served and how; the audit trail."""

from __future__ import annotations

import hashlib
import io
import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from PIL import Image

from consult.core import metrics
from consult.core.db import Database
from consult.core.engine import open_database
from tests.conftest import csrf_of, login

PATIENT, OTHER_PATIENT = "13900000001", "13900000002"
DOCTOR, OTHER_DOCTOR, ADMIN = "drwang", "drli", "clerk"


@dataclass
class World:
    client: object
    db: Database
    data_dir: Path
    visit_id: int
    public_id: str
    patient_id: int
    doctor_id: int
    other_patient_id: int
    other_doctor_id: int
    admin_id: int


def build_world(client, settings, make_user, *, starts_in: float = 2 * 86400, fee_minor: int = 5000) -> World:
    """A department, two doctors, two patients, an admin and one held visit, straight in SQL."""
    patient = make_user("patient", PATIENT, name="Patient One")
    other_patient = make_user("patient", OTHER_PATIENT, name="Patient Two")
    doctor = make_user("doctor", DOCTOR, name="Dr Wang")
    other_doctor = make_user("doctor", OTHER_DOCTOR, name="Dr Li")
    admin = make_user("admin", ADMIN, name="Cashier")
    db = open_database(settings)
    now = time.time()
    starts = int(now + starts_in)
    public_id = secrets.token_urlsafe(12)

    def write(d) -> int:
        d.execute(
            "INSERT INTO departments (code, name_zh, name_en) VALUES ('cardio', '心内科', 'Cardiology')"
        )
        for doc in (doctor, other_doctor):
            d.execute("INSERT INTO doctors (user_id, fee_minor) VALUES (?, ?)", [doc, fee_minor])
        cur = d.execute(
            "INSERT INTO visits (public_id, patient_id, doctor_id, department_id, starts_at, ends_at,"
            " status, hold_expires, fee_minor, currency, created, updated, call_nonce)"
            " VALUES (?, ?, ?, 1, ?, ?, 'held', ?, ?, 'CNY', ?, ?, 'nonce') RETURNING id",
            [public_id, patient, doctor, starts, starts + 900, now + 900, fee_minor, now, now],
        )
        return int(cur.fetchone()[0])

    visit_id = db.write_sync(write)
    return World(
        client,
        db,
        settings.data_dir,
        visit_id,
        public_id,
        patient,
        doctor,
        other_patient,
        other_doctor,
        admin,
    )


@pytest.fixture
def world(client, settings, make_user) -> World:
    w = build_world(client, settings, make_user)
    yield w
    w.db.close()


async def sign_in(client, identifier: str) -> str:
    """Become ``identifier`` on this client; returns a CSRF token for headers and forms."""
    client.session.cookie_jar.clear()
    await login(client, identifier)
    return await csrf_of(client, "/")


def uploads_counted(world: World) -> float | None:
    return world.client.server.app[metrics.METRICS].registry.get_sample_value("consult_uploads_total")


def pdf_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (120, 160), "white").save(buf, "PDF")
    return buf.getvalue()


def png_bytes(size: tuple[int, int] = (64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


async def upload(
    client,
    world: World,
    token: str | None,
    data: bytes,
    filename: str = "report.pdf",
    content_type: str = "application/pdf",
):
    form = aiohttp.FormData()
    form.add_field("file", data, filename=filename, content_type=content_type)
    headers = {"X-CSRF-Token": token} if token else {}
    return await client.post(f"/api/visits/{world.public_id}/reports", data=form, headers=headers)


def stored_files(data_dir: Path) -> list[Path]:
    root = data_dir / "uploads"
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def report_rows(world: World) -> list[dict]:
    return world.db.read_sync(lambda d: [dict(r) for r in d.execute("SELECT * FROM reports ORDER BY id")])


async def test_pdf_and_png_are_stored_privately_with_matching_sha256(world):
    client = world.client
    token = await sign_in(client, PATIENT)
    pdf = pdf_bytes()
    resp = await upload(client, world, token, pdf, "血常规.pdf")
    assert resp.status == 201, await resp.text()
    body = await resp.json()
    assert body["report"]["name"] == "血常规.pdf"
    resp = await upload(client, world, token, png_bytes(), "scan.PNG", "application/octet-stream")
    assert resp.status == 201, await resp.text()

    rows = report_rows(world)
    assert [r["content_type"] for r in rows] == ["application/pdf", "image/png"]
    for row in rows:
        path = world.data_dir / "uploads" / row["stored_name"]
        data = path.read_bytes()
        assert hashlib.sha256(data).hexdigest() == row["sha256"]
        assert len(data) == row["size"]
        assert path.stat().st_mode & 0o777 == 0o600
        assert row["owner_id"] == world.patient_id
        assert "." not in path.name  # server-chosen name, no client extension
    assert (world.data_dir / "uploads" / rows[0]["stored_name"]).read_bytes() == pdf
    assert uploads_counted(world) == 2

    resp = await client.get(f"/api/visits/{world.public_id}/reports")
    listing = await resp.json()
    assert [r["name"] for r in listing["reports"]] == ["血常规.pdf", "scan.PNG"]
    assert listing["can_edit"] is True


async def test_serving_headers_and_audit(world):
    client = world.client
    token = await sign_in(client, PATIENT)
    resp = await upload(client, world, token, pdf_bytes(), 'a"b;c.pdf')
    report_id = (await resp.json())["report"]["id"]
    resp = await client.get(f"/reports/{report_id}")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "application/pdf"
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert resp.headers["Cache-Control"] == "private, no-store"
    assert resp.headers["Content-Security-Policy"].startswith("sandbox")
    assert resp.headers["Content-Disposition"].startswith("inline;")
    assert "filename*=UTF-8''a%22b%3Bc.pdf" in resp.headers["Content-Disposition"]
    resp = await client.get(f"/reports/{report_id}/download")
    assert resp.headers["Content-Disposition"].startswith("attachment;")

    await sign_in(client, DOCTOR)
    resp = await client.get(f"/reports/{report_id}")
    assert resp.status == 200
    views = world.db.read_sync(
        lambda d: [dict(r) for r in d.execute("SELECT * FROM audit_log WHERE action = 'report.view'")]
    )
    assert [(v["actor_id"], v["actor_role"], v["object_id"]) for v in views] == [
        (world.patient_id, "patient", str(report_id)),
        (world.patient_id, "patient", str(report_id)),
        (world.doctor_id, "doctor", str(report_id)),
    ]
    assert all(v["subject_user_id"] == world.patient_id for v in views)
    assert json.loads(views[1]["detail"])["download"] is True


@pytest.mark.parametrize("who", [OTHER_PATIENT, OTHER_DOCTOR])
async def test_strangers_get_404(world, who):
    client = world.client
    token = await sign_in(client, PATIENT)
    report_id = (await (await upload(client, world, token, pdf_bytes())).json())["report"]["id"]
    token = await sign_in(client, who)
    for path in (
        f"/reports/{report_id}",
        f"/reports/{report_id}/download",
        f"/api/visits/{world.public_id}/reports",
    ):
        resp = await client.get(path)
        assert resp.status == 404, path
    resp = await client.delete(f"/api/reports/{report_id}", headers={"X-CSRF-Token": token})
    assert resp.status == 404
    resp = await upload(client, world, token, pdf_bytes())
    assert resp.status == 404
    assert len(report_rows(world)) == 1


async def test_signed_out_gets_401_and_admin_may_read(world):
    client = world.client
    token = await sign_in(client, PATIENT)
    report_id = (await (await upload(client, world, token, pdf_bytes())).json())["report"]["id"]
    client.session.cookie_jar.clear()
    resp = await client.get(f"/api/visits/{world.public_id}/reports")
    assert resp.status == 401
    await sign_in(client, ADMIN)
    assert (await client.get(f"/reports/{report_id}")).status == 200


async def test_patient_removes_report_before_the_visit(world):
    client = world.client
    token = await sign_in(client, PATIENT)
    report_id = (await (await upload(client, world, token, pdf_bytes())).json())["report"]["id"]
    assert len(stored_files(world.data_dir)) == 1

    doctor_token = await sign_in(client, DOCTOR)
    resp = await client.delete(f"/api/reports/{report_id}", headers={"X-CSRF-Token": doctor_token})
    assert resp.status == 403

    token = await sign_in(client, PATIENT)
    resp = await client.delete(f"/api/reports/{report_id}")
    assert resp.status == 403  # no CSRF header
    resp = await client.delete(f"/api/reports/{report_id}", headers={"X-CSRF-Token": token})
    assert resp.status == 200
    assert report_rows(world) == []
    assert stored_files(world.data_dir) == []
    actions = world.db.read_sync(lambda d: [r[0] for r in d.execute("SELECT action FROM audit_log")])
    assert actions.count("report.delete") == 1


@pytest.mark.locale("en")  # asserts English texts
async def test_reports_are_locked_once_the_visit_starts(world):
    client = world.client
    token = await sign_in(client, PATIENT)
    report_id = (await (await upload(client, world, token, pdf_bytes())).json())["report"]["id"]
    world.db.write_sync(
        lambda d: d.execute(
            "UPDATE visits SET starts_at = ?, status = 'confirmed' WHERE id = ?",
            [int(time.time()) - 60, world.visit_id],
        )
    )
    resp = await upload(client, world, token, pdf_bytes())
    assert resp.status == 409
    assert "before the visit starts" in (await resp.json())["message"]
    resp = await client.delete(f"/api/reports/{report_id}", headers={"X-CSRF-Token": token})
    assert resp.status == 409
    listing = await (await client.get(f"/api/visits/{world.public_id}/reports")).json()
    assert listing["can_edit"] is False
    assert listing["reports"][0]["delete_url"] is None


async def test_upload_needs_csrf_header(world):
    client = world.client
    await sign_in(client, PATIENT)
    resp = await upload(client, world, None, pdf_bytes())
    assert resp.status == 403
    assert report_rows(world) == []
    assert stored_files(world.data_dir) == []
    assert uploads_counted(world) == 0


async def test_visit_page_shows_both_panels(world):
    client = world.client
    if "visit" not in client.server.app.router.named_resources():
        pytest.skip("the visit page is not there yet")
    await sign_in(client, PATIENT)
    resp = await client.get(f"/visits/{world.public_id}")
    assert resp.status == 200, await resp.text()
    html = await resp.text()
    assert "data-reports-panel" in html
    assert f'data-upload-url="/api/visits/{world.public_id}/reports"' in html
    assert "data-payment-panel" in html
    assert f'action="/visits/{world.public_id}/pay"' in html
