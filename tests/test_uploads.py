"""Uploads refused for what they are, not what they claim; refused or aborted ones leave nothing."""

from __future__ import annotations

import asyncio
import io
import os
import time

import pytest
from PIL import Image

from consult.app import create_app
from consult.clinical import uploads
from tests.conftest import csrf_of
from tests.test_reports import (
    PATIENT,
    World,
    build_world,
    pdf_bytes,
    png_bytes,
    report_rows,
    sign_in,
    stored_files,
    upload,
)


@pytest.fixture
def world(client, settings, make_user):
    w = build_world(client, settings, make_user)
    yield w
    w.db.close()


def assert_nothing_left(world: World) -> None:
    assert report_rows(world) == []
    assert stored_files(world.data_dir) == []


@pytest.mark.locale("en")  # asserts English texts
async def test_exe_renamed_pdf_is_refused_by_content(world):
    token = await sign_in(world.client, PATIENT)
    exe = b"MZ\x90\x00\x03\x00\x00\x00\x04\x00\x00\x00\xff\xff" + os.urandom(4096)
    resp = await upload(world.client, world, token, exe, "report.pdf", "application/pdf")
    assert resp.status == 415
    body = await resp.json()
    assert body["error"] == "unsupported_type"
    assert "not a PDF, JPEG, PNG" in body["message"]
    assert_nothing_left(world)


async def test_pdf_header_without_a_pdf_body_is_refused(world):
    token = await sign_in(world.client, PATIENT)
    resp = await upload(world.client, world, token, b"%PDF-1.7\n<script>alert(1)</script>" * 10)
    assert resp.status == 415
    assert (await resp.json())["error"] == "damaged_file"
    assert_nothing_left(world)


async def test_truncated_png_is_refused(world):
    token = await sign_in(world.client, PATIENT)
    resp = await upload(world.client, world, token, png_bytes((300, 300))[:200], "x.png", "image/png")
    assert resp.status == 415
    assert_nothing_left(world)


@pytest.mark.locale("en")  # asserts English texts
async def test_empty_file_is_refused(world):
    token = await sign_in(world.client, PATIENT)
    resp = await upload(world.client, world, token, b"", "empty.pdf")
    assert resp.status == 400
    body = await resp.json()
    assert body["error"] == "empty_file"
    assert "empty" in body["message"]
    assert_nothing_left(world)


@pytest.mark.locale("en")  # asserts English texts
async def test_oversize_file_is_refused(aiohttp_client, make_settings, make_user):
    settings = make_settings(upload_max_mb=0.05)
    client = await aiohttp_client(create_app(settings))
    world = build_world(client, settings, make_user)
    token = await sign_in(client, PATIENT)
    big = pdf_bytes() + b"%" + os.urandom(80 * 1024) + b"\nstartxref\n0\n%%EOF\n"
    resp = await upload(client, world, token, big)
    assert resp.status == 413
    body = await resp.json()
    assert body["error"] == "file_too_large"
    assert "larger than 0.05 MB" in body["message"]
    assert_nothing_left(world)
    world.db.close()


async def test_oversize_file_is_refused_while_streaming(aiohttp_client, make_settings, make_user):
    """No Content-Length to refuse up front: the byte count stops it."""
    settings = make_settings(upload_max_mb=0.05)
    client = await aiohttp_client(create_app(settings))
    world = build_world(client, settings, make_user)
    token = await sign_in(client, PATIENT)
    boundary = "b0undary"

    async def body():
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.pdf"\r\n'
            "Content-Type: application/pdf\r\n\r\n%PDF-1.4\n"
        ).encode()
        for _ in range(20):
            yield os.urandom(16 * 1024)
        yield f"\r\n--{boundary}--\r\n".encode()

    resp = await client.post(
        f"/api/visits/{world.public_id}/reports",
        data=body(),
        headers={"X-CSRF-Token": token, "Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert resp.status == 413
    assert (await resp.json())["error"] == "file_too_large"
    assert_nothing_left(world)
    world.db.close()


@pytest.mark.locale("en")  # asserts English texts
async def test_visit_total_is_limited(aiohttp_client, make_settings, make_user):
    settings = make_settings(visit_upload_max_mb=0.004)  # ~4 KB: one small PNG fits, two do not
    client = await aiohttp_client(create_app(settings))
    world = build_world(client, settings, make_user)
    token = await sign_in(client, PATIENT)
    png = png_bytes((40, 40))
    assert (await upload(client, world, token, png, "a.png")).status == 201
    resp = await upload(client, world, token, pdf_bytes() + b" " * 3000, "b.pdf")
    assert resp.status == 413
    body = await resp.json()
    assert body["error"] == "visit_quota"
    assert "in total" in body["message"]
    assert len(report_rows(world)) == 1
    assert len(stored_files(world.data_dir)) == 1
    world.db.close()


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("../../../../etc/passwd.png", "passwd.png"),
        ("..\\..\\windows\\evil.png", "windowsevil.png"),  # the header parser unescapes "\\w"
        ("/abs/path/x\ty\u202e\u200b[31m.png", "xy[31m.png"),
        ("....", "report.png"),
        ("photo.exe", "photo.exe.png"),
    ],
)
async def test_path_traversal_names_are_stored_safely(world, name, shown):
    token = await sign_in(world.client, PATIENT)
    # Raw bytes, as a hostile client would send them (aiohttp's own client would escape them).
    boundary = "tr4versal"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + png_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    resp = await world.client.post(
        f"/api/visits/{world.public_id}/reports",
        data=body,
        headers={"X-CSRF-Token": token, "Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert resp.status == 201, await resp.text()
    assert (await resp.json())["report"]["name"] == shown
    (row,) = report_rows(world)
    assert row["display_name"] == shown
    root = (world.data_dir / "uploads").resolve()
    files = stored_files(world.data_dir)
    assert len(files) == 1
    assert files[0].resolve().parent.parent == root
    assert files[0].name == row["stored_name"].split("/")[1]
    # The server's own copies of web/static (bundles joined at start-up) live in cache/static.
    static_cache = (world.data_dir / "cache" / "static").resolve()
    outside = [
        p
        for p in world.data_dir.parent.rglob("*")
        if p.is_file() and root not in p.resolve().parents and static_cache not in p.resolve().parents
    ]
    expected = ("consult.db", "consult.db-wal", "consult.db-shm", "secrets.json")
    assert all(p.name in expected for p in outside), outside


async def test_control_characters_in_part_headers_are_refused(world):
    token = await sign_in(world.client, PATIENT)
    boundary = "ctl"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a\x00\x1b.png"\r\n\r\n'
        ).encode()
        + png_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    resp = await world.client.post(
        f"/api/visits/{world.public_id}/reports",
        data=body,
        headers={"X-CSRF-Token": token, "Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert resp.status == 400
    assert (await resp.json())["error"] == "bad_multipart"
    assert_nothing_left(world)


def test_display_name_is_limited():
    name = uploads.sanitize_display_name("a" * 300 + ".pdf")
    assert len(name) == 120
    assert name.endswith(".pdf")
    assert uploads.display_name_for("scan.jpeg", uploads.JPEG) == "scan.jpeg"
    assert uploads.display_name_for("IMG_1.HEIC", uploads.JPEG) == "IMG_1.jpg"
    assert uploads.display_name_for("a.pdf", uploads.PNG) == "a.png"
    assert uploads.sanitize_display_name("C:\\x\\..\\\u202eevil\x07.pdf") == "evil.pdf"
    with pytest.raises(ValueError):
        uploads.stored_path(uploads.Path("/tmp/x"), "../" + "a" * 64)


def jpeg_with_gps() -> bytes:
    img = Image.new("RGB", (80, 60), (10, 120, 200))
    exif = Image.Exif()
    exif[0x010F] = "SpyCam"  # Make
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    exif[0x8825] = {1: "N", 2: (31.0, 14.0, 5.0), 3: "E", 4: (121.0, 28.0, 9.0)}
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif, quality=95)
    return buf.getvalue()


async def test_exif_and_gps_are_stripped_from_photos(world):
    original = jpeg_with_gps()
    with Image.open(io.BytesIO(original)) as im:
        assert im.getexif().get_ifd(0x8825)  # the fixture really carries GPS
    token = await sign_in(world.client, PATIENT)
    resp = await upload(world.client, world, token, original, "IMG_0001.JPG", "image/jpeg")
    assert resp.status == 201, await resp.text()
    (row,) = report_rows(world)
    assert row["content_type"] == "image/jpeg"
    stored = (world.data_dir / "uploads" / row["stored_name"]).read_bytes()
    assert b"Exif" not in stored
    assert b"SpyCam" not in stored
    with Image.open(io.BytesIO(stored)) as im:
        assert dict(im.getexif()) == {}
        assert not im.getexif().get_ifd(0x8825)
        assert im.size == (60, 80)  # the orientation was applied to the pixels before dropping it


async def test_heic_photo_is_converted_to_jpeg(world):
    pillow_heif = pytest.importorskip("pillow_heif")
    pillow_heif.register_heif_opener()
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x8825] = {1: "N", 2: (31.0, 14.0, 5.0)}
    try:
        Image.new("RGB", (64, 64), (0, 200, 0)).save(buf, "HEIF", exif=exif.tobytes())
    except (KeyError, OSError, ValueError) as exc:  # a build without an HEVC encoder
        pytest.skip(f"cannot encode HEIF here: {exc}")
    token = await sign_in(world.client, PATIENT)
    resp = await upload(world.client, world, token, buf.getvalue(), "IMG_2.HEIC", "image/heic")
    assert resp.status == 201, await resp.text()
    (row,) = report_rows(world)
    assert row["content_type"] == "image/jpeg"
    assert row["display_name"] == "IMG_2.jpg"
    stored = (world.data_dir / "uploads" / row["stored_name"]).read_bytes()
    assert stored.startswith(b"\xff\xd8\xff")
    assert b"Exif" not in stored


async def test_aborted_upload_leaves_no_file_and_no_row(world):
    client = world.client
    token = await sign_in(client, PATIENT)
    await csrf_of(client, "/")
    host, port = client.server.host, client.server.port
    cookies = "; ".join(f"{c.key}={c.value}" for c in client.session.cookie_jar)
    boundary = "abortboundary"
    head = (
        f"POST /api/visits/{world.public_id}/reports HTTP/1.1\r\n"
        f"Host: {host}:{port}\r\n"
        f"Cookie: {cookies}\r\n"
        f"X-CSRF-Token: {token}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {5 * 1024 * 1024}\r\n\r\n"
    ).encode()
    part = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.pdf"\r\n'
        "Content-Type: application/pdf\r\n\r\n%PDF-1.4\n"
    ).encode()
    _reader, writer = await asyncio.open_connection(host, port)
    writer.write(head + part + os.urandom(1536 * 1024))
    await writer.drain()
    tmp = world.data_dir / "uploads" / "tmp"
    deadline = time.monotonic() + 5
    while not (tmp.exists() and any(tmp.iterdir())):  # the server is mid-body, with a temp file
        assert time.monotonic() < deadline, "the upload never started"
        await asyncio.sleep(0.02)
    writer.close()
    await writer.wait_closed()
    deadline = time.monotonic() + 5
    while stored_files(world.data_dir):
        assert time.monotonic() < deadline, f"left behind: {stored_files(world.data_dir)}"
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)
    assert_nothing_left(world)
    # The server is still fine afterwards.
    resp = await upload(client, world, token, pdf_bytes())
    assert resp.status == 201


def test_sweep_removes_only_abandoned_temp_files(tmp_path):
    tmp = uploads.tmp_dir(tmp_path)
    tmp.mkdir(parents=True)
    old, fresh = tmp / "old.part", tmp / "fresh.part"
    old.write_bytes(b"x")
    fresh.write_bytes(b"y")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert uploads.sweep_tmp(tmp_path) == 1
    assert [p.name for p in tmp.iterdir()] == ["fresh.part"]


async def test_palette_png_keeps_transparency(world):
    img = Image.new("P", (8, 8), 0)
    img.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    buf = io.BytesIO()
    img.save(buf, "PNG", transparency=0)
    token = await sign_in(world.client, PATIENT)
    assert (await upload(world.client, world, token, buf.getvalue(), "t.png", "image/png")).status == 201
    (row,) = report_rows(world)
    with Image.open(world.data_dir / "uploads" / row["stored_name"]) as im:
        assert im.info.get("transparency") == 0
