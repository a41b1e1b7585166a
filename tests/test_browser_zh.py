"""The patient's phone, in Chinese: no English sentence on any screen of the journey.

Real Chromium set to zh-CN (its Accept-Language), the real server. A new patient registers,
finds the time they picked taken by someone else (the booking error), books another, uploads a
file that is not a report (the upload error); then, on a visit starting now, opens the call
link: pre-call check, waiting room, the call (whose hang-up button must say 离开, not 停诊,
"clinic suspended"), and the end when the doctor, also in Chinese, ends it. On every screen
the visible text (and the title) may hold no Latin-script sentence (tests/language_check.py).
"""

from __future__ import annotations

import asyncio
import re
import time

from playwright.async_api import BrowserContext, Page, expect

from tests.account_helpers import texted_code
from tests.call_helpers import keyed_settings, patient_token, seed_visit
from tests.db_helpers import read
from tests.harness.browser import PageRecorder
from tests.harness.server import ConsultServer
from tests.language_check import latin_sentences
from tests.test_browser_call import DOCTOR, PASSWORD, sign_in_doctor, state, wait_frames

TEST_TIMEOUT = 150
WAIT_MS = 20_000
PATIENT_NAME = "张小明"
PATIENT_PHONE = "13987654321"
PATIENT_PASSWORD = "Xiaoming-2024-follow"


class Screens:
    """Reads every screen shown; collects the English sentences found on them."""

    def __init__(self) -> None:
        self.english: list[str] = []
        self.seen: list[str] = []

    async def read(self, page: Page, name: str) -> str:
        text = await page.evaluate("() => document.title + '\\n' + document.body.innerText")
        self.seen.append(name)
        self.english += [f"{name}: {s!r}" for s in latin_sentences(text)]
        return text


async def test_the_patients_journey_in_chinese_has_no_english_sentence(
    consult_server: ConsultServer,
    app_origin: str,
    zh_phone: BrowserContext,
    zh_desktop: BrowserContext,
    pages: PageRecorder,
) -> None:
    screens = Screens()
    async with asyncio.timeout(TEST_TIMEOUT):
        await asyncio.to_thread(consult_server.cli, "user", "passwd", DOCTOR, "--password", PASSWORD)
        page = await pages.new_page(zh_phone, "patient")

        # -- register -------------------------------------------------------------------------
        await page.goto(app_origin + "/register")
        assert await page.locator("html").get_attribute("lang") == "zh-CN"
        await screens.read(page, "register")
        form = page.locator("main form[action='/register']")
        await form.locator("input[name=name]").fill(PATIENT_NAME)
        await form.locator("input[name=phone]").fill(PATIENT_PHONE)
        await form.locator("input[name=password]").fill(PATIENT_PASSWORD)
        await form.locator("input[name=password2]").fill(PATIENT_PASSWORD)
        await form.locator("button[type=submit]").tap()
        # The number is confirmed by a code texted to it (the outbox stands in for the gateway).
        await page.wait_for_url(app_origin + "/register/verify")
        await screens.read(page, "confirm the number")
        code = await asyncio.to_thread(texted_code, consult_server, PATIENT_PHONE)
        await page.get_by_test_id("code").fill(code)
        await page.locator("main form[action='/register/verify'] button[type=submit]").tap()
        await page.wait_for_url(app_origin + "/patient")
        await screens.read(page, "patient home")

        # -- the time picked is taken meanwhile: the booking error ---------------------------
        await page.get_by_test_id("book").tap()
        await page.wait_for_url(app_origin + "/book")
        await screens.read(page, "departments")
        await page.get_by_test_id("department-cardiology").tap()
        await page.wait_for_url(re.compile(r"/book/\d+$"))
        await screens.read(page, "doctors")
        await page.locator("[data-testid^='doctor-'] a.choice").first.tap()
        await page.wait_for_url(re.compile(r"/book/\d+/doctors/\d+$"))
        await screens.read(page, "slots")
        # A day with times to spare (the second free day, not what is left of today), so that
        # when the time is taken the refused page still offers another time on the same day.
        later_day = page.get_by_test_id("day-strip").locator("a[data-day]").nth(1)
        day = await later_day.get_attribute("data-day")
        await later_day.tap()
        slot = page.locator(f"[data-day-panel='{day}'] button.slot:not([disabled])").first
        await slot.wait_for(timeout=WAIT_MS)
        starts_at = int(await slot.get_attribute("value") or 0)
        slot_doctor = int(page.url.split("?", 1)[0].rsplit("/", 1)[1])

        def ids(db):
            return (
                db.execute("SELECT id FROM users WHERE username = ?", [DOCTOR]).fetchone()[0],
                db.execute(
                    "SELECT id FROM users WHERE role = 'patient' AND phone != ? ORDER BY id LIMIT 1",
                    [PATIENT_PHONE],
                ).fetchone()[0],
                db.execute("SELECT id FROM users WHERE phone = ?", [PATIENT_PHONE]).fetchone()[0],
            )

        doctor_id, other, me = await asyncio.to_thread(read, consult_server, ids)
        taken_in_s = starts_at - time.time() + 0.5
        seed_visit(consult_server, doctor_id=slot_doctor, patient_id=other, starts_in_s=taken_in_s)
        await slot.tap()
        error = page.get_by_test_id("error")
        await expect(error).to_contain_text("该时间刚刚被约走了", timeout=WAIT_MS)
        await screens.read(page, "slot taken")

        # -- another time; a file that is not a report: the upload error ---------------------
        # (The taken time was written behind the app's back, so the day's listing may show it
        # free for up to a second, consult.booking.slotcache: another time, not that one.)
        await page.locator(
            f"[data-testid=slots] button.slot:not([disabled]):not([value='{starts_at}'])"
        ).first.tap()
        await page.wait_for_url(re.compile(r"/visits/[A-Za-z0-9_-]+$"))
        await page.get_by_test_id("status-held").wait_for()
        await screens.read(page, "held visit")
        await page.locator("[data-reports-upload]").wait_for(state="visible", timeout=WAIT_MS)
        await page.get_by_test_id("reports-file").set_input_files(
            [
                {
                    "name": "报告.pdf",
                    "mimeType": "application/pdf",
                    "buffer": b"this is not a PDF at all\n" * 40,
                }
            ]
        )
        await expect(page.get_by_test_id("upload-error")).to_have_count(1, timeout=WAIT_MS)
        upload_error = await page.get_by_test_id("upload-error").inner_text()
        assert re.search(r"[\u4e00-\u9fff]", upload_error), upload_error
        await screens.read(page, "upload error")

        # -- the call, on a visit of dr.wang starting now ------------------------------------
        visit = seed_visit(consult_server, doctor_id=doctor_id, patient_id=me, starts_in_s=-60)
        call_url = consult_server.url(
            f"/call/{patient_token(keyed_settings(consult_server.data_dir), visit)}"
        )
        await page.goto(call_url)
        await page.locator("[data-testid=check-connect][data-state=ok]").wait_for(timeout=WAIT_MS)
        await screens.read(page, "pre-call check")
        await page.get_by_test_id("join").tap()
        await expect(page.get_by_test_id("waiting-room")).to_be_visible()
        await expect(page.get_by_test_id("waiting-room")).to_contain_text("医生很快会让您进入")
        await screens.read(page, "waiting room")

        doctor = await pages.new_page(zh_desktop, "doctor")
        await sign_in_doctor(doctor, app_origin)
        await screens.read(doctor, "doctor home")
        await doctor.goto(consult_server.url(f"/doctor/visits/{visit.public_id}/room"))
        await state(doctor, "patient_waiting")
        await screens.read(doctor, "consult room, patient waiting")
        await doctor.get_by_test_id("admit").click()
        await expect(page.get_by_test_id("stage")).to_be_visible(timeout=WAIT_MS)
        await asyncio.gather(wait_frames(page, 10), wait_frames(doctor, 10))
        # The hang-up button: "leave the call", not the schedule's "clinic suspended".
        assert (await page.get_by_test_id("leave").inner_text()).strip() == "离开"
        await screens.read(page, "in call")
        await screens.read(doctor, "consult room, in call")

        # -- the doctor ends the visit: both see the end -------------------------------------
        doctor.once("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
        await doctor.get_by_test_id("end").click()
        await expect(page.get_by_test_id("ended-reason")).to_have_text("医生已结束问诊。", timeout=WAIT_MS)
        await screens.read(page, "ended (patient)")
        await expect(doctor.get_by_test_id("call-ended")).to_be_visible(timeout=WAIT_MS)
        await screens.read(doctor, "ended (doctor)")

        # -- the link again, after the end -----------------------------------------------------
        await page.goto(call_url)
        await screens.read(page, "call link after the end")

    assert len(screens.seen) >= 15, screens.seen
    assert not screens.english, "English on Chinese screens:\n" + "\n".join(screens.english)
