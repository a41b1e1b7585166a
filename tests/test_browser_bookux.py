"""Issue 12 in a real browser: booking and uploads on the patient's phone (390x844, Chinese).

The patient opens a doctor's times: a strip of days, one day's times below it, morning and
afternoon apart; the times too close to change later are marked. Switching days (by keyboard)
needs no reload. Booking a marked time says it cannot be changed once paid; cancelling that
unpaid hold asks first, with no refund words. On another visit the patient uploads: a file the
server refuses by content shows a Chinese error with "retry" and can be removed; a file of the
wrong kind is refused before it is sent; a good PDF shows its percentage; an upload cut by a
lost connection succeeds on "retry" and its error goes; the remove control of a report is
visible and large. Then the patient pays and cancels: the confirmation names the refund. No
page shows a time-zone name or an English sentence. Screenshots of the slot page, the upload
panel and the cancel confirmation go to test-artifacts/screenshots/.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Mapping
from typing import Any

import pytest
from playwright.async_api import BrowserContext, Page, Route, expect

from tests.db_helpers import write
from tests.harness.browser import PageRecorder, assert_only_local_requests, save_screenshot
from tests.harness.server import ConsultServer
from tests.language_check import latin_sentences
from tests.test_browser_booking import (
    MB,
    console_errors,
    make_jpeg,
    make_pdf,
    slow_uplink,
    zh_patient_context,  # noqa: F401  (the fixture: the phone in Chinese)
)

TEST_TIMEOUT = 300
WAIT_MS = 30_000
PHONE = "13811112222"
NAME = "陈秀英"
PASSWORD = "Xiuying-2024-follow"
DOCTOR = "dr.wang"  # cardiology, fee ¥80.00
WINDOW_S = 24 * 3600  # the default cancel_free_hours

# Every upload row's percentage as it changes, to see the numbers between 0% and 100%.
RECORD_PERCENT = """() => {
  const box = document.querySelector("[data-reports-progress]");
  const seen = window.__percents = [];
  const record = () => {
    for (const p of box.querySelectorAll("[data-testid=upload-percent]")) {
      if (seen[seen.length - 1] !== p.textContent) seen.push(p.textContent);
    }
  };
  new MutationObserver(record).observe(box, {subtree: true, childList: true, characterData: true});
  window.__percentTimer = setInterval(record, 5);
}"""

# Free times on every page of the strip (hidden days too): [starts_at, marked] and the clock.
FREE_SLOTS = """() => ({
  now: Date.now() / 1000,
  slots: Array.from(document.querySelectorAll("[data-testid=slots] button.slot:not([disabled])"))
    .map((b) => [Number(b.value), b.hasAttribute("data-late")]),
})"""


@pytest.fixture
def consult_env() -> Mapping[str, str]:
    # A small limit, so that a too-large file is quick to make: the 2 MB PDF fits, 3.5 MB does not.
    return {"CONSULT_UPLOAD_MAX_MB": "3"}


def daily_sessions(target: Any, username: str) -> tuple[int, int]:
    """Early-morning and evening sessions every day for the doctor, besides the demo's weekday
    ones: whatever the day and hour, some times fall inside the next 24 hours and many after.
    ``target``: the server (its database, either engine; tests/db_helpers)."""

    def fn(db: Any) -> tuple[int, int]:
        doctor = db.execute("SELECT id FROM users WHERE username = ?", [username]).fetchone()[0]
        dep = db.execute(
            "SELECT department_id FROM doctor_departments WHERE doctor_id = ? LIMIT 1", [doctor]
        ).fetchone()[0]
        for weekday in range(7):
            for start, end in (("06:00", "07:00"), ("19:00", "20:00")):
                db.execute(
                    "INSERT INTO schedule_templates (doctor_id, weekday, start_local, end_local)"
                    " VALUES (?, ?, ?, ?)",
                    [doctor, weekday, start, end],
                )
        return doctor, dep

    return write(target, fn)


class Screens:
    """Every screen read: no time-zone name, no English sentence."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    async def read(self, page: Page, name: str) -> str:
        html = await page.content()
        text = await page.evaluate("() => document.title + '\\n' + document.body.innerText")
        if "Asia/" in html or "Asia/" in text:
            self.problems.append(f"{name}: a time-zone name")
        self.problems += [f"{name}: {s!r}" for s in latin_sentences(text)]
        return text


async def sign_in(page: Page, origin: str) -> None:
    await page.goto(origin + "/login")
    form = page.locator("main form[action='/login']")
    await form.locator("input[name=identifier]").fill(PHONE)
    await form.locator("input[name=password]").fill(PASSWORD)
    await form.locator("button[type=submit]").tap()
    await page.wait_for_url(origin + "/patient", timeout=WAIT_MS)


def unexpected_console_errors(pages: PageRecorder) -> list[str]:
    """Console errors, less the ones this test causes on purpose: the refusals by content (415)
    and the upload sent while the phone was offline."""
    expected = re.compile(r"status of 415|ERR_INTERNET_DISCONNECTED|net::ERR_FAILED")
    return [line for line in console_errors(pages) if not expected.search(line)]


async def test_booking_and_uploads_on_the_phone(
    consult_server: ConsultServer,
    app_origin: str,
    zh_patient_context: BrowserContext,  # noqa: F811
    pages: PageRecorder,
) -> None:
    screens = Screens()
    async with asyncio.timeout(TEST_TIMEOUT):
        await asyncio.to_thread(
            consult_server.cli,
            *("user", "add", "--role", "patient", "--phone", PHONE, "--name", NAME, "--password", PASSWORD),
        )
        doctor_id, department_id = await asyncio.to_thread(daily_sessions, consult_server, DOCTOR)
        slots_url = f"{app_origin}/book/{department_id}/doctors/{doctor_id}"
        page = await pages.new_page(zh_patient_context, "patient")
        await sign_in(page, app_origin)
        await screens.read(page, "home")

        # -- the slot page: a strip of days, one day's times, the late ones marked ------------
        await page.goto(slots_url)
        strip = page.get_by_test_id("day-strip")
        await expect(strip).to_be_visible()
        day_links = strip.locator("a[data-day]")
        assert await day_links.count() >= 14
        await expect(page.locator("[data-day-panel]:visible")).to_have_count(1)
        first_day = await strip.locator("a[aria-current=true]").get_attribute("data-day")
        assert first_day == await day_links.first.get_attribute("data-day")
        found = await page.evaluate(FREE_SLOTS)
        marked = [s for s, late in found["slots"] if late]
        assert marked  # the day shown is the first with a free time: inside the window
        for starts_at, late in found["slots"]:
            if abs(starts_at - found["now"] - WINDOW_S) > 120:  # the page is a few seconds old
                assert late == (starts_at - found["now"] < WINDOW_S), (starts_at, late, found["now"])
        shown = page.locator("[data-day-panel]:visible")
        await expect(shown.get_by_test_id("late-note")).to_be_visible()
        await expect(shown.locator("button.slot.late").first).to_contain_text("不可改退")
        assert "上午" in await shown.inner_text() or "晚上" in await shown.inner_text()
        # The strip is one row across the phone, not a column of days.
        boxes = [await day_links.nth(i).bounding_box() for i in range(3)]
        assert boxes[0]["y"] == boxes[1]["y"] == boxes[2]["y"] and boxes[0]["x"] < boxes[1]["x"]
        await screens.read(page, "slots")
        await save_screenshot(page, "book-slots-390x844")

        # Another day by keyboard: shown at once, without loading the page again.
        await page.evaluate("window.__samePage = true")
        fourth = day_links.nth(3)
        fourth_day = await fourth.get_attribute("data-day")
        await fourth.focus()
        await page.keyboard.press("Enter")
        await expect(page.locator(f"[data-day-panel='{fourth_day}']")).to_be_visible()
        await expect(page.locator("[data-day-panel]:visible")).to_have_count(1)
        await expect(fourth).to_have_attribute("aria-current", "true")
        assert await strip.locator("a[aria-current]").count() == 1
        assert await page.evaluate("window.__samePage === true")
        assert page.url.endswith(f"?day={fourth_day}")
        later_panel = page.locator(f"[data-day-panel='{fourth_day}']")
        assert await later_panel.locator("button.slot.late").count() == 0
        assert re.search(r"\d+月\d+日", await later_panel.locator("h2").inner_text())

        # -- a marked time: the booking says it cannot be changed; the hold is cancelled -------
        await page.goto(slots_url)
        late_slot = page.locator("[data-day-panel]:visible button.slot.late").first
        await late_slot.tap()
        await page.wait_for_url(re.compile(r"/visits/[A-Za-z0-9_-]+$"))
        await expect(page.get_by_test_id("no-change-warning")).to_contain_text("付款后无法在网上改约或取消")
        await screens.read(page, "held visit in the window")
        await page.get_by_test_id("cancel").tap()
        await page.wait_for_url(re.compile(r"/visits/[A-Za-z0-9_-]+/cancel$"))
        await expect(page.get_by_test_id("cancel-no-refund")).to_be_visible()
        assert "退款" not in await page.get_by_test_id("cancel-confirm").inner_text()
        await screens.read(page, "cancel an unpaid hold")
        await page.get_by_test_id("cancel-confirm-button").tap()
        await expect(page.get_by_test_id("message")).to_have_text("就诊已取消。", timeout=WAIT_MS)
        await expect(page.get_by_test_id("status-cancelled")).to_be_visible()

        # -- a time further out ------------------------------------------------------------------
        await page.goto(f"{slots_url}?day={fourth_day}")
        await page.locator(f"[data-day-panel='{fourth_day}'] button.slot:not([disabled])").first.tap()
        await page.wait_for_url(re.compile(r"/visits/[A-Za-z0-9_-]+$"))
        visit_url = page.url
        await page.get_by_test_id("status-held").wait_for()
        assert await page.get_by_test_id("no-change-warning").count() == 0
        await screens.read(page, "held visit")

        # -- uploads: refused by content -> error, retry, remove ---------------------------------
        await page.locator("[data-reports-upload]").wait_for(state="visible", timeout=WAIT_MS)
        upload_url = re.compile(r"/api/visits/[^/]+/reports$")
        not_pdf = {"name": "化验单.pdf", "mimeType": "application/pdf", "buffer": b"not a PDF at all\n" * 50}
        await page.get_by_test_id("reports-file").set_input_files([not_pdf])
        failed = page.get_by_test_id("upload-error")
        await expect(failed).to_have_count(1, timeout=WAIT_MS)
        first_error = await failed.locator(".upload-error").inner_text()
        assert re.search(r"[\u4e00-\u9fff]", first_error), first_error
        retry = failed.get_by_test_id("upload-retry")
        await expect(retry).to_be_visible()
        await expect(retry).to_have_text("重试")
        async with page.expect_response(
            lambda r: r.request.method == "POST" and bool(upload_url.search(r.url))
        ) as response:
            await retry.tap()
        assert (await response.value).status == 415
        await expect(failed).to_have_count(1, timeout=WAIT_MS)
        await expect(failed.locator(".upload-error")).to_have_text(first_error)
        await screens.read(page, "upload refused by content")
        await failed.get_by_test_id("upload-dismiss").tap()
        await expect(page.get_by_test_id("upload-error")).to_have_count(0)
        await expect(page.get_by_test_id("upload-row")).to_have_count(0)

        # Not a report at all: refused on the phone, before sending a byte.
        requests_before = len([u for u in pages.log(page).requests if upload_url.search(u)])
        await page.get_by_test_id("reports-file").set_input_files(
            [{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"hello\n"}]
        )
        await expect(failed).to_have_count(1)
        await expect(failed.locator(".upload-error")).to_contain_text("无法上传这种文件")
        assert await failed.get_by_test_id("upload-retry").count() == 0
        assert len([u for u in pages.log(page).requests if upload_url.search(u)]) == requests_before
        await failed.get_by_test_id("upload-dismiss").tap()
        await expect(failed).to_have_count(0)
        # Too large: refused on the phone too, with the limit in the message.
        await page.get_by_test_id("reports-file").set_input_files(
            [{"name": "CT.pdf", "mimeType": "application/pdf", "buffer": make_pdf(3 * MB + MB // 2)}]
        )
        await expect(failed.locator(".upload-error")).to_contain_text("文件超过 3 MB")
        assert await failed.get_by_test_id("upload-retry").count() == 0
        assert len([u for u in pages.log(page).requests if upload_url.search(u)]) == requests_before
        await failed.get_by_test_id("upload-dismiss").tap()
        await expect(failed).to_have_count(0)

        # A good PDF over a slow uplink: the bar and its percentage move.
        await page.evaluate(RECORD_PERCENT)
        await slow_uplink(zh_patient_context, page, 1 * MB)
        await page.get_by_test_id("reports-file").set_input_files(
            [{"name": "血常规.pdf", "mimeType": "application/pdf", "buffer": make_pdf(2 * MB)}]
        )
        await expect(page.get_by_test_id("report-item")).to_have_count(1, timeout=WAIT_MS)
        await slow_uplink(zh_patient_context, page, -1)
        percents = await page.evaluate("clearInterval(window.__percentTimer), window.__percents")
        numbers = [int(p[:-1]) for p in percents if re.fullmatch(r"\d+%", p)]
        assert numbers and numbers[0] == 0 and numbers[-1] == 100, percents
        assert any(0 < n < 100 for n in numbers), percents
        assert numbers == sorted(numbers), percents

        # The connection drops mid-choice: a network error with retry; retry once it is back.
        # (The connection is cut in the browser's network stack: DevTools' offline mode does not
        # stop requests to the test's bridge address.)
        cut: list[str] = []

        async def cut_first_upload(route: Route) -> None:
            if route.request.method == "POST" and not cut:
                cut.append(route.request.url)
                await route.abort("internetdisconnected")
            else:
                await route.continue_()

        await page.route(upload_url, cut_first_upload)
        await page.get_by_test_id("reports-file").set_input_files(
            [{"name": "心电图.jpg", "mimeType": "image/jpeg", "buffer": make_jpeg(600)}]
        )
        await expect(failed).to_have_count(1, timeout=WAIT_MS)
        await expect(failed.locator(".upload-error")).to_contain_text("连接")
        await expect(failed.get_by_test_id("upload-retry")).to_be_visible()
        await screens.read(page, "upload interrupted")
        await save_screenshot(page, "upload-panel-390x844")
        await failed.get_by_test_id("upload-retry").tap()
        await expect(page.get_by_test_id("report-item")).to_have_count(2, timeout=WAIT_MS)
        await expect(page.get_by_test_id("upload-error")).to_have_count(0)
        await page.unroute(upload_url, cut_first_upload)
        assert len(cut) == 1

        # The remove control: visible (not white on white) and at least 44 px; it removes.
        remove = page.get_by_test_id("report-remove").first
        await expect(remove).to_be_visible()
        box = await remove.bounding_box()
        assert box and box["height"] >= 44 and box["width"] >= 44, box
        colours = await remove.evaluate(
            "b => { const s = getComputedStyle(b); return [s.color, s.backgroundColor]; }"
        )
        assert colours[0] != colours[1] and colours[0] not in ("rgb(255, 255, 255)", "rgba(0, 0, 0, 0)"), (
            colours
        )
        page.once("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
        await remove.tap()
        await expect(page.get_by_test_id("report-item")).to_have_count(1, timeout=WAIT_MS)
        await screens.read(page, "reports")

        # -- pay, then cancel: the confirmation names the refund ---------------------------------
        await page.get_by_test_id("pay-button").tap()
        await page.wait_for_url(re.compile(r"/simulator/pay/[^/]+$"))
        await page.get_by_test_id("simulator-pay").tap()
        await page.wait_for_url(visit_url, timeout=WAIT_MS)
        await page.get_by_test_id("status-confirmed").wait_for()
        await screens.read(page, "confirmed visit")
        await page.get_by_test_id("cancel").tap()
        await page.wait_for_url(visit_url + "/cancel")
        await expect(page.get_by_test_id("cancel-refund")).to_have_text("取消后将退款 ¥80.00 到原支付方式。")
        await screens.read(page, "cancel a paid visit")
        await save_screenshot(page, "cancel-paid-visit-390x844")
        started = time.time()
        await page.get_by_test_id("cancel-confirm-button").tap()
        await page.wait_for_url(re.compile(r"\?m=cancelled_refund(ed|_pending)$"), timeout=WAIT_MS)
        await expect(page.get_by_test_id("message")).to_have_text(
            re.compile("^就诊已取消，¥80.00 (已|正在)退回原支付方式。$")
        )
        assert time.time() - started < 20
        await expect(page.get_by_test_id("status-cancelled")).to_be_visible()
        await screens.read(page, "cancelled visit")
        await page.goto(app_origin + "/patient")
        await screens.read(page, "home after")

    assert not screens.problems, "\n".join(screens.problems)
    assert_only_local_requests(pages, app_origin)
    assert not unexpected_console_errors(pages), unexpected_console_errors(pages)
