"""A clinic morning in real browsers, in Chinese: one doctor, four patients, the clinic board.

The doctor keeps the board open in one tab (never reloaded) and works in another. Patients open
their call links on phones and wait; the board shows each one's state change live (waiting, in
the call, finished) from the server's event stream. The doctor tells the waiting patients they
are running late (it appears on their waiting pages), admits the first patient with one click
on the board (the room opens and admits them), ends the visit, and "next patient" on the end
screen opens the next waiting patient's room.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from playwright.async_api import Browser, BrowserContext, Page, expect

from tests.call_helpers import SeededVisit, keyed_settings, patient_token, seed_visit, within_today
from tests.db_helpers import insert, write
from tests.harness.browser import PATIENT_CONTEXT, PageRecorder, save_screenshot
from tests.harness.fixtures import FailureArtifacts, _context
from tests.harness.server import ConsultServer
from tests.test_browser_call import DOCTOR, PASSWORD, sign_in_doctor, wait_frames

TEST_TIMEOUT = 240
WAIT_MS = 30_000
PATIENTS = ["王芳", "李雷", "韩梅梅", "张伟"]


@dataclass
class Clinic:
    visits: list[SeededVisit]
    links: list[str]


def prepare_clinic(server: ConsultServer) -> Clinic:
    """Four patients of dr.wang today, a few minutes apart (the first started a minute ago);
    any other visit of dr.wang today is cancelled, so that the order is the test's own."""
    server.cli("user", "passwd", DOCTOR, "--password", PASSWORD)

    def fn(db):
        doctor_id = db.execute("SELECT id FROM users WHERE username = ?", [DOCTOR]).fetchone()[0]
        now = time.time()
        patient_ids = [
            insert(
                db,
                "INSERT INTO users (role, phone, display_name, password_hash, locale, created,"
                " password_changed)"
                " VALUES ('patient', ?, ?, '!', 'zh_CN', ?, ?)",
                [f"1370000000{i}", name, now, now],
            )
            for i, name in enumerate(PATIENTS)
        ]
        db.execute(
            "UPDATE visits SET status = 'cancelled' WHERE doctor_id = ? AND status IN ('held', 'confirmed')",
            [doctor_id],
        )
        return doctor_id, patient_ids

    doctor_id, patient_ids = write(server, fn)
    keyed = keyed_settings(server.data_dir)
    offsets = within_today(keyed.timezone, *(-60 + 120 * i for i in range(len(patient_ids))))
    visits = [
        seed_visit(server, doctor_id=doctor_id, patient_id=pid, starts_in_s=offset)
        for pid, offset in zip(patient_ids, offsets, strict=True)
    ]
    return Clinic(visits, [f"{server.origin}/call/{patient_token(keyed, v)}" for v in visits])


@pytest.fixture
async def zh_phones(
    browser: Browser, pages: PageRecorder, failure_artifacts: FailureArtifacts
) -> AsyncIterator[list[BrowserContext]]:
    options = {**PATIENT_CONTEXT, "locale": "zh-CN"}
    async with (
        _context(browser, pages, failure_artifacts, "patient1", options) as first,
        _context(browser, pages, failure_artifacts, "patient2", options) as second,
    ):
        yield [first, second]


def row(board: Page, visit: SeededVisit):
    return board.locator(f"[data-testid=board-row][data-visit='{visit.public_id}']")


async def shows(board: Page, visit: SeededVisit, state: str, label: str) -> None:
    await expect(row(board, visit)).to_have_attribute("data-state", state, timeout=WAIT_MS)
    await expect(row(board, visit).get_by_test_id("board-state")).to_have_text(label)


async def wait_in_waiting_room(phone: Page, link: str) -> None:
    await phone.goto(link)
    await phone.locator("[data-testid=check-connect][data-state=ok]").wait_for(timeout=WAIT_MS)
    await phone.get_by_test_id("join").tap()
    await expect(phone.get_by_test_id("waiting-room")).to_be_visible(timeout=WAIT_MS)


async def end_visit(room: Page) -> None:
    room.once("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
    await room.get_by_test_id("end").click()
    await expect(room.get_by_test_id("call-ended")).to_be_visible(timeout=WAIT_MS)


async def test_clinic_board_follows_four_patients_live(
    consult_server: ConsultServer,
    app_origin: str,
    zh_desktop: BrowserContext,
    zh_phones: list[BrowserContext],
    pages: PageRecorder,
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        clinic = await asyncio.to_thread(prepare_clinic, consult_server)
        first, second, third, fourth = clinic.visits
        work = await pages.new_page(zh_desktop, "doctor-work")
        await sign_in_doctor(work, app_origin)  # the board is the doctor's home
        board = await pages.new_page(zh_desktop, "doctor-board")
        await board.goto(app_origin + "/doctor")
        await expect(board.get_by_test_id("board-live")).to_have_text("实时", timeout=WAIT_MS)
        await board.evaluate("() => { window.__neverReloaded = true; }")
        order = await board.locator("[data-testid=board-row]").evaluate_all(
            "rows => rows.map(r => r.dataset.visit)"
        )
        assert order == [v.public_id for v in clinic.visits]  # time order
        for visit in clinic.visits:
            await shows(board, visit, "booked", "已预约")
        await save_screenshot(board, "board-morning")

        # Two patients open their links and wait: live on the board, with an admit button.
        phone1 = await pages.new_page(zh_phones[0], "patient1")
        phone2 = await pages.new_page(zh_phones[1], "patient2")
        await wait_in_waiting_room(phone1, clinic.links[0])
        await shows(board, first, "waiting", "候诊中")
        await wait_in_waiting_room(phone2, clinic.links[1])
        await shows(board, second, "waiting", "候诊中")
        await expect(row(board, first).get_by_test_id("board-admit")).to_be_visible()
        await shows(board, third, "booked", "已预约")

        # Running about 20 minutes late: the waiting patients' pages say so at once.
        await work.get_by_test_id("late-minutes").select_option("20")
        await work.get_by_test_id("late-send").click()
        await expect(work.get_by_test_id("message")).to_have_text("已通知今天等候中的患者。")
        # The board tab (not reloaded) shows the notice in force too.
        await expect(board.get_by_test_id("late-minutes")).to_have_value("20", timeout=WAIT_MS)
        for phone in (phone1, phone2):
            notice = phone.get_by_test_id("late-notice")
            await expect(notice).to_be_visible(timeout=WAIT_MS)
            await expect(notice).to_contain_text("20 分钟")

        # One click on the board admits the first patient: the room opens and they are in.
        await row(work, first).get_by_test_id("board-admit").click()
        await work.wait_for_url(f"**/doctor/visits/{first.public_id}/room", timeout=WAIT_MS)
        await expect(phone1.get_by_test_id("stage")).to_be_visible(timeout=WAIT_MS)
        await shows(board, first, "in_call", "通话中")
        await wait_frames(work, 5, timeout_s=40)
        await save_screenshot(board, "board-in-call")

        # The visit ends; the board shows it finished; "next patient" opens the next waiting room.
        await end_visit(work)
        await shows(board, first, "finished", "已结束")
        await expect(row(board, first).get_by_test_id("board-room")).to_have_count(0)
        next_patient = work.get_by_test_id("next-patient")
        await expect(next_patient).to_be_visible()
        await expect(next_patient).to_have_text("下一位患者")
        await next_patient.click()
        await work.wait_for_url(f"**/doctor/visits/{second.public_id}/room", timeout=WAIT_MS)
        await work.get_by_test_id("admit").click(timeout=WAIT_MS)
        await expect(phone2.get_by_test_id("stage")).to_be_visible(timeout=WAIT_MS)
        await shows(board, second, "in_call", "通话中")
        await end_visit(work)
        await shows(board, second, "finished", "已结束")

        # Nobody else waits: next is the third patient's (booked) room.
        await work.get_by_test_id("next-patient").click()
        await work.wait_for_url(f"**/doctor/visits/{third.public_id}/room", timeout=WAIT_MS)
        await shows(board, third, "booked", "已预约")
        await shows(board, fourth, "booked", "已预约")
        # Every change above reached the board without a reload.
        assert await board.evaluate("() => window.__neverReloaded === true")
        await save_screenshot(board, "board-after-two")
