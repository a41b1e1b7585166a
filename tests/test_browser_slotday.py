"""Issue 15 in a real browser: the slot page carries one day; the date strip shows another day
by fetching that day's panel (``/book/<department>/doctors/<doctor>/days/<date>``) without a
reload, and without script its links (``?day=``) load the page for that day. In Chinese, on the
patient's phone, and with JavaScript turned off."""

from __future__ import annotations

import asyncio
import re

from playwright.async_api import Browser, BrowserContext, Request, expect

from tests.harness.browser import PATIENT_CONTEXT, PageRecorder
from tests.harness.server import ConsultServer
from tests.test_browser_bookux import NAME, PASSWORD, PHONE, daily_sessions, sign_in

TEST_TIMEOUT = 240
WAIT_MS = 30_000
DOCTOR = "dr.wang"


async def _slots_url(consult_server: ConsultServer, app_origin: str) -> str:
    await asyncio.to_thread(
        consult_server.cli,
        *("user", "add", "--role", "patient", "--phone", PHONE, "--name", NAME, "--password", PASSWORD),
    )
    doctor_id, department_id = await asyncio.to_thread(daily_sessions, consult_server, DOCTOR)
    return f"{app_origin}/book/{department_id}/doctors/{doctor_id}"


async def test_the_strip_fetches_a_day_with_script_and_links_to_it_without(
    consult_server: ConsultServer,
    app_origin: str,
    browser: Browser,
    zh_phone: BrowserContext,
    pages: PageRecorder,
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        slots_url = await _slots_url(consult_server, app_origin)

        # -- with script: the day's panel is fetched and put in place; the page stays ---------
        page = await pages.new_page(zh_phone, "patient")
        await sign_in(page, app_origin)
        await page.goto(slots_url)
        strip = page.get_by_test_id("day-strip")
        await expect(page.locator("[data-day-panel]")).to_have_count(1)
        fetched: list[Request] = []
        page.on("request", lambda r: fetched.append(r) if "/days/" in r.url else None)
        await page.evaluate("window.__samePage = true")
        third = strip.locator("a[data-day]").nth(2)
        day = await third.get_attribute("data-day")
        await third.tap()
        panel = page.locator(f"[data-day-panel='{day}']")
        await expect(panel).to_be_visible(timeout=WAIT_MS)
        await expect(page.locator("[data-day-panel]")).to_have_count(1)
        await expect(third).to_have_attribute("aria-current", "true")
        assert await strip.locator("a[aria-current]").count() == 1
        assert await page.evaluate("window.__samePage === true")
        assert page.url.endswith(f"?day={day}")
        assert [r.url for r in fetched] == [f"{slots_url}/days/{day}"]
        assert re.search(r"\d+月\d+日", await panel.locator("h2").inner_text())
        assert "上午" in await panel.inner_text() or "晚上" in await panel.inner_text()
        # A time from the fetched panel books like any other: the panel is inside the page's form.
        await panel.locator("button.slot:not([disabled])").first.tap()
        await page.wait_for_url(re.compile(r"/visits/[A-Za-z0-9_-]+$"), timeout=WAIT_MS)
        await page.get_by_test_id("status-held").wait_for()

        # -- without script: the same strip is links; the page for that day loads -------------
        context = await browser.new_context(**PATIENT_CONTEXT, locale="zh-CN", java_script_enabled=False)
        try:
            pages.watch_context(context, "patient-no-js")
            plain = await pages.new_page(context, "patient-no-js")
            await sign_in(plain, app_origin)
            requests: list[str] = []
            plain.on("request", lambda r: requests.append(r.url))
            await plain.goto(slots_url)
            fourth = plain.get_by_test_id("day-strip").locator("a[data-day]").nth(3)
            day = await fourth.get_attribute("data-day")
            await fourth.tap()
            await plain.wait_for_url(f"{slots_url}?day={day}", timeout=WAIT_MS)
            await expect(plain.locator("[data-day-panel]")).to_have_count(1)
            await expect(plain.locator(f"[data-day-panel='{day}']")).to_be_visible()
            await expect(plain.get_by_test_id(f"day-{day}")).to_have_attribute("aria-current", "true")
            assert not [u for u in requests if "/days/" in u]
            await plain.locator(f"[data-day-panel='{day}'] button.slot:not([disabled])").first.tap()
            await plain.wait_for_url(re.compile(r"/visits/[A-Za-z0-9_-]+$"), timeout=WAIT_MS)
        finally:
            await context.close()
