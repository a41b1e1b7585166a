"""Issue 3 in a real browser: the patient's booking journey on a phone, in Chinese.

A new patient registers through the form, picks a department, a doctor and a slot, uploads a
PDF and a photo (the progress bar moves), pays on the simulator gateway and sees the confirmed
visit with its QR code and call link; then the visit's doctor, on a desktop, sees the visit on
the clinic page, opens it and opens the reports. No page may ask another host for anything or
log a console error.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import random
import re
from collections.abc import AsyncIterator

import pytest
from PIL import Image
from playwright.async_api import Browser, BrowserContext, Page, expect

from tests.account_helpers import texted_code
from tests.harness.browser import PATIENT_CONTEXT, PageRecorder, assert_only_local_requests
from tests.harness.fixtures import FailureArtifacts, _context
from tests.harness.server import ConsultServer

TEST_TIMEOUT = 60
WAIT_MS = 15_000
MB = 1024 * 1024

PATIENT_NAME = "李小红"
PATIENT_PHONE = "13912345678"
PATIENT_PASSWORD = "Xiaohong-2024-follow"
DOCTOR_LOGIN = "dr.wang"  # the only doctor of the demo's cardiology department
DOCTOR_NAME = "王玉燕"
DOCTOR_PASSWORD = "Doctor-browser-pass-2024"


def patient_code(server: ConsultServer) -> str:
    return texted_code(server, PATIENT_PHONE)


# -- test files ----------------------------------------------------------------------------------


def make_pdf(approx_size: int, seed: int = 1) -> bytes:
    """A valid one-page PDF: a line of text and an uncompressed RGB image of random pixels,
    so that the file is about `approx_size` bytes (xref offsets computed, ends in %%EOF)."""
    side = int((approx_size / 3) ** 0.5)
    pixels = random.Random(seed).randbytes(side * side * 3)
    content = b"q 400 0 0 400 97 300 cm /Im1 Do Q BT /F1 18 Tf 72 760 Td (Blood test report) Tj ET"
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] /Contents 5 0 R"
        b" /Resources << /XObject << /Im1 4 0 R >> /Font << /F1 6 0 R >> >> >>",
        b"<< /Type /XObject /Subtype /Image /Width %d /Height %d /ColorSpace /DeviceRGB"
        b" /BitsPerComponent 8 /Length %d >>\nstream\n" % (side, side, len(pixels)) + pixels + b"\nendstream",
        b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def make_jpeg(side: int = 1100, seed: int = 2) -> bytes:
    """A real camera-sized JPEG: random pixels compress badly, so it is a few MB."""
    image = Image.frombytes("RGB", (side, side), random.Random(seed).randbytes(side * side * 3))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=92)
    return buffer.getvalue()


# -- browser helpers -----------------------------------------------------------------------------


@pytest.fixture
async def zh_patient_context(
    browser: Browser, pages: PageRecorder, failure_artifacts: FailureArtifacts
) -> AsyncIterator[BrowserContext]:
    """The phone context (390x844, touch) of a browser set to Chinese (Accept-Language zh-CN)."""
    options = {**PATIENT_CONTEXT, "locale": "zh-CN"}
    async with _context(browser, pages, failure_artifacts, "patient", options) as context:
        yield context


def console_errors(pages: PageRecorder) -> list[str]:
    found = []
    for log in pages.logs:
        found += [f"{log.name}: {line}" for line in log.console if line.startswith("[error]")]
        found += [f"{log.name}: {e}" for e in log.errors]
    return found


# Records the values each upload progress bar takes, as {bar number: [[value, max], ...]}
# (a MutationObserver on the value attribute, plus polling in case two updates fall between
# observer callbacks).
RECORD_PROGRESS = """() => {
  const box = document.querySelector("[data-reports-progress]");
  const numbers = new WeakMap();
  const seen = window.__progressValues = {};
  const record = () => {
    for (const bar of box.querySelectorAll("progress")) {
      if (!numbers.has(bar)) numbers.set(bar, Object.keys(seen).length);
      const values = seen[numbers.get(bar)] ||= [];
      const last = values[values.length - 1];
      if (!last || last[0] !== bar.value || last[1] !== bar.max) values.push([bar.value, bar.max]);
    }
  };
  new MutationObserver(record).observe(box, {subtree: true, childList: true, attributes: true});
  window.__progressTimer = setInterval(record, 5);
}"""


async def upload_reports(page: Page, files: list[dict]) -> dict[str, list[list[float]]]:
    """Choose `files` in the panel's file input; wait until all are listed; the bars' values."""
    await page.locator("[data-reports-upload]").wait_for(state="visible", timeout=WAIT_MS)
    await page.evaluate(RECORD_PROGRESS)
    await page.get_by_test_id("reports-file").set_input_files(files)
    await expect(page.get_by_test_id("report-item")).to_have_count(len(files), timeout=30_000)
    assert await page.get_by_test_id("upload-error").count() == 0
    return await page.evaluate("clearInterval(window.__progressTimer), window.__progressValues")


async def slow_uplink(context: BrowserContext, page: Page, bytes_per_s: int) -> None:
    """A phone's uplink (DevTools network emulation) so that the upload takes a visible while."""
    cdp = await context.new_cdp_session(page)
    await cdp.send(
        "Network.emulateNetworkConditions",
        {"offline": False, "latency": 20, "downloadThroughput": -1, "uploadThroughput": bytes_per_s},
    )


# -- the journey ---------------------------------------------------------------------------------


async def test_booking_journey_on_phone_in_chinese(
    consult_server: ConsultServer,
    app_origin: str,
    zh_patient_context: BrowserContext,
    doctor_context: BrowserContext,
    pages: PageRecorder,
) -> None:
    pdf = make_pdf(2 * MB)
    photo = make_jpeg()
    assert 1 * MB < len(pdf) < 3 * MB and 1 * MB < len(photo) < 5 * MB
    async with asyncio.timeout(TEST_TIMEOUT):
        await asyncio.to_thread(
            consult_server.cli, "user", "passwd", DOCTOR_LOGIN, "--password", DOCTOR_PASSWORD
        )
        page = await pages.new_page(zh_patient_context, "patient")

        # -- register through the form ------------------------------------------------------
        await page.goto(app_origin + "/")
        assert await page.locator("html").get_attribute("lang") == "zh-CN"
        await page.locator("main").get_by_role("link", name="注册账户").tap()
        await page.wait_for_url(app_origin + "/register")
        form = page.locator("main form[action='/register']")
        await form.locator("input[name=name]").fill(PATIENT_NAME)
        await form.locator("input[name=phone]").fill(PATIENT_PHONE)
        await form.locator("input[name=password]").fill(PATIENT_PASSWORD)
        await form.locator("input[name=password2]").fill(PATIENT_PASSWORD)
        await form.locator("button[type=submit]").tap()
        # The number is confirmed by a code texted to it: the outbox stands in for the gateway.
        await page.wait_for_url(app_origin + "/register/verify")
        assert "139 1234 5678" in await page.locator("main").inner_text()
        await expect(page.get_by_test_id("resend")).to_be_disabled()  # counting down
        await page.get_by_test_id("code").fill(await asyncio.to_thread(patient_code, consult_server))
        await page.locator("main form[action='/register/verify'] button[type=submit]").tap()
        await page.wait_for_url(app_origin + "/patient")
        assert await page.get_by_test_id("home-title").inner_text() == "我的问诊"
        assert PATIENT_NAME in await page.locator("main").inner_text()

        # -- department → doctor → slot -----------------------------------------------------
        await page.get_by_test_id("book").tap()
        await page.wait_for_url(app_origin + "/book")
        assert "选择科室" in await page.locator("main h1").inner_text()
        await page.get_by_test_id("department-cardiology").tap()
        await page.wait_for_url(re.compile(r"/book/\d+$"))
        assert await page.locator("main h1").inner_text() == "心血管内科"
        doctor_card = page.locator("[data-testid^='doctor-']", has_text=DOCTOR_NAME)
        await doctor_card.locator("a.choice").tap()
        await page.wait_for_url(re.compile(r"/book/\d+/doctors/\d+$"))
        assert "第 3 步，共 3 步" in await page.locator("main").inner_text()
        slot = page.locator("[data-testid=slots] button.slot:not([disabled])").first
        slot_label = (await slot.inner_text()).split()[0]  # the time, without a "no changes" mark
        await slot.tap()
        await page.wait_for_url(re.compile(r"/visits/[A-Za-z0-9_-]+$"))
        public_id = page.url.rsplit("/", 1)[1]
        visit_url = page.url
        await page.get_by_test_id("status-held").wait_for()
        assert await page.get_by_test_id("status-held").inner_text() == "待付款"
        assert slot_label in await page.get_by_test_id("visit-time").inner_text()
        assert await page.get_by_test_id("countdown").is_visible()

        # -- upload a PDF and a photo; the progress bar moves ------------------------------
        await slow_uplink(zh_patient_context, page, 4 * MB)
        progress = await upload_reports(
            page,
            [
                {"name": "血常规.pdf", "mimeType": "application/pdf", "buffer": pdf},
                {"name": "IMG_0001.jpg", "mimeType": "image/jpeg", "buffer": photo},
            ],
        )
        await slow_uplink(zh_patient_context, page, -1)
        # One bar per file; each went from empty through at least one value between to full.
        assert len(progress) == 2, progress
        for values in progress.values():
            assert values[0] == [0, 100] and values[-1] == [100, 100], progress
            assert any(0 < value < top for value, top in values), f"a bar never moved: {progress}"
        items = page.get_by_test_id("report-item")
        names = [await items.nth(i).locator("a").first.inner_text() for i in range(2)]
        assert sorted(names) == sorted(["血常规.pdf", "IMG_0001.jpg"]), names

        # -- pay on the simulator gateway -------------------------------------------------
        await page.get_by_test_id("pay-button").tap()
        await page.wait_for_url(re.compile(r"/simulator/pay/[^/]+$"))
        assert "支付网关（模拟）" in await page.locator("main h1").inner_text()
        assert "80.00" in await page.get_by_test_id("simulator-amount").inner_text()  # dr.wang's fee
        await page.get_by_test_id("simulator-pay").tap()
        # The waiting page polls until the gateway's callback confirmed the visit, then goes back.
        await page.wait_for_url(visit_url, timeout=WAIT_MS)

        # -- the confirmed visit: QR code and call link -------------------------------------
        await page.get_by_test_id("status-confirmed").wait_for()
        assert await page.get_by_test_id("status-confirmed").inner_text() == "已确认"
        assert "进入视频通话" in await page.get_by_test_id("call").inner_text()
        call_link = page.get_by_test_id("call-link")
        href = await call_link.get_attribute("href")
        assert href and href.startswith(app_origin + "/call/"), href
        assert await call_link.inner_text() == "打开通话"
        assert await page.get_by_test_id("call-url").input_value() == href
        qr = page.get_by_test_id("qr")
        assert await qr.get_attribute("src") == f"/visits/{public_id}/qr.svg"
        await page.wait_for_function(
            "img => img.complete && img.naturalWidth > 0", arg=await qr.element_handle(), timeout=WAIT_MS
        )
        await expect(page.get_by_test_id("payment-state")).to_contain_text("已付款")
        await expect(page.get_by_test_id("report-item")).to_have_count(2)

        # -- the doctor sees the visit and opens the reports -------------------------------
        doctor = await pages.new_page(doctor_context, "doctor")
        await doctor.goto(app_origin + "/login")
        login_form = doctor.locator("main form[action='/login']")
        await login_form.locator("input[name=identifier]").fill(DOCTOR_LOGIN)
        await login_form.locator("input[name=password]").fill(DOCTOR_PASSWORD)
        await login_form.locator("button[type=submit]").click()
        await doctor.wait_for_url(app_origin + "/doctor")
        row = doctor.locator("table[data-testid] tr", has=doctor.locator(f"a[href='/visits/{public_id}']"))
        await expect(row).to_have_count(1)
        cells = [c.strip() for c in await row.locator("td").all_inner_texts()]
        if await row.get_attribute("data-testid") == "board-row":
            # Today's clinic board: its state, and both reports new (the doctor has not looked yet).
            assert cells[1:4] == [PATIENT_NAME, "Booked", "2 2 new"], cells
        else:
            assert cells[1:] == [PATIENT_NAME, "2", "Paid"], cells
        await row.locator(f"a[href='/visits/{public_id}']").click()
        await doctor.wait_for_url(app_origin + f"/visits/{public_id}")
        assert await doctor.get_by_test_id("patient-name").inner_text() == PATIENT_NAME
        await doctor.get_by_test_id("status-confirmed").wait_for()
        doctor_items = doctor.get_by_test_id("report-item")
        await expect(doctor_items).to_have_count(2)

        pdf_link = doctor_items.filter(has_text="血常规.pdf").locator("a").first
        photo_link = doctor_items.filter(has_text="IMG_0001.jpg").locator("a").first
        response = await doctor.request.get(app_origin + await pdf_link.get_attribute("href"))
        assert response.status == 200
        assert response.headers["content-type"].split(";")[0] == "application/pdf"
        assert response.headers["x-content-type-options"] == "nosniff"
        assert hashlib.sha256(await response.body()).digest() == hashlib.sha256(pdf).digest()

        # The photo opens in a new tab, where it renders.
        async with doctor.expect_popup() as popup_info:
            await photo_link.click()
        popup = await popup_info.value
        await popup.wait_for_load_state()
        size = await popup.evaluate("[document.images[0].naturalWidth, document.images[0].naturalHeight]")
        assert size[0] > 0 and size[1] > 0, size
        await popup.close()

        assert_only_local_requests(pages, app_origin)
        assert not console_errors(pages), console_errors(pages)
