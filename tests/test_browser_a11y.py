"""Every patient page on a phone, in Chinese, checked for an older patient's needs.

Real Chromium (390x844, touch, zh-CN) through the real server. On each page (tests/harness/a11y.py):
axe-core's WCAG 2 A/AA rules with no serious or critical violation (results per page in the test
output and test-artifacts/axe/), every control at least 44 x 44 CSS px, text at 200 % without
sideways scrolling or cut-off controls, and a full-page screenshot in test-artifacts/screenshots/.
The pages: home, register and its code, patient home, booking (departments, doctors, times), the
visit with an uploaded report, the payment simulator, payment status and receipt, the call page
too early, before joining and after the end, a prescription and the public check page, the
account page, an error page, and the forgotten-password pages. Then the large-text switch.
"""

from __future__ import annotations

import asyncio
import json
import re

import pytest
from playwright.async_api import Browser, BrowserContext, Page, expect

from tests.account_helpers import texted_code
from tests.call_helpers import keyed_settings, patient_token, seed_visit
from tests.db_helpers import read
from tests.harness.a11y import PageAudit, text_200_problems
from tests.harness.axe import axe_check
from tests.harness.browser import PageRecorder, assert_only_local_requests, save_screenshot
from tests.harness.programs import NPM_PACKAGES, require_font
from tests.harness.server import ConsultServer
from tests.test_browser_booking import make_pdf

pytestmark = pytest.mark.browser
TEST_TIMEOUT = 300
WAIT_MS = 30_000
PATIENT_NAME = "陈桂兰"
PATIENT_PHONE = "13811112222"
PATIENT_PASSWORD = "Guilan-2024-follow"
DOCTOR, DOCTOR_PASSWORD = "dr.wang", "Doctor-a11y-pass-2024"
MAIN_FONT_JS = "parseFloat(getComputedStyle(document.querySelector('main')).fontSize)"


def ids_of(server: ConsultServer) -> tuple[int, int]:
    def fn(db):
        doctor = db.execute("SELECT id FROM users WHERE username = ?", [DOCTOR]).fetchone()[0]
        patient = db.execute("SELECT id FROM users WHERE phone = ?", [PATIENT_PHONE]).fetchone()[0]
        return doctor, patient

    return read(server, fn)


async def issue_prescription(page: Page, origin: str, public_id: str) -> str:
    """dr.wang signs in (in `page`) and issues a prescription on the visit: its number."""
    await page.goto(origin + "/login")
    form = page.locator("main form[action='/login']")
    await form.locator("input[name=identifier]").fill(DOCTOR)
    await form.locator("input[name=password]").fill(DOCTOR_PASSWORD)
    await form.locator("button[type=submit]").click()
    await page.wait_for_url(origin + "/doctor")
    token = await page.locator("input[name=csrf_token]").first.input_value()
    form = {
        "sex": "female",
        "age": 67,
        "diagnosis": "急性鼻窦炎",
        "allergies": "无",
        "items": [
            {
                "drug": "阿莫西林胶囊",
                "strength": "0.25 g × 24 粒",
                "dose": "0.5",
                "dose_unit": "g",
                "route": "oral",
                "frequency": "tid",
                "days": 7,
                "quantity": 2,
                "quantity_unit": "盒",
                "instructions": "饭后服用",
            },
            {
                "drug": "布洛芬缓释胶囊",
                "strength": "0.3 g × 20 粒",
                "dose": "1",
                "dose_unit": "粒",
                "route": "oral",
                "frequency": "prn",
                "days": 3,
                "quantity": 1,
                "quantity_unit": "盒",
            },
        ],
    }
    headers = {"Content-Type": "application/json", "X-CSRF-Token": token, "Accept": "application/json"}
    # As the doctor's page does: preview, then sign exactly what the preview showed.
    shown = await page.request.post(
        f"{origin}/api/visits/{public_id}/prescriptions/preview", data=json.dumps(form), headers=headers
    )
    assert shown.status == 200, await shown.text()
    form["preview_hash"] = (await shown.json())["preview_hash"]
    response = await page.request.post(
        f"{origin}/api/visits/{public_id}/prescriptions", data=json.dumps(form), headers=headers
    )
    assert response.status == 201, await response.text()
    return (await response.json())["prescription"]["number"]


async def test_every_patient_page_is_accessible_and_legible_on_a_phone(
    consult_server: ConsultServer,
    app_origin: str,
    zh_phone: BrowserContext,
    browser: Browser,
    pages: PageRecorder,
) -> None:
    require_font("zh-cn")  # the screenshots must show Chinese, not boxes
    audit = PageAudit()
    async with asyncio.timeout(TEST_TIMEOUT):
        await asyncio.to_thread(consult_server.cli, "user", "passwd", DOCTOR, "--password", DOCTOR_PASSWORD)
        page = await pages.new_page(zh_phone, "patient")

        # -- signed out: home, sign-in, registration and its code ---------------------------
        await page.goto(app_origin + "/")
        assert await page.locator("html").get_attribute("lang") == "zh-CN"
        await audit.check(page, "home")
        await page.goto(app_origin + "/login")
        await audit.check(page, "login")
        await page.goto(app_origin + "/register")
        await audit.check(page, "register")
        form = page.locator("main form[action='/register']")
        await form.locator("input[name=name]").fill(PATIENT_NAME)
        await form.locator("input[name=phone]").fill(PATIENT_PHONE)
        await form.locator("input[name=password]").fill(PATIENT_PASSWORD)
        await form.locator("input[name=password2]").fill(PATIENT_PASSWORD)
        await form.locator("button[type=submit]").tap()
        await page.wait_for_url(app_origin + "/register/verify")
        await audit.check(page, "register-verify")
        code = await asyncio.to_thread(texted_code, consult_server, PATIENT_PHONE)
        await page.get_by_test_id("code").fill(code)
        await page.locator("main form[action='/register/verify'] button[type=submit]").tap()
        await page.wait_for_url(app_origin + "/patient")
        await audit.check(page, "patient-home-new")

        # -- booking ------------------------------------------------------------------------
        await page.get_by_test_id("book").tap()
        await page.wait_for_url(app_origin + "/book")
        await audit.check(page, "book-departments")
        await page.get_by_test_id("department-cardiology").tap()
        await page.wait_for_url(re.compile(r"/book/\d+$"))
        await audit.check(page, "book-doctors")
        await page.locator("[data-testid^='doctor-'] a.choice").first.tap()
        await page.wait_for_url(re.compile(r"/book/\d+/doctors/\d+$"))
        await audit.check(page, "book-slots")
        await page.locator("[data-testid=slots] button.slot:not([disabled])").first.tap()
        await page.wait_for_url(re.compile(r"/visits/[A-Za-z0-9_-]+$"))
        visit_url = page.url
        await page.get_by_test_id("status-held").wait_for()
        await page.locator("[data-reports-upload]").wait_for(state="visible", timeout=WAIT_MS)
        await page.get_by_test_id("reports-file").set_input_files(
            [{"name": "血常规.pdf", "mimeType": "application/pdf", "buffer": make_pdf(40_000)}]
        )
        await expect(page.get_by_test_id("report-item")).to_have_count(1, timeout=WAIT_MS)
        await audit.check(page, "visit-held-with-report")

        # -- payment --------------------------------------------------------------------------
        await page.get_by_test_id("pay-button").tap()
        await page.wait_for_url(re.compile(r"/simulator/pay/[^/]+$"))
        order_id = page.url.rsplit("/", 1)[1]
        simulator_url = page.url
        await audit.check(page, "pay-simulator")
        await page.goto(f"{app_origin}/pay/{order_id}")  # the page that waits for the gateway
        await audit.check(page, "pay-status")
        await page.goto(simulator_url)
        await page.get_by_test_id("simulator-pay").tap()
        await page.wait_for_url(visit_url, timeout=WAIT_MS)
        await page.get_by_test_id("status-confirmed").wait_for()
        await expect(page.get_by_test_id("payment-state")).to_contain_text("已付款", timeout=WAIT_MS)
        await audit.check(page, "visit-confirmed")
        await page.goto(f"{app_origin}/pay/{order_id}/receipt")
        await audit.check(page, "pay-receipt")

        # -- the call page: too early (the visit just booked), before joining, after the end -
        await page.goto(visit_url)
        await page.get_by_test_id("call-link").tap()
        await page.wait_for_url(re.compile(r"/call/"))
        await audit.check(page, "call-too-early")
        doctor_id, patient_id = await asyncio.to_thread(ids_of, consult_server)
        keyed = await asyncio.to_thread(keyed_settings, consult_server.data_dir)
        now = seed_visit(consult_server, doctor_id=doctor_id, patient_id=patient_id, starts_in_s=-60)
        await page.goto(consult_server.url(f"/call/{patient_token(keyed, now)}"))
        await page.locator("[data-testid=check-connect][data-state=ok]").wait_for(timeout=WAIT_MS)
        await audit.check(page, "call-precheck")
        await page.get_by_test_id("join").tap()
        await expect(page.get_by_test_id("waiting-room")).to_be_visible(timeout=WAIT_MS)
        await audit.check(page, "call-waiting")
        done = seed_visit(
            consult_server, doctor_id=doctor_id, patient_id=patient_id, starts_in_s=-300, status="completed"
        )
        await page.goto(consult_server.url(f"/call/{patient_token(keyed, done)}"))
        await audit.check(page, "call-ended")

        # -- a prescription on the finished visit, and the public check page ---------------
        desk = await browser.new_context(locale="zh-CN")
        try:
            number = await issue_prescription(await desk.new_page(), app_origin, done.public_id)
        finally:
            await desk.close()
        await page.goto(f"{app_origin}/visits/{done.public_id}")
        await expect(page.get_by_test_id("rx-list").get_by_test_id("rx-item")).to_have_count(1)
        await audit.check(page, "visit-with-prescription")
        await page.goto(f"{app_origin}/prescriptions/{number}")
        await audit.check(page, "prescription")
        await page.goto(app_origin + "/verify")
        await audit.check(page, "prescription-verify")
        await page.goto(app_origin + "/patient")
        await audit.check(page, "patient-home")
        await page.goto(app_origin + "/account")
        await audit.check(page, "account")
        await page.goto(app_origin + "/visits/no-such-visit-here")
        await audit.check(page, "error")

        # -- signed out: the forgotten password ----------------------------------------------
        await page.get_by_test_id("logout").tap()
        await page.wait_for_url(re.compile(r"/login$|/$"))
        await page.goto(app_origin + "/password/forgot")
        await audit.check(page, "password-forgot")
        await page.locator("main form[action='/password/forgot'] input[name=phone]").fill(PATIENT_PHONE)
        await page.locator("main form[action='/password/forgot'] button[type=submit]").tap()
        await page.wait_for_url(app_origin + "/password/reset")
        await audit.check(page, "password-reset")

    assert_only_local_requests(pages, app_origin)
    assert len(audit.seen) == 25, audit.seen
    audit.assert_clean()


async def test_the_large_text_switch_stays_on_every_page_without_a_flash(
    consult_server: ConsultServer, app_origin: str, zh_phone: BrowserContext, pages: PageRecorder
) -> None:
    async with asyncio.timeout(120):
        page = await pages.new_page(zh_phone, "patient")
        await page.goto(app_origin + "/")
        normal = await page.evaluate(MAIN_FONT_JS)
        switch = page.get_by_test_id("text-size")
        assert await switch.get_attribute("aria-pressed") == "false"
        await switch.tap()
        await expect(page.get_by_test_id("text-size")).to_have_attribute("aria-pressed", "true")
        large = await page.evaluate(MAIN_FONT_JS)
        assert large >= 1.2 * normal, (normal, large)
        await save_screenshot(page, "large-text-home")
        # Other pages come from the server already large: the class is in the HTML itself, so
        # nothing is drawn small first (no script decides it after the page appeared).
        for path in ("/login", "/register", "/book", "/password/forgot"):
            response = await page.request.get(app_origin + path)
            assert re.search(r'<html[^>]*class="[^"]*text-large', await response.text()), path
            await page.goto(app_origin + path)
            size = await page.evaluate(MAIN_FONT_JS)
            assert size == large, (path, size)
            assert not await text_200_problems(page), path  # large text and 200 % on top
        # And off again.
        await page.get_by_test_id("text-size").tap()
        await expect(page.get_by_test_id("text-size")).to_have_attribute("aria-pressed", "false")
        size = await page.evaluate(MAIN_FONT_JS)
        assert size == normal
        assert page.url == app_origin + "/password/forgot"  # back where the reader was


async def test_axe_runs_under_the_pages_csp_and_fails_on_a_serious_violation(
    consult_server: ConsultServer, app_origin: str, zh_phone: BrowserContext, pages: PageRecorder
) -> None:
    """The check itself: axe loads past the strict CSP (which still holds for the page's own
    scripts) and a nameless button, an image without alt text and white text on white fail it."""
    async with asyncio.timeout(60):
        page = await pages.new_page(zh_phone, "patient")
        response = await page.goto(app_origin + "/login")
        assert "script-src 'self'" in response.headers["content-security-policy"]
        clean = await axe_check(page, "selftest-login")
        assert clean["passes"] > 5 and clean["axe"] == NPM_PACKAGES["axe-core"]
        await page.evaluate(
            """() => {
              const main = document.querySelector("main");
              main.insertAdjacentHTML("beforeend", '<button type="button" id="nameless"></button>');
              main.insertAdjacentHTML("beforeend", '<img id="no-alt" src="/static/icon.svg">');
              main.insertAdjacentHTML("beforeend", '<button type="button" id="faint">删除</button>');
              document.getElementById("faint").style.color = "#fafafa";  // white on white
            }"""
        )
        with pytest.raises(AssertionError) as failed:
            await axe_check(page, "selftest-broken")
        for rule in ("button-name", "image-alt", "color-contrast"):
            assert rule in str(failed.value), rule
        assert "#nameless" in str(failed.value)
        # The page's own inline script is still refused: axe got in through DevTools, not a hole.
        assert await page.evaluate(
            """() => new Promise((resolve) => {
              document.addEventListener("securitypolicyviolation", () => resolve(true), {once: true});
              const s = document.createElement("script"); s.textContent = "window.__ran = 1";
              document.body.append(s);
              setTimeout(() => resolve(false), 2000);
            })"""
        )
