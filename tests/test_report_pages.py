"""Reports as pages for the consult room's viewer: PDFs rendered on the server (a child process
under limits), served only to those who may read the report, audited, cached and removed with it."""

from __future__ import annotations

import io
import json
import time

import pytest
from PIL import Image

from consult.clinical import pages, reports, uploads
from tests.test_reports import DOCTOR, OTHER_DOCTOR, OTHER_PATIENT, PATIENT, World, sign_in, upload
from tests.test_reports import world as world  # the fixture


def three_page_pdf() -> bytes:
    buf = io.BytesIO()
    colours = ("white", (200, 0, 0), (0, 0, 200))
    images = [Image.new("RGB", (595, 842), c) for c in colours]
    images[0].save(buf, "PDF", save_all=True, append_images=images[1:])
    return buf.getvalue()


# Passes the upload's checks (a header, startxref, %%EOF) but is no PDF a reader can open.
BROKEN_PDF = b"%PDF-1.7\n1 0 obj\n<< /Type /Catalog /Pages 9 0 R\nstartxref\n999999\n%%EOF\n"


def handmade_pdf(page_count: int, box: tuple[float, float] = (595, 842)) -> bytes:
    """A valid PDF of `page_count` empty pages of size `box` (points), with a correct xref."""
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>"]
    kids = " ".join(f"{3 + i} 0 R" for i in range(page_count))
    objects.append(f"<< /Type /Pages /Kids [{kids}] /Count {page_count} >>".encode())
    for _ in range(page_count):
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 {box[0]} {box[1]}] >>".encode())
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for n, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{n} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    for off in offsets:
        out += f"{off:010d} 00000 n \n".encode()
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


async def uploaded(world: World, data: bytes, name: str = "report.pdf") -> int:
    token = await sign_in(world.client, PATIENT)
    resp = await upload(world.client, world, token, data, name)
    assert resp.status == 201, await resp.text()
    return (await resp.json())["report"]["id"]


def page_reads(world: World) -> list[dict]:
    rows = world.db.read_sync(
        lambda d: [dict(r) for r in d.execute("SELECT * FROM audit_log WHERE action = 'report.view'")]
    )
    return [json.loads(r["detail"]) | {"actor": r["actor_id"]} for r in rows]


async def test_pdf_pages_render_audit_and_go_with_the_report(world):
    report_id = await uploaded(world, three_page_pdf())
    await sign_in(world.client, DOCTOR)
    resp = await world.client.get(f"/api/reports/{report_id}/pages")
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["kind"] == "pdf"
    assert [p["url"] for p in body["pages"]] == [f"/reports/{report_id}/pages/{n}" for n in (1, 2, 3)]
    assert all(p["width"] == 1190 and p["height"] == 1684 for p in body["pages"])  # A4 at 144 dpi
    colours = []
    for page in body["pages"]:
        resp = await world.client.get(page["url"])
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "image/png"
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        assert resp.headers["Content-Security-Policy"].startswith("sandbox")
        image = Image.open(io.BytesIO(await resp.read()))
        colours.append(image.convert("RGB").getpixel((image.width // 2, image.height // 2)))
    expected = [(255, 255, 255), (200, 0, 0), (0, 0, 200)]  # in page order (JPEG inside: near enough)
    for got, want in zip(colours, expected, strict=True):
        assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= 4, (got, want)
    assert (await world.client.get(f"/reports/{report_id}/pages/4")).status == 404
    assert (await world.client.get(f"/reports/{report_id}/pages/0")).status == 404
    reads = [r for r in page_reads(world) if r["actor"] == world.doctor_id]
    assert [r.get("page") for r in reads] == [1, 2, 3]
    assert all(r["visit"] == world.public_id and r["download"] is False for r in reads)

    # Cached on disk under the data dir, privately; gone with the report.
    stored = world.db.read_sync(lambda d: d.execute("SELECT stored_name FROM reports").fetchone()[0])
    cached = pages.cache_dir(world.data_dir, stored)
    assert sorted(p.name for p in cached.iterdir()) == ["1.png", "2.png", "3.png", "meta.json"]
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in cached.iterdir())
    found = await reports.get_with_visit(world.db, report_id)
    assert found is not None
    patient = await sign_in(world.client, PATIENT)
    assert patient
    resp = await world.client.delete(f"/api/reports/{report_id}", headers={"X-CSRF-Token": patient})
    assert resp.status == 200
    assert not cached.exists()


async def test_a_photo_is_one_page_the_file_itself(world):
    buf = io.BytesIO()
    Image.new("RGB", (300, 400), (10, 120, 10)).save(buf, "JPEG")
    report_id = await uploaded(world, buf.getvalue(), "photo.jpg")
    await sign_in(world.client, DOCTOR)
    body = await (await world.client.get(f"/api/reports/{report_id}/pages")).json()
    assert body["kind"] == "image"
    assert [p["url"] for p in body["pages"]] == [f"/reports/{report_id}"]
    assert (await world.client.get(f"/reports/{report_id}/pages/1")).status == 404


@pytest.mark.parametrize("who", [OTHER_PATIENT, OTHER_DOCTOR])
async def test_pages_are_refused_to_another_patient_or_doctor(world, who):
    report_id = await uploaded(world, three_page_pdf())
    await sign_in(world.client, DOCTOR)
    assert (await world.client.get(f"/api/reports/{report_id}/pages")).status == 200  # rendered, cached
    before = len(page_reads(world))
    await sign_in(world.client, who)
    for path in (f"/api/reports/{report_id}/pages", *(f"/reports/{report_id}/pages/{n}" for n in (1, 2, 3))):
        resp = await world.client.get(path)
        assert resp.status == 404, path
        assert not resp.headers["Content-Type"].startswith("image/")
    world.client.session.cookie_jar.clear()
    resp = await world.client.get(f"/reports/{report_id}/pages/1", allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"].startswith("/login")  # signed out: sign in first
    assert (await world.client.get(f"/api/reports/{report_id}/pages")).status == 401
    assert len(page_reads(world)) == before


@pytest.mark.locale("en")
@pytest.mark.parametrize(
    ("data", "code", "words"),
    [
        (handmade_pdf(5000), "pdf_too_many_pages", "5000 pages"),
        (BROKEN_PDF, "pdf_unreadable", "could not be read"),
    ],
    ids=["huge-page-count", "broken"],
)
async def test_a_hostile_pdf_gets_a_clear_error_and_the_server_goes_on(world, data, code, words):
    report_id = await uploaded(world, data)
    await sign_in(world.client, DOCTOR)
    resp = await world.client.get(f"/api/reports/{report_id}/pages")
    assert resp.status == 415, await resp.text()
    body = await resp.json()
    assert body["error"] == code
    assert words in body["message"] and "download it" in body["message"].lower()
    assert (await world.client.get(f"/reports/{report_id}/pages/1")).status == 415  # the kept refusal
    good = await uploaded(world, three_page_pdf())
    await sign_in(world.client, DOCTOR)
    assert (await world.client.get(f"/api/reports/{good}/pages")).status == 200


async def test_a_huge_or_empty_page_is_rendered_within_the_pixel_bound(world):
    # PDFium reads a zero-sized page as Letter; a poster-sized one is scaled down to the bound.
    report_id = await uploaded(world, handmade_pdf(1, (0, 0)))
    await sign_in(world.client, DOCTOR)
    body = await (await world.client.get(f"/api/reports/{report_id}/pages")).json()
    assert [(p["width"], p["height"]) for p in body["pages"]] == [(1224, 1584)]
    report_id = await uploaded(world, handmade_pdf(1, (14400, 14400)))
    await sign_in(world.client, DOCTOR)
    body = await (await world.client.get(f"/api/reports/{report_id}/pages")).json()
    (page,) = body["pages"]
    assert page["width"] * page["height"] <= pages.MAX_PAGE_PIXELS
    assert max(page["width"], page["height"]) <= pages.MAX_PAGE_SIDE


async def test_the_worker_is_killed_past_its_wall_clock(world, monkeypatch):
    report_id = await uploaded(world, three_page_pdf())
    monkeypatch.setattr(pages, "WORKER_WALL_S", 0.001)
    await sign_in(world.client, DOCTOR)
    resp = await world.client.get(f"/api/reports/{report_id}/pages")
    assert resp.status == 415
    assert (await resp.json())["error"] == "pdf_unreadable"
    # A timeout may be the machine's fault, not the file's: it is not kept.
    monkeypatch.setattr(pages, "WORKER_WALL_S", 45.0)
    assert (await world.client.get(f"/api/reports/{report_id}/pages")).status == 200


async def test_thumbnails_of_a_photo_and_a_pdf(world):
    buf = io.BytesIO()
    Image.new("RGB", (3024, 4032), (10, 120, 10)).save(buf, "JPEG")
    photo = await uploaded(world, buf.getvalue(), "photo.jpg")
    pdf = await uploaded(world, three_page_pdf())
    await sign_in(world.client, DOCTOR)
    listing = await (await world.client.get(f"/api/visits/{world.public_id}/reports")).json()
    thumbs = [r["thumb_url"] for r in listing["reports"]]
    assert thumbs == [f"/reports/{photo}/thumb", f"/reports/{pdf}/thumb"]
    for report_id, size in ((photo, (180, 240)), (pdf, (170, 240))):
        resp = await world.client.get(f"/reports/{report_id}/thumb")
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "image/png"
        assert Image.open(io.BytesIO(await resp.read())).size == size
    assert sum(1 for r in page_reads(world) if r.get("thumbnail")) == 2
    await sign_in(world.client, OTHER_DOCTOR)
    assert (await world.client.get(f"/reports/{photo}/thumb")).status == 404


async def later_visit(world: World, doctor_id: int, status: str) -> None:
    """The world's visit becomes a finished one last week; `doctor_id` sees the patient tomorrow."""

    def write(d) -> None:
        d.execute(
            "UPDATE visits SET status = 'completed', starts_at = starts_at - 9 * 86400,"
            " ends_at = ends_at - 9 * 86400 WHERE id = ?",
            [world.visit_id],
        )
        d.execute(
            "INSERT INTO visits (public_id, patient_id, doctor_id, department_id, starts_at, ends_at,"
            " status, fee_minor, currency, created, updated, call_nonce)"
            " SELECT 'later-visit', patient_id, ?, department_id, starts_at + 10 * 86400,"
            " ends_at + 10 * 86400, ?, fee_minor, currency, created, updated, 'n2' FROM visits WHERE id = ?",
            [doctor_id, status, world.visit_id],
        )

    world.db.write_sync(write)


@pytest.mark.parametrize(("status", "allowed"), [("confirmed", True), ("cancelled", False)])
async def test_a_doctor_treating_the_patient_later_reads_earlier_reports(world, status, allowed):
    report_id = await uploaded(world, three_page_pdf())
    await later_visit(world, world.other_doctor_id, status)
    await sign_in(world.client, OTHER_DOCTOR)
    paths = [
        f"/api/visits/{world.public_id}/reports",
        f"/api/reports/{report_id}/pages",
        f"/reports/{report_id}/pages/2",
        f"/reports/{report_id}/thumb",
    ]
    for path in paths:
        assert (await world.client.get(path)).status == (200 if allowed else 404), path
    # Never the other way round: the earlier visit's doctor does not read the later visit's reports.
    assert (await world.client.get("/api/visits/later-visit/reports")).status == 200
    await sign_in(world.client, DOCTOR)
    assert (await world.client.get("/api/visits/later-visit/reports")).status == 404


async def test_pages_past_the_byte_budget_are_refused(world, monkeypatch):
    report_id = await uploaded(world, three_page_pdf())
    monkeypatch.setattr(pages, "RENDER_MAX_BYTES", 20_000)  # a page of it is more
    await sign_in(world.client, DOCTOR)
    resp = await world.client.get(f"/api/reports/{report_id}/pages")
    assert resp.status == 415
    assert (await resp.json())["error"] == "pdf_too_large"
    # Nothing half-rendered is kept: only the refusal, so the next asking is answered at once.
    (entry,) = pages.cache_root(world.data_dir).iterdir()
    assert [p.name for p in entry.iterdir()] == ["meta.json"]
    assert json.loads((entry / "meta.json").read_text()) == {"refused": "too_large", "pages": 3}
    monkeypatch.setattr(pages, "RENDER_MAX_BYTES", 10**9)
    assert (await world.client.get(f"/api/reports/{report_id}/pages")).status == 415


async def test_the_cache_stays_bounded_and_the_sweep_removes_pages_of_gone_reports(world):
    first = await uploaded(world, three_page_pdf())
    second = await uploaded(world, handmade_pdf(2))
    await sign_in(world.client, DOCTOR)
    for report_id in (first, second):
        assert (await world.client.get(f"/api/reports/{report_id}/pages")).status == 200
    root = pages.cache_root(world.data_dir)
    first_dir, second_dir = sorted(root.iterdir(), key=lambda p: (p / "meta.json").stat().st_mtime)
    # Over the bound: the least recently shown report's pages go, the one just shown stays.
    assert pages.prune_cache(world.data_dir, 1, keep=second_dir.name) == 1
    assert not first_dir.exists() and second_dir.exists()
    assert (await world.client.get(f"/api/reports/{first}/pages")).status == 200  # rendered again

    # A report row gone without its cleanup (a crash): the sweep removes its pages and thumbnail.
    assert (await world.client.get(f"/reports/{second}/thumb")).status == 200
    world.db.write_sync(lambda d: d.execute("DELETE FROM reports WHERE id = ?", [second]))
    app = world.client.server.app
    result = await reports.converge_files(
        world.db, world.data_dir, app[uploads.IN_FLIGHT], grace_s=0, now=time.time() + 1
    )
    assert result.cache_removed == 2  # its pages and its thumbnail
    assert not second_dir.exists()
    assert len(list(root.iterdir())) == 1


async def test_the_worker_runs_under_its_memory_limit(world, monkeypatch):
    # The poster page renders at the real limit (above); under 48 MB its 6 MP bitmap cannot be
    # had, and the refusal is the ordinary one: the child fails, never the server.
    report_id = await uploaded(world, handmade_pdf(1, (14400, 14400)))
    monkeypatch.setattr(pages, "WORKER_MEMORY", 48 * 1024 * 1024)
    await sign_in(world.client, DOCTOR)
    resp = await world.client.get(f"/api/reports/{report_id}/pages")
    assert resp.status == 415
    assert (await resp.json())["error"] == "pdf_unreadable"
    monkeypatch.setattr(pages, "WORKER_MEMORY", 1024 * 1024 * 1024)
    stored = world.db.read_sync(lambda d: d.execute("SELECT stored_name FROM reports").fetchone()[0])
    pages.remove_cached(world.data_dir, stored)  # the refusal was kept; this test changed the limit
    assert (await world.client.get(f"/api/reports/{report_id}/pages")).status == 200
