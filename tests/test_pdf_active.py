"""PDFs that would do something when opened are refused: crafted files, escaped names, names
hidden in compressed object streams; ordinary PDFs still pass. Staff get reports as attachments
unless the consult room's viewer embeds them."""

from __future__ import annotations

import zlib

import aiohttp
import pytest

from consult.clinical import uploads
from consult.core.errors import UnsupportedMediaType
from tests.test_reports import DOCTOR, PATIENT, World, build_world, pdf_bytes, sign_in, upload


def make_pdf(
    catalog_extra: bytes = b"", *, extra_objects: list[bytes] = (), objstm: bytes | None = None
) -> bytes:
    """A small, well-formed PDF: catalog (1), pages (2), page (3), then ``extra_objects`` from 4.

    With ``objstm``, the catalog is not written plainly but packed into an object stream whose
    dictionary is ``objstm`` (its body is zlib-compressed when ``/FlateDecode`` is in it)."""
    catalog = b"<< /Type /Catalog /Pages 2 0 R " + catalog_extra + b" >>"
    bodies: list[bytes] = []
    if objstm is None:
        bodies.append(catalog)
    else:
        bodies.append(b"<< /Type /Catalog /Pages 2 0 R >>")  # replaced below by the packed one
    bodies.append(b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>")
    bodies.append(b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 200] >>")
    bodies.extend(extra_objects)
    if objstm is not None:
        # Object 1 lives in the object stream (number 4 + len(extra_objects)).
        bodies[0] = b"null"
        packed = b"1 0 " + catalog
        data = zlib.compress(packed) if b"/FlateDecode" in objstm else packed
        bodies.append(
            b"<< /Type /ObjStm /N 1 /First 4 "
            + objstm
            + b" /Length %d >>\nstream\n" % len(data)
            + data
            + b"\nendstream"
        )
    out = bytearray(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(bodies, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(bodies) + 1)
    for offset in offsets:
        out += b"%010d 00000 n \n" % offset
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(bodies) + 1, xref)
    return bytes(out)


JS_ACTION = b"/OpenAction << /S /JavaScript /JS (app.alert\\(1\\)) >>"

HOSTILE = {
    "openaction-javascript": make_pdf(JS_ACTION),
    "hex-escaped-names": make_pdf(b"/O#70enAction << /S /J#61vaScript /J#53 (app.alert\\(1\\)) >>"),
    "javascript-name-tree": make_pdf(b"/Names << /JavaScript 4 0 R >>", extra_objects=[b"<< /Names [] >>"]),
    "launch": make_pdf(b"/OpenAction << /S /Launch /F (cmd.exe) >>"),
    "openaction-by-reference": make_pdf(
        b"/OpenAction 4 0 R", extra_objects=[b"<< /S /GoTo /D [3 0 R /Fit] >>"]
    ),
    "additional-actions": make_pdf(b"/AA << /WC << /S /URI /URI (http://x.example/) >> >>"),
    "embedded-files": make_pdf(b"/Names << /EmbeddedFiles << /Names [] >> >>"),
    "embedded-file-stream": make_pdf(
        extra_objects=[b"<< /Type /EmbeddedFile /Length 2 >>\nstream\nMZ\nendstream"]
    ),
    "richmedia": make_pdf(extra_objects=[b"<< /Type /Annot /Subtype /RichMedia >>"]),
    "xfa": make_pdf(b"/AcroForm << /Fields [] /XFA 4 0 R >>", extra_objects=[b"<< >>"]),
    "in-a-compressed-object-stream": make_pdf(
        b"/OpenAction << /S /Launch /F (cmd.exe) >>", objstm=b"/Filter /FlateDecode"
    ),
    "in-an-escaped-compressed-object-stream": make_pdf(JS_ACTION, objstm=b"/Filter /Fl#61teDecode"),
    "in-a-plain-object-stream": make_pdf(JS_ACTION, objstm=b""),
}

UNINSPECTABLE = {
    "object-stream-lzw": make_pdf(objstm=b"/Filter /LZWDecode"),
    "object-stream-two-filters": make_pdf(JS_ACTION, objstm=b"/Filter [/ASCIIHexDecode /FlateDecode]"),
    "object-stream-not-zlib": make_pdf(objstm=b"/Filter /FlateDecode").replace(b"stream\nx", b"stream\n\x00"),
}


def test_the_crafted_files_hide_what_they_should() -> None:
    packed = HOSTILE["in-a-compressed-object-stream"]
    assert b"Launch" not in packed and b"OpenAction" not in packed
    assert b"JavaScript" not in HOSTILE["hex-escaped-names"]


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_active_content_is_refused(name: str) -> None:
    with pytest.raises(UnsupportedMediaType) as info:
        uploads.check_pdf_active_content(HOSTILE[name])
    assert info.value.code == "pdf_active_content"


@pytest.mark.parametrize("name", sorted(UNINSPECTABLE))
def test_object_streams_we_cannot_read_are_refused(name: str) -> None:
    with pytest.raises(UnsupportedMediaType) as info:
        uploads.check_pdf_active_content(UNINSPECTABLE[name])
    assert info.value.code == "pdf_uninspectable"


def test_a_zlib_bomb_in_an_object_stream_is_refused_within_the_budget(monkeypatch) -> None:
    monkeypatch.setattr(uploads, "PDF_INFLATE_BUDGET", 1024 * 1024)
    pdf = make_pdf(objstm=b"/Filter /FlateDecode")
    bomb = zlib.compress(b"1 0 << >> " + b" " * (50 * 1024 * 1024))
    start = pdf.index(b"stream\n") + len(b"stream\n")
    end = pdf.index(b"\nendstream")
    with pytest.raises(UnsupportedMediaType) as info:
        uploads.check_pdf_active_content(pdf[:start] + bomb + pdf[end:])
    assert info.value.code == "pdf_uninspectable"


@pytest.mark.parametrize(
    "pdf",
    [
        pdf_bytes(),  # Pillow's
        make_pdf(),
        make_pdf(b"/OpenAction [3 0 R /FitH null]"),  # "open at page 1": what Word writes
        make_pdf(objstm=b"/Filter /FlateDecode"),  # a clean object stream
        # Binary stream data that happens to spell a short name is not a dictionary.
        make_pdf(extra_objects=[b"<< /Length 12 >>\nstream\n\x01/JS \x02/AA \x03\nendstream"]),
    ],
    ids=["pillow", "minimal", "open-at-page", "clean-object-stream", "short-names-in-binary"],
)
def test_ordinary_pdfs_pass(pdf: bytes) -> None:
    uploads.check_pdf_active_content(pdf)


# -- through the app --------------------------------------------------------------------------


@pytest.fixture
def world(client, settings, make_user):
    w = build_world(client, settings, make_user)
    yield w
    w.db.close()


async def test_upload_of_a_scripted_pdf_is_refused_in_chinese_and_leaves_nothing(world: World) -> None:
    token = await sign_in(world.client, PATIENT)
    form = aiohttp.FormData()
    form.add_field(
        "file", HOSTILE["in-a-compressed-object-stream"], filename="报告.pdf", content_type="application/pdf"
    )
    resp = await world.client.post(
        f"/api/visits/{world.public_id}/reports",
        data=form,
        headers={"X-CSRF-Token": token, "Accept-Language": "zh-CN"},
    )
    assert resp.status == 415
    body = await resp.json()
    assert body["error"] == "pdf_active_content"
    assert "PDF" in body["message"] and "脚本" in body["message"], body["message"]
    rows = world.db.read_sync(lambda d: d.execute("SELECT count(*) FROM reports").fetchone()[0])
    assert rows == 0
    leftovers = [p for p in (world.data_dir / "uploads").rglob("*") if p.is_file()]
    assert leftovers == []
    # English when the browser asks for it.
    resp = await upload(world.client, world, token, HOSTILE["hex-escaped-names"])
    assert "active content" in (await resp.json())["message"]


async def test_staff_get_reports_as_attachments_except_in_the_viewer(world: World) -> None:
    token = await sign_in(world.client, PATIENT)
    resp = await upload(world.client, world, token, pdf_bytes())
    assert resp.status == 201, await resp.text()
    report_id = (await resp.json())["report"]["id"]
    # The patient's own file still opens in the browser.
    resp = await world.client.get(f"/reports/{report_id}")
    assert resp.headers["Content-Disposition"].startswith("inline;")
    await sign_in(world.client, DOCTOR)
    # A doctor following a link (a new tab, a typed address) gets a download...
    for dest in (None, "document", "embed", "object"):
        headers = {"Sec-Fetch-Dest": dest} if dest else {}
        resp = await world.client.get(f"/reports/{report_id}", headers=headers)
        assert resp.status == 200
        assert resp.headers["Content-Disposition"].startswith("attachment;"), dest
    # ...and sees it inline only in the consult room's viewer, an iframe.
    resp = await world.client.get(f"/reports/{report_id}", headers={"Sec-Fetch-Dest": "iframe"})
    assert resp.headers["Content-Disposition"].startswith("inline;")
    assert resp.headers["Content-Security-Policy"] == "sandbox"
