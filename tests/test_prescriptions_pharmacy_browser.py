"""Pharmacist review in a real browser, in Chinese (setting pharmacist_review on): the doctor
signs, the patient does not see it yet, the pharmacist approves it on /pharmacy, then the
patient's phone shows it verified. Screenshot of the pharmacist's queue."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import pytest
from playwright.async_api import BrowserContext, expect

from tests.harness.browser import PageRecorder, save_screenshot
from tests.harness.server import ConsultServer
from tests.test_prescriptions_browser import DOCTOR as DOCTOR_LOGIN
from tests.test_prescriptions_browser import PASSWORD as DOCTOR_PASSWORD
from tests.test_prescriptions_browser import (
    PATIENT_PASSWORD,
    WAIT_MS,
    fill_prescription,
    overflow,
    prepare,
    sign_in,
    zh_phone_360,  # noqa: F401  (fixture)
)

pytestmark = pytest.mark.browser
PHARMACIST, PHARMACIST_PASSWORD = "yaoshi.zhou", "Browser-pharmacist-2024"


@pytest.fixture
def consult_env() -> Mapping[str, str]:
    return {"CONSULT_PHARMACIST_REVIEW": "true"}


async def test_pharmacist_approves_before_the_patient_sees_the_prescription(
    consult_server: ConsultServer,
    app_origin: str,
    zh_desktop: BrowserContext,
    zh_phone_360: BrowserContext,  # noqa: F811
    pages: PageRecorder,
) -> None:
    async with asyncio.timeout(180):
        public_id, room_url, patient_phone = await asyncio.to_thread(prepare, consult_server)
        await asyncio.to_thread(
            consult_server.cli, "user", "add", "--role", "pharmacist", "--username", PHARMACIST,
            "--name", "周药师", "--password", PHARMACIST_PASSWORD,
        )  # fmt: skip

        doctor = await pages.new_page(zh_desktop, "doctor")
        await sign_in(doctor, app_origin, DOCTOR_LOGIN, DOCTOR_PASSWORD)
        await doctor.goto(room_url)
        await doctor.get_by_test_id("tab-rx").click()
        await fill_prescription(doctor, diagnosis="社区获得性肺炎")
        await doctor.get_by_test_id("rx-preview").click()
        await expect(doctor.get_by_test_id("rx-preview-panel")).to_be_visible(timeout=WAIT_MS)
        await doctor.get_by_test_id("rx-issue").click()
        await expect(doctor.get_by_test_id("rx-status")).to_contain_text("药师审核通过后", timeout=WAIT_MS)
        issued = doctor.get_by_test_id("rx-issued").get_by_test_id("rx-item")
        await expect(issued).to_have_attribute("data-status", "pending", timeout=WAIT_MS)
        number = await issued.get_attribute("data-number")

        # The patient does not see it while it waits.
        phone = await pages.new_page(zh_phone_360, "patient")
        await sign_in(phone, app_origin, patient_phone, PATIENT_PASSWORD)
        await phone.goto(app_origin + f"/visits/{public_id}")
        await expect(phone.get_by_test_id("rx-list")).to_contain_text("本次就诊没有处方", timeout=WAIT_MS)

        # The pharmacist signs in, lands on the queue, approves.
        await doctor.context.clear_cookies()
        await sign_in(doctor, app_origin, PHARMACIST, PHARMACIST_PASSWORD)
        await expect(doctor.get_by_test_id("pharmacy-title")).to_be_visible(timeout=WAIT_MS)
        item = doctor.locator(f"[data-testid=pharmacy-item][data-number='{number}']")
        await expect(item).to_contain_text("社区获得性肺炎")
        await save_screenshot(doctor, "rx-pharmacist-queue")
        await item.get_by_test_id("pharmacy-approve").click()
        await expect(doctor.get_by_test_id("pharmacy-empty")).to_be_visible(timeout=WAIT_MS)
        await expect(doctor.get_by_test_id("pharmacy-done")).to_contain_text(number)

        # Now the patient's phone has it, verified, without sideways scrolling.
        await phone.reload()
        mine = phone.get_by_test_id("rx-list").get_by_test_id("rx-item")
        await expect(mine).to_have_count(1, timeout=WAIT_MS)
        await mine.get_by_test_id("rx-open").click()
        await expect(phone.get_by_test_id("rx-verified-mark")).to_contain_text("已验证", timeout=WAIT_MS)
        assert await overflow(phone) <= 0
