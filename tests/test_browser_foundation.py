"""Issue 2 in a real browser: each role signs in, a patient meets the 403 page, 中文 sticks.

Everything runs against the real server process (`consult_server`, demo data) and Debian's
Chromium: the patient on the phone context, the doctor and the admin on desktop contexts. Across
the whole test no page may ask another host for anything, and no page may log a console error
(a CSP violation is one).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

import pytest
from playwright.async_api import Browser, BrowserContext, Page

from tests.conftest import csrf_of
from tests.harness.browser import DOCTOR_CONTEXT, PageRecorder, assert_only_local_requests
from tests.harness.fixtures import FailureArtifacts, _context
from tests.harness.server import ConsultServer

TEST_TIMEOUT = 60
WAIT_MS = 10_000
PASSWORD = "Browser-test-pass-2024"
HOMES = {"patient": "/patient", "doctor": "/doctor", "admin": "/admin"}


def set_password(server: ConsultServer, login: str, password: str = PASSWORD) -> str:
    """The demo passwords are printed once; give the account a known one through the CLI."""
    server.cli("user", "passwd", login, "--password", password)
    return password


async def sign_in(page: Page, origin: str, login: str, password: str, role: str) -> None:
    """Through the real login form; lands on the role's own home page."""
    await page.goto(origin + "/login")
    form = page.locator("main form[action='/login']")
    await form.locator("input[name=identifier]").fill(login)
    await form.locator("input[name=password]").fill(password)
    await form.locator("button[type=submit]").click()
    await page.wait_for_url(origin + HOMES[role], timeout=WAIT_MS)
    await page.get_by_test_id("home-title").wait_for(timeout=WAIT_MS)
    await page.get_by_test_id("logout").wait_for(timeout=WAIT_MS)


@pytest.fixture
async def admin_context(
    browser: Browser, pages: PageRecorder, failure_artifacts: FailureArtifacts
) -> AsyncIterator[BrowserContext]:
    """A second desktop context, like `doctor_context` (its pages are recorded and saved)."""
    async with _context(browser, pages, failure_artifacts, "admin", DOCTOR_CONTEXT) as context:
        yield context


def console_errors(pages: PageRecorder, allowed: tuple[re.Pattern[str], ...] = ()) -> list[str]:
    """Console errors and uncaught page errors of every recorded page, minus the `allowed`."""
    found = []
    for log in pages.logs:
        for line in log.console:
            if line.startswith("[error]") and not any(p.search(line) for p in allowed):
                found.append(f"{log.name}: {line}")
        found += [f"{log.name}: {e}" for e in log.errors]
    return found


# The browser reports the 403 answers this test asks for itself as failed resources.
EXPECTED_403 = (re.compile(r"status of 403 .*/(doctor|admin)\b"),)


async def test_roles_sign_in_forbidden_pages_and_chinese(
    consult_server: ConsultServer,
    app_origin: str,
    patient_page: Page,
    doctor_page: Page,
    admin_context: BrowserContext,
    pages: PageRecorder,
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        for login in ("13800000000", "dr.wang", "admin"):
            await asyncio.to_thread(set_password, consult_server, login)

        # -- the patient, on the phone ------------------------------------------------------
        patient = patient_page
        assert patient.viewport_size == {"width": 390, "height": 844}
        assert await patient.evaluate("matchMedia('(pointer: coarse)').matches")
        await sign_in(patient, app_origin, "13800000000", PASSWORD, "patient")
        assert await patient.get_by_test_id("book").is_visible()

        # A patient opening the doctor's and the admin's pages gets the 403 page, not a crash.
        for path in ("/doctor", "/admin"):
            response = await patient.goto(app_origin + path)
            assert response is not None and response.status == 403, path
            error = patient.locator("section.error-page")
            assert await error.get_attribute("data-status") == "403"
            text = await error.inner_text()
            assert "Not allowed" in text and "You do not have permission to open this page." in text
            assert "Traceback" not in await patient.content()
            # Still signed in as the patient: the header offers the patient's home.
            assert await patient.locator("header a[href='/patient']").count() == 1

        # -- the doctor and the admin, on desktop -------------------------------------------
        await sign_in(doctor_page, app_origin, "dr.wang", PASSWORD, "doctor")
        assert await doctor_page.get_by_test_id("home-title").inner_text() == "My clinic"
        admin_page = await pages.new_page(admin_context, "admin")
        await sign_in(admin_page, app_origin, "admin", PASSWORD, "admin")
        assert await admin_page.get_by_test_id("home-title").inner_text() == "Administration"
        # A doctor cannot open the admin page either.
        response = await doctor_page.goto(app_origin + "/admin")
        assert response is not None and response.status == 403
        await doctor_page.goto(app_origin + "/doctor")

        # -- 中文 through the header's language button, remembered on the next page ----------
        await patient.goto(app_origin + "/patient")
        assert await patient.get_by_test_id("home-title").inner_text() == "My visits"
        await patient.get_by_test_id("lang-zh_CN").click()
        await patient.wait_for_url(app_origin + "/patient", timeout=WAIT_MS)
        await patient.get_by_text("我的问诊", exact=True).first.wait_for(timeout=WAIT_MS)
        assert await patient.get_by_test_id("home-title").inner_text() == "我的问诊"
        assert await patient.locator("html").get_attribute("lang") == "zh-CN"
        assert await patient.get_by_test_id("lang-en").inner_text() == "English"

        # The next page is Chinese too (the choice is remembered, whatever the browser asks for).
        await patient.goto(app_origin + "/book")
        assert "选择科室" in await patient.locator("main").inner_text()
        response = await patient.goto(app_origin + "/doctor")
        assert response is not None and response.status == 403
        assert "无权访问" in await patient.locator("section.error-page").inner_text()

        # ...and the English-speaking doctor still sees English.
        await doctor_page.reload()
        assert await doctor_page.get_by_test_id("home-title").inner_text() == "My clinic"

        assert_only_local_requests(pages, app_origin)
        assert sum(len(log.requests) for log in pages.logs) > 10
        assert not console_errors(pages, EXPECTED_403), console_errors(pages, EXPECTED_403)


# What Chromium sent on every form post above: `Referrer-Policy: no-referrer` makes it
# `Origin: null`, and only Sec-Fetch-Site tells the server the post is the site's own.
@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"Origin": "null", "Sec-Fetch-Site": "same-origin"}, 303),
        ({"Origin": "null", "Sec-Fetch-Site": "cross-site"}, 403),
        ({"Origin": "null", "Sec-Fetch-Site": "same-site"}, 403),
        ({"Origin": "null"}, 403),
    ],
)
async def test_null_origin_post_is_judged_by_sec_fetch_site(client, make_user, headers, status) -> None:
    make_user("patient", login="13900000001")
    token = await csrf_of(client)
    resp = await client.post(
        "/login",
        data={"identifier": "13900000001", "password": "correct horse", "csrf_token": token},
        headers=headers,
        allow_redirects=False,
    )
    assert resp.status == status, await resp.text()


async def test_demo_banner_shows_on_a_demo_server_only(consult_server_factory, patient_page: Page) -> None:
    """A `consult demo` data dir shows the banner at the top of the page; production does not."""
    async with asyncio.timeout(TEST_TIMEOUT):
        demo = await consult_server_factory(demo=True)
        await patient_page.goto(demo.url("/login"))
        banner = patient_page.get_by_test_id("demo-banner")
        assert await banner.is_visible()
        assert "Demo — not for patients" in await banner.inner_text()  # the browser asks for English
        box = await banner.bounding_box()
        assert box is not None and box["y"] < 5 and box["height"] > 10  # at the top, not hidden
        production = await consult_server_factory(demo=False, name="production")
        await patient_page.goto(production.url("/login"))
        assert await patient_page.locator("main form[action='/login']").count() == 1
        assert await patient_page.get_by_test_id("demo-banner").count() == 0
