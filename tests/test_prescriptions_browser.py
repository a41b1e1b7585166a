"""Notes and prescriptions in a real browser: the consult room's partials, the printable page,
the patient's list and the verification page's file picker (notes.js and rx.js at work)."""

from __future__ import annotations

import asyncio
import json
import sqlite3

import pytest
from playwright.async_api import Page, expect

from tests.call_helpers import seed_visit
from tests.harness.browser import PageRecorder, assert_only_local_requests
from tests.harness.server import ConsultServer

pytestmark = pytest.mark.browser
WAIT_MS = 20_000
DOCTOR, PASSWORD = "dr.wang", "Browser-rx-pass-2024"
PATIENT_PASSWORD = "Browser-rx-patient-2024"


def prepare(server: ConsultServer, tmp_dir) -> tuple[str, str, str]:
    """A visit of dr.wang with the demo patient: (public id, room URL, the patient's phone)."""
    server.cli("user", "passwd", DOCTOR, "--password", PASSWORD)
    conn = sqlite3.connect(server.data_dir / "consult.db")
    doctor_id = conn.execute("SELECT id FROM users WHERE username = ?", [DOCTOR]).fetchone()[0]
    conn.close()
    visit = seed_visit(server.data_dir / "consult.db", doctor_id=doctor_id)
    conn = sqlite3.connect(server.data_dir / "consult.db")
    phone = conn.execute("SELECT phone FROM users WHERE id = ?", [visit.patient_id]).fetchone()[0]
    conn.close()
    server.cli("user", "passwd", phone, "--password", PATIENT_PASSWORD)
    return visit.public_id, server.url(f"/doctor/visits/{visit.public_id}/room"), phone


async def sign_in(page: Page, origin: str, login: str, password: str) -> None:
    await page.goto(origin + "/login")
    form = page.locator("main form[action='/login']")
    await form.locator("input[name=identifier]").fill(login)
    await form.locator("input[name=password]").fill(password)
    await form.locator("button[type=submit]").click()
    await page.wait_for_load_state()


async def test_doctor_writes_notes_and_issues_a_prescription_that_verifies(
    consult_server: ConsultServer,
    app_origin: str,
    doctor_page: Page,
    patient_page: Page,
    pages: PageRecorder,
    tmp_path,
) -> None:
    async with asyncio.timeout(120):
        public_id, room_url, patient_phone = await asyncio.to_thread(prepare, consult_server, tmp_path)
        page = doctor_page
        await sign_in(page, app_origin, DOCTOR, PASSWORD)
        await page.goto(room_url)

        # Notes: typed, autosaved, still there after a reload.
        await page.get_by_test_id("tab-notes").click()
        text = page.get_by_test_id("notes-text")
        await expect(text).to_be_enabled(timeout=WAIT_MS)
        await text.fill("Dry cough for 3 days, chest clear.")
        await page.get_by_test_id("notes-advice").fill("Rest and drink warm water.")
        await expect(page.locator("[data-testid=notes-status][data-state=saved]")).to_be_visible(
            timeout=WAIT_MS
        )
        await page.reload()
        await page.get_by_test_id("tab-notes").click()
        await expect(page.get_by_test_id("notes-text")).to_have_value(
            "Dry cough for 3 days, chest clear.", timeout=WAIT_MS
        )

        # Prescription: a missing field is pointed at, then two rows are issued.
        await page.get_by_test_id("tab-rx").click()
        form = page.locator("[data-rx-form]")
        rows = form.locator("[data-rx-row]")
        await expect(rows).to_have_count(1)
        await rows.nth(0).locator("[name=drug]").fill("Amoxicillin")
        await page.get_by_test_id("rx-issue").click()
        await expect(page.get_by_test_id("rx-status")).to_contain_text("Medicine 1", timeout=WAIT_MS)
        assert await rows.nth(0).locator("[name=dose]").get_attribute("aria-invalid") == "true"
        for name, value in (("strength", "500 mg"), ("dose", "1 capsule"), ("frequency", "3 times a day")):
            await rows.nth(0).locator(f"[name={name}]").fill(value)
        await rows.nth(0).locator("[name=quantity]").fill("21 capsules")
        await page.get_by_test_id("rx-add-row").click()
        await expect(rows).to_have_count(2)
        for name, value in (
            ("drug", "布洛芬"),
            ("dose", "1 片"),
            ("frequency", "必要时"),
            ("quantity", "6 片"),
        ):
            await rows.nth(1).locator(f"[name={name}]").fill(value)
        await page.get_by_test_id("rx-issue").click()
        await expect(page.get_by_test_id("rx-status")).to_contain_text("issued", timeout=WAIT_MS)
        issued = page.get_by_test_id("rx-issued").get_by_test_id("rx-item")
        await expect(issued).to_have_count(1, timeout=WAIT_MS)
        number = await issued.get_attribute("data-number")
        assert number and number.startswith("RX-")
        await expect(rows).to_have_count(1)  # a fresh form for the next one

        # The printable page, and its signed file.
        await page.goto(app_origin + f"/prescriptions/{number}")
        await expect(page.get_by_test_id("rx-items")).to_contain_text("布洛芬")
        await expect(page.get_by_test_id("rx-signature")).not_to_be_empty()
        resp = await page.request.get(app_origin + f"/prescriptions/{number}.json")
        signed = await resp.body()
        assert json.loads(signed)["document"]["number"] == number

        # The patient's list on their visit page (what _rx_list.html shows).
        resp = await page.request.get(app_origin + f"/api/visits/{public_id}/prescriptions")
        assert (await resp.json())["advice"] == "Rest and drink warm water."

        # The patient, signed in on the phone, finds it on the visit page with the advice ...
        phone = patient_page
        await sign_in(phone, app_origin, patient_phone, PATIENT_PASSWORD)
        await phone.goto(app_origin + f"/visits/{public_id}")
        mine = phone.get_by_test_id("rx-list").get_by_test_id("rx-item")
        await expect(mine).to_have_count(1, timeout=WAIT_MS)
        assert await mine.get_attribute("data-number") == number
        await expect(mine).to_contain_text("Amoxicillin · 500 mg · 1 capsule · 3 times a day")
        await expect(mine).to_contain_text("布洛芬")
        await expect(phone.get_by_test_id("rx-advice")).to_have_text("Rest and drink warm water.")
        # ... downloads the signed file there, and it verifies with the hospital's key.
        async with phone.expect_download() as download_info:
            await mine.locator("a[download]").click()
        download = await download_info.value
        path = tmp_path / f"{number}.json"
        await download.save_as(path)
        assert path.read_bytes() == signed  # the same signed document the doctor printed
        result = await asyncio.to_thread(consult_server.cli, "verify", str(path))
        assert result.stdout.startswith("VALID"), result.stdout
        assert number in result.stdout

        # A pharmacy chooses that file on the verification page; rx.js reads it into the form.
        await page.context.clear_cookies()
        await page.goto(app_origin + "/verify")
        await page.get_by_test_id("rx-verify-file").set_input_files(str(path))
        await expect(page.get_by_test_id("rx-verify-text")).not_to_have_value("", timeout=WAIT_MS)
        await page.get_by_test_id("rx-verify-submit").click()
        verdict = page.get_by_test_id("rx-verdict")
        await expect(verdict).to_have_attribute("data-verdict", "valid", timeout=WAIT_MS)
        assert_only_local_requests(pages, app_origin)
