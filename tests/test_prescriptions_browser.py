"""Notes and prescriptions in a real browser, in Chinese: the consult room's form (fill in, a
refused diagnosis, preview, sign), the patient's prescription on a 360 px phone (no sideways
scroll, a "verified" mark and the public check page instead of signature bytes), the signed file
checked on the verification page (notes.js and rx.js at work). Screenshots are saved."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
from playwright.async_api import Browser, BrowserContext, Page, expect

from tests.call_helpers import seed_visit
from tests.db_helpers import rows
from tests.harness.browser import (
    PATIENT_CONTEXT,
    PageRecorder,
    assert_only_local_requests,
    save_screenshot,
)
from tests.harness.fixtures import FailureArtifacts, _context
from tests.harness.server import ConsultServer

pytestmark = pytest.mark.browser
WAIT_MS = 30_000
DOCTOR, PASSWORD = "dr.wang", "Browser-rx-pass-2024"
PATIENT_PASSWORD = "Browser-rx-patient-2024"
PHONE_360 = {
    **PATIENT_CONTEXT,
    "viewport": {"width": 360, "height": 740},
    "screen": {"width": 360, "height": 740},
}


@pytest.fixture
async def zh_phone_360(
    browser: Browser, pages: PageRecorder, failure_artifacts: FailureArtifacts
) -> AsyncIterator[BrowserContext]:
    async with _context(browser, pages, failure_artifacts, "patient", {**PHONE_360, "locale": "zh-CN"}) as c:
        yield c


def prepare(server: ConsultServer) -> tuple[str, str, str]:
    """A visit of dr.wang with the demo patient: (public id, room URL, the patient's phone)."""
    server.cli("user", "passwd", DOCTOR, "--password", PASSWORD)
    doctor_id = rows(server, "SELECT id FROM users WHERE username = ?", [DOCTOR])[0]["id"]
    visit = seed_visit(server, doctor_id=doctor_id)
    phone = rows(server, "SELECT phone FROM users WHERE id = ?", [visit.patient_id])[0]["phone"]
    server.cli("user", "passwd", phone, "--password", PATIENT_PASSWORD)
    return visit.public_id, server.url(f"/doctor/visits/{visit.public_id}/room"), phone


async def sign_in(page: Page, origin: str, login: str, password: str) -> None:
    await page.goto(origin + "/login")
    form = page.locator("main form[action='/login']")
    await form.locator("input[name=identifier]").fill(login)
    await form.locator("input[name=password]").fill(password)
    await form.locator("button[type=submit]").click()
    await page.wait_for_load_state()


async def fill_prescription(page: Page, diagnosis: str = "") -> None:
    """The consult room's form: a 58-year-old woman, amoxicillin; the diagnosis only if given."""
    form = page.locator("[data-rx-form]")
    row = form.locator("[data-rx-row]").nth(0)
    await form.locator("select[name=sex]").select_option("female")
    await form.locator("input[name=age]").fill("58")
    await form.locator("input[name=allergies]").fill("青霉素过敏")
    for name, value in (
        ("drug", "阿莫西林胶囊"),
        ("strength", "0.25 g × 24 粒"),
        ("dose", "0.5"),
        ("dose_unit", "g"),
        ("days", "7"),
        ("quantity", "2"),
        ("quantity_unit", "盒"),
    ):
        await row.locator(f"[name={name}]").fill(value)
    await row.locator("select[name=route]").select_option("oral")
    await row.locator("select[name=frequency]").select_option("tid")
    if diagnosis:
        await form.locator("input[name=diagnosis]").fill(diagnosis)


async def overflow(page: Page) -> int:
    """How many CSS pixels the page is wider than the screen (0: no sideways scrolling)."""
    return await page.evaluate(
        "() => Math.max(document.documentElement.scrollWidth, document.body.scrollWidth) - window.innerWidth"
    )


async def test_doctor_previews_and_signs_and_the_patient_phone_shows_it_verified(
    consult_server: ConsultServer,
    app_origin: str,
    zh_desktop: BrowserContext,
    zh_phone_360: BrowserContext,
    pages: PageRecorder,
    tmp_path,
) -> None:
    async with asyncio.timeout(180):
        public_id, room_url, patient_phone = await asyncio.to_thread(prepare, consult_server)
        page = await pages.new_page(zh_desktop, "doctor")
        await sign_in(page, app_origin, DOCTOR, PASSWORD)
        await page.goto(room_url)

        # Notes: typed, autosaved, still there after a reload.
        await page.get_by_test_id("tab-notes").click()
        text = page.get_by_test_id("notes-text")
        await expect(text).to_be_enabled(timeout=WAIT_MS)
        await text.fill("咳嗽三天，双肺呼吸音清。")
        await page.get_by_test_id("notes-advice").fill("多休息，多喝温水。")
        await expect(page.locator("[data-testid=notes-status][data-state=saved]")).to_be_visible(
            timeout=WAIT_MS
        )

        # The prescription form: the medicine is filled in, the diagnosis forgotten.
        await page.get_by_test_id("tab-rx").click()
        form = page.locator("[data-rx-form]")
        rows = form.locator("[data-rx-row]")
        await expect(rows).to_have_count(1)
        row = rows.nth(0)
        await fill_prescription(page)
        await page.get_by_test_id("rx-preview").click()
        await expect(page.get_by_test_id("rx-status")).to_contain_text("请填写临床诊断", timeout=WAIT_MS)
        assert await form.locator("input[name=diagnosis]").get_attribute("aria-invalid") == "true"
        await expect(page.get_by_test_id("rx-preview-panel")).to_be_hidden()
        await form.locator("input[name=diagnosis]").fill("急性支气管炎")
        await save_screenshot(page, "rx-doctor-form")

        # Preview: the sheet as it will be signed; sign only from there.
        await page.get_by_test_id("rx-preview").click()
        panel = page.get_by_test_id("rx-preview-panel")
        await expect(panel).to_be_visible(timeout=WAIT_MS)
        sheet = panel.get_by_test_id("rx-sheet")
        await expect(sheet).to_contain_text("急性支气管炎")
        await expect(sheet).to_contain_text("青霉素过敏")
        await expect(sheet).to_contain_text("每次 0.5 g，口服，每日三次（tid），共 7 天；总量 2 盒")
        await expect(sheet.get_by_test_id("rx-number")).to_have_text("签名时生成")
        await save_screenshot(page, "rx-doctor-preview")
        # A change after the preview withdraws it ...
        await row.locator("[name=quantity]").fill("3")
        await expect(panel).to_be_hidden()
        # ... and the new preview is what gets signed.
        await page.get_by_test_id("rx-preview").click()
        await expect(panel).to_be_visible(timeout=WAIT_MS)
        await expect(panel.get_by_test_id("rx-sheet")).to_contain_text("总量 3 盒")
        await page.get_by_test_id("rx-issue").click()
        await expect(page.get_by_test_id("rx-status")).to_contain_text("已开具", timeout=WAIT_MS)
        issued = page.get_by_test_id("rx-issued").get_by_test_id("rx-item")
        await expect(issued).to_have_count(1, timeout=WAIT_MS)
        number = await issued.get_attribute("data-number")
        assert number and number.startswith("RX-")
        await expect(panel).to_be_hidden()
        resp = await page.request.get(app_origin + f"/prescriptions/{number}.json")
        signed = json.loads(await resp.body())
        assert signed["document"]["diagnosis"] == "急性支气管炎"
        assert signed["document"]["items"][0]["quantity"] == 3

        # The patient's phone, 360 px wide: the visit page lists it ...
        phone = await pages.new_page(zh_phone_360, "patient")
        await sign_in(phone, app_origin, patient_phone, PATIENT_PASSWORD)
        await phone.goto(app_origin + f"/visits/{public_id}")
        mine = phone.get_by_test_id("rx-list").get_by_test_id("rx-item")
        await expect(mine).to_have_count(1, timeout=WAIT_MS)
        await expect(mine).to_contain_text("阿莫西林胶囊 0.25 g × 24 粒")
        pdf = await phone.request.get(app_origin + await mine.get_by_test_id("rx-pdf").get_attribute("href"))
        assert pdf.ok and (await pdf.body()).startswith(b"%PDF-")
        await expect(phone.get_by_test_id("rx-advice")).to_have_text("多休息，多喝温水。")
        assert await overflow(phone) <= 0
        # ... and the prescription itself fits, with a verified mark and no signature bytes.
        await mine.get_by_test_id("rx-open").click()
        await expect(phone.get_by_test_id("rx-verified-mark")).to_be_visible(timeout=WAIT_MS)
        await expect(phone.get_by_test_id("rx-verified-mark")).to_contain_text("已验证")
        await expect(phone.get_by_test_id("rx-diagnosis")).to_have_text("急性支气管炎")
        assert await phone.get_by_test_id("rx-signature").count() == 0
        body = await phone.evaluate("() => document.body.innerText")
        assert signed["signature"] not in body and signed["signature"][:16] not in body
        assert await overflow(phone) <= 0, "the prescription scrolls sideways on a 360 px phone"
        await save_screenshot(phone, "rx-patient-phone-360")
        # The mark links to the public check page, which verifies it.
        await phone.get_by_test_id("rx-verify-link").click()
        verdict = phone.get_by_test_id("rx-verdict")
        await expect(verdict).to_have_attribute("data-verdict", "valid", timeout=WAIT_MS)
        await expect(phone.get_by_test_id("rx-verified")).to_contain_text("急性支气管炎")
        assert await overflow(phone) <= 0

        # A pharmacy chooses the signed file on the verification page; rx.js reads it into the form.
        path = tmp_path / f"{number}.json"
        path.write_text(json.dumps(signed, ensure_ascii=False))
        await page.context.clear_cookies()
        await page.goto(app_origin + "/verify")
        await page.get_by_test_id("rx-verify-file").set_input_files(str(path))
        await expect(page.get_by_test_id("rx-verify-text")).not_to_have_value("", timeout=WAIT_MS)
        await page.get_by_test_id("rx-verify-submit").click()
        await expect(page.get_by_test_id("rx-verdict")).to_have_attribute(
            "data-verdict", "valid", timeout=WAIT_MS
        )
        assert_only_local_requests(pages, app_origin)
