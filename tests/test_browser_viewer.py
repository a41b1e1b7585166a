"""The consult room's report viewer in real Chromium (doctor's 1366x800 PC, zh_CN).

Reports are made the way uploads make them (`uploads.store_sync`: typed by content, photos
re-encoded with their EXIF orientation applied) from a phone-sized photo (3024x4032), the same
photo taken sideways with an EXIF orientation tag, and a 3-page PDF; the PDF is rendered to
images by the server. The test checks what the doctor sees: the drawn rectangle of the image
against the viewer's panel, while the video stays on screen beside it.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import re
import time

import pytest
from PIL import Image, ImageDraw
from playwright.async_api import BrowserContext, Page, expect

from consult.clinical import uploads
from tests.call_helpers import SeededVisit, seed_visit
from tests.db_helpers import insert, write
from tests.harness.browser import (
    PageRecorder,
    assert_only_local_requests,
    save_screenshot,
)
from tests.harness.server import ConsultServer
from tests.test_browser_call import prepare_call, sign_in_doctor

pytestmark = pytest.mark.browser

TEST_TIMEOUT = 180
WAIT_MS = 30_000

GEOMETRY_JS = """
() => {
  const v = document.querySelector("[data-testid=report-viewer]");
  const box = (el) => {
    const r = el.getBoundingClientRect();
    return {x: r.x, y: r.y, w: r.width, h: r.height};
  };
  const img = v.querySelector("[data-viewer-image]");
  return {
    stage: box(v.querySelector("[data-viewer-stage]")),
    img: box(img),
    video: box(document.querySelector("[data-testid=remote-video]")),
    natural: [img.naturalWidth, img.naturalHeight],
    src: img.getAttribute("src"),
    loaded: v.dataset.loaded || null,
    rotation: v.dataset.rotation || null,
    fullscreen: document.fullscreenElement === v,
  };
}
"""


@pytest.fixture
def doctor_context(zh_desktop: BrowserContext) -> BrowserContext:
    """The doctor's PC with Chromium set to zh-CN, as the hospital's doctors use it (the harness's)."""
    return zh_desktop


# The colour at the top middle of the image the viewer shows (same origin: a canvas may read it).
TOP_PIXEL_JS = """
() => {
  const img = document.querySelector("[data-viewer-image]");
  const canvas = document.createElement("canvas");
  canvas.width = img.naturalWidth;
  canvas.height = img.naturalHeight;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(img, 0, 0);
  return Array.from(ctx.getImageData(img.naturalWidth / 2, 20, 1, 1).data.slice(0, 3));
}
"""


def is_red(rgb: list[int]) -> bool:
    return rgb[0] > 150 and rgb[1] < 90 and rgb[2] < 90


def photo(size: tuple[int, int], orientation: int | None = None) -> bytes:
    """A phone photo: white paper, a red band at the top edge and a blue one at the bottom.
    With `orientation` 6 the pixels are stored turned a quarter left, as a phone held upright
    stores them, and the EXIF tag says to turn them a quarter right to show them."""
    im = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(im)
    w, h = size
    draw.rectangle([0, 0, w - 1, h // 10], fill=(200, 30, 30))
    draw.rectangle([0, h - h // 10, w - 1, h - 1], fill=(30, 30, 200))
    for y in range(h // 5, h - h // 5, h // 20):
        draw.rectangle([w // 10, y, w - w // 10, y + h // 80], fill=(60, 60, 60))
    buf = io.BytesIO()
    if orientation == 6:
        im = im.rotate(90, expand=True)
    if orientation:
        exif = Image.Exif()
        exif[0x0112] = orientation
        im.save(buf, "JPEG", quality=80, exif=exif.tobytes())
    else:
        im.save(buf, "JPEG", quality=80)
    return buf.getvalue()


def three_page_pdf() -> bytes:
    pages = [Image.new("RGB", (595, 842), c) for c in ("white", (230, 240, 255), (255, 240, 230))]
    for n, page in enumerate(pages, start=1):
        ImageDraw.Draw(page).rectangle([60, 60 + 80 * n, 535, 100 + 80 * n], fill=(40, 40, 40))
    buf = io.BytesIO()
    pages[0].save(buf, "PDF", save_all=True, append_images=pages[1:])
    return buf.getvalue()


def store_report(server: ConsultServer, visit: SeededVisit, data: bytes, name: str) -> int:
    """A report as an upload leaves it: the file through `uploads.store_sync`, then its row."""
    tmp = uploads.tmp_dir(server.data_dir)
    tmp.mkdir(parents=True, exist_ok=True)
    received = tmp / f"{uploads.new_token()}.part"
    received.write_bytes(data)
    stored = uploads.store_sync(uploads.Received(received, len(data)), server.data_dir)
    assert hashlib.sha256(stored.path.read_bytes()).hexdigest() == stored.sha256
    return write(
        server,
        lambda db: insert(
            db,
            "INSERT INTO reports (visit_id, owner_id, display_name, stored_name, content_type, size, sha256,"
            " created) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                visit.id,
                visit.patient_id,
                name,
                stored.stored_name,
                stored.content_type,
                stored.size,
                stored.sha256,
                time.time(),
            ],
        ),
    )


async def geometry(page: Page) -> dict:
    return await page.evaluate(GEOMETRY_JS)


async def wait_loaded(page: Page, what: str, src: re.Pattern[str] | None = None) -> dict:
    """Poll until the viewer shows `what` loaded (its page number), with `src` when given."""
    deadline = time.monotonic() + WAIT_MS / 1000
    g: dict = {}
    while time.monotonic() < deadline:
        g = await geometry(page)
        if g["loaded"] == what and (src is None or (g["src"] and src.search(g["src"]))):
            await page.evaluate("() => new Promise((r) => requestAnimationFrame(() => r()))")
            return await geometry(page)
        await asyncio.sleep(0.1)
    raise AssertionError(f"viewer never showed {what} {src}: {g}")


def inside(img: dict, stage: dict, slack: float = 1.5) -> bool:
    return (
        img["x"] >= stage["x"] - slack
        and img["y"] >= stage["y"] - slack
        and img["x"] + img["w"] <= stage["x"] + stage["w"] + slack
        and img["y"] + img["h"] <= stage["y"] + stage["h"] + slack
    )


def fitted(g: dict) -> bool:
    """Whole image within the panel, and filling it in one dimension."""
    img, stage = g["img"], g["stage"]
    return inside(img, stage) and (img["w"] >= 0.97 * stage["w"] or img["h"] >= 0.97 * stage["h"])


async def test_photos_fit_zoom_rotate_and_a_pdf_pages_through(
    consult_server: ConsultServer, app_origin: str, doctor_page: Page, pages: PageRecorder
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        call = await asyncio.to_thread(prepare_call, consult_server)
        earlier = await asyncio.to_thread(
            seed_visit,
            consult_server,
            doctor_id=call.visit.doctor_id,
            patient_id=call.visit.patient_id,
            starts_in_s=-30 * 86400,
            status="completed",
        )
        upright = await asyncio.to_thread(
            store_report, consult_server, call.visit, photo((3024, 4032)), "血常规 photo.jpg"
        )
        # Taken with the phone held upright: pixels stored sideways, EXIF says "rotate 90° CW".
        taken = photo((3024, 4032), orientation=6)
        assert Image.open(io.BytesIO(taken)).size == (4032, 3024)
        sideways = await asyncio.to_thread(store_report, consult_server, call.visit, taken, "肝功能.jpg")
        pdf = await asyncio.to_thread(
            store_report, consult_server, call.visit, three_page_pdf(), "CT 报告.pdf"
        )
        old = await asyncio.to_thread(
            store_report, consult_server, earlier, photo((3024, 4032)), "上次 photo.jpg"
        )
        # Passes the upload's checks, but no reader can open it.
        broken = b"%PDF-1.7\n1 0 obj\n<< /Type /Catalog /Pages 9 0 R\nstartxref\n999999\n%%EOF\n"
        await asyncio.to_thread(store_report, consult_server, earlier, broken, "坏的.pdf")
        await sign_in_doctor(doctor_page, app_origin)
        await doctor_page.goto(call.room_url)
        items = doctor_page.get_by_test_id("report-item")
        await expect(items).to_have_count(3, timeout=WAIT_MS)

        # Opened: the whole 3024x4032 photo is visible, fitted to the panel; the video beside it.
        await items.first.get_by_role("link", name=re.compile("血常规")).click()
        viewer = doctor_page.get_by_test_id("report-viewer")
        await expect(viewer).to_be_visible()
        g = await wait_loaded(doctor_page, "1", re.compile(rf"/reports/{upright}$"))
        assert g["natural"] == [3024, 4032]
        assert fitted(g), g
        assert g["img"]["h"] > g["img"]["w"]  # portrait, as taken
        assert is_red(await doctor_page.evaluate(TOP_PIXEL_JS))
        video = g["video"]
        assert video["w"] >= 300 and video["h"] >= 150, video  # the call stays on screen...
        assert video["x"] + video["w"] <= g["stage"]["x"], (video, g["stage"])  # ...beside the viewer
        assert video["y"] + video["h"] / 2 < 800
        await expect(doctor_page.get_by_test_id("viewer-title")).to_have_text("血常规 photo.jpg")
        await expect(doctor_page.get_by_test_id("viewer-zoom-in")).to_have_attribute("aria-label", "放大")
        await expect(doctor_page.get_by_test_id("viewer-keys")).to_contain_text("快捷键")
        assert len(doctor_page.context.pages) == 1  # in the room, not a new tab
        await save_screenshot(doctor_page, "viewer-photo-fitted")

        # Zoom: the button, the wheel and the key each draw it bigger; 0 fits it again.
        fit_w = g["img"]["w"]
        await doctor_page.get_by_test_id("viewer-zoom-in").click()
        g = await geometry(doctor_page)
        assert g["img"]["w"] > 1.2 * fit_w, g
        stage = g["stage"]
        await doctor_page.mouse.move(stage["x"] + stage["w"] / 2, stage["y"] + stage["h"] / 2)
        await doctor_page.mouse.wheel(0, -200)
        g2 = await until(doctor_page, lambda now: now["img"]["w"] != g["img"]["w"])
        assert g2["img"]["w"] > g["img"]["w"], (g, g2)
        await doctor_page.keyboard.press("+")
        g3 = await geometry(doctor_page)
        assert g3["img"]["w"] > g2["img"]["w"]
        # Pan: dragging moves the drawn image by the drag.
        x0, y0 = stage["x"] + 100, stage["y"] + 100
        await doctor_page.mouse.move(x0, y0)
        await doctor_page.mouse.down()
        await doctor_page.mouse.move(x0 + 60, y0 + 40, steps=4)
        await doctor_page.mouse.up()
        g4 = await geometry(doctor_page)
        assert abs(g4["img"]["x"] - g3["img"]["x"] - 60) < 2 and abs(g4["img"]["y"] - g3["img"]["y"] - 40) < 2
        await save_screenshot(doctor_page, "viewer-photo-zoomed")
        await doctor_page.keyboard.press("0")
        g = await geometry(doctor_page)
        assert fitted(g) and abs(g["img"]["w"] - fit_w) < 1.5, g

        # Rotate 90°: now landscape, still whole and fitted; R turns it again.
        await doctor_page.get_by_test_id("viewer-rotate").click()
        g = await geometry(doctor_page)
        assert g["rotation"] == "90"
        assert g["img"]["w"] > g["img"]["h"], g
        assert fitted(g), g
        await save_screenshot(doctor_page, "viewer-photo-rotated")
        await doctor_page.keyboard.press("r")
        g = await geometry(doctor_page)
        assert g["rotation"] == "180" and g["img"]["h"] > g["img"]["w"] and fitted(g)

        # Full screen (Fullscreen API on the viewer), fitted again to the bigger stage; F leaves.
        await doctor_page.keyboard.press("f")
        await until(doctor_page, lambda now: now["fullscreen"] and now["stage"]["w"] > 1300 and fitted(now))
        await save_screenshot(doctor_page, "viewer-fullscreen")
        await doctor_page.keyboard.press("f")
        await until(doctor_page, lambda now: not now["fullscreen"] and fitted(now))

        # Thumbnails: the sideways photo (EXIF orientation 6) shows upright and fitted.
        thumbs = doctor_page.get_by_test_id("viewer-thumb")
        await expect(thumbs).to_have_count(3)
        await thumbs.nth(1).click()
        g = await wait_loaded(doctor_page, "1", re.compile(rf"/reports/{sideways}$"))
        assert g["natural"] == [3024, 4032], g
        assert g["rotation"] == "0" and g["img"]["h"] > g["img"]["w"] and fitted(g), g
        assert is_red(await doctor_page.evaluate(TOP_PIXEL_JS))  # upright: the red band on top
        await expect(thumbs.nth(1)).to_have_attribute("aria-current", "true")

        # The PDF, rendered by the server: page 1 of 3, then 2 (button), then 3 (key).
        await doctor_page.keyboard.press("]")
        g = await wait_loaded(doctor_page, "1", re.compile(rf"/reports/{pdf}/pages/1$"))
        label = doctor_page.get_by_test_id("viewer-page")
        await expect(label).to_have_text("第 1 / 3 页")
        assert fitted(g), g
        await expect(doctor_page.get_by_test_id("viewer-prev-page")).to_be_disabled()
        await doctor_page.get_by_test_id("viewer-next-page").click()
        await wait_loaded(doctor_page, "2", re.compile(rf"/reports/{pdf}/pages/2$"))
        await expect(label).to_have_text("第 2 / 3 页")
        await doctor_page.keyboard.press("ArrowRight")
        g = await wait_loaded(doctor_page, "3", re.compile(rf"/reports/{pdf}/pages/3$"))
        await expect(label).to_have_text("第 3 / 3 页")
        await expect(doctor_page.get_by_test_id("viewer-next-page")).to_be_disabled()
        assert fitted(g), g
        await save_screenshot(doctor_page, "viewer-pdf-page-3")
        await doctor_page.keyboard.press("PageUp")
        await wait_loaded(doctor_page, "2", re.compile(rf"/reports/{pdf}/pages/2$"))
        # A rotation chosen for a PDF (a landscape table) stays while paging through it.
        await doctor_page.keyboard.press("r")
        await doctor_page.keyboard.press("PageDown")
        g = await wait_loaded(doctor_page, "3", re.compile(rf"/reports/{pdf}/pages/3$"))
        assert g["rotation"] == "90" and g["img"]["w"] > g["img"]["h"] and fitted(g), g

        # An earlier visit's reports from the same panel.
        await doctor_page.get_by_test_id("viewer-visit").select_option(index=1)
        await expect(thumbs).to_have_count(2, timeout=WAIT_MS)
        g = await wait_loaded(doctor_page, "1", re.compile(rf"/reports/{old}$"))
        await expect(doctor_page.get_by_test_id("viewer-title")).to_have_text("上次 photo.jpg")
        assert g["rotation"] == "0" and fitted(g), g
        # A PDF the server cannot render: its clear message in the viewer, and the room goes on.
        await doctor_page.keyboard.press("]")
        await expect(doctor_page.get_by_test_id("viewer-status")).to_have_text(
            "无法读取此 PDF。请患者重新上传，或下载后查看。", timeout=WAIT_MS
        )
        await expect(doctor_page.get_by_test_id("viewer-image")).to_be_hidden()
        await save_screenshot(doctor_page, "viewer-pdf-unreadable")
        await doctor_page.keyboard.press("[")
        await wait_loaded(doctor_page, "1", re.compile(rf"/reports/{old}$"))

        await doctor_page.get_by_test_id("viewer-close").click()
        await expect(viewer).to_be_hidden()
        await expect(doctor_page.get_by_test_id("reports-list")).to_be_visible()

        # From the earlier visits tab: "view its reports" opens that visit's in the viewer.
        await doctor_page.get_by_test_id("tab-earlier").click()
        await doctor_page.get_by_test_id("earlier-reports").click()
        await expect(doctor_page.get_by_test_id("panel-reports")).to_be_visible()
        await wait_loaded(doctor_page, "1", re.compile(rf"/reports/{old}$"))
        await expect(thumbs).to_have_count(2)
        await doctor_page.keyboard.press("Escape")
        await expect(viewer).to_be_hidden()
        assert_only_local_requests(pages, app_origin)
        log = pages.log(doctor_page)
        assert not log.errors, log.errors
        assert not [line for line in log.console if "Content Security Policy" in line], log.console


async def until(page: Page, ok, timeout_s: float = WAIT_MS / 1000) -> dict:
    """Poll the viewer's geometry until `ok(geometry)`; return it."""
    deadline = time.monotonic() + timeout_s
    g: dict = {}
    while time.monotonic() < deadline:
        g = await geometry(page)
        if ok(g):
            return g
        await asyncio.sleep(0.1)
    raise AssertionError(f"viewer never reached the expected state: {g}")
