"""The patient's call page, waiting and ending, in Chinese on a phone (issue 12): real Debian
Chromium set to zh-CN, the real server, the private network namespace of the browser tests.

- Too early: the link opened before its window shows the visit, a device test that stays on
  the phone, and a countdown; when the window opens the page moves on to the pre-call check by
  itself.
- In the call: the other side's mute and camera-off are shown on both sides (and again after
  a reconnect); the connection's state is captioned; chat messages carry their time; the phone
  upright and sideways keeps the layout (screenshots saved in test-artifacts/screenshots/).
- The end: the warning in minutes, then one end screen that says what happens next; the
  warning, badge and countdown gone, the camera stopped; reopening the link shows the same.
On every screen read, no English sentence (tests/language_check.py).
"""

from __future__ import annotations

import asyncio
import re
import time

from playwright.async_api import BrowserContext, Page, expect

from consult.calls.links import EARLY_S
from consult.core.formatting import to_local
from tests.call_helpers import SeededVisit, keyed_settings, patient_token, seed_visit
from tests.db_helpers import rows
from tests.harness.browser import PageRecorder, save_screenshot
from tests.harness.server import ConsultServer
from tests.test_browser_call import DOCTOR, PASSWORD, sign_in_doctor, state, wait_frames
from tests.test_browser_zh import Screens

TEST_TIMEOUT = 150
WAIT_MS = 30_000

# Before any page script: every track getUserMedia hands out, so the test can see them stopped;
# and every text the connection caption showed (some last only a moment).
WATCH_JS = """
(() => {
  window.__tracks = [];
  const md = navigator.mediaDevices;
  const native = md.getUserMedia.bind(md);
  md.getUserMedia = async (constraints) => {
    const stream = await native(constraints);
    window.__tracks.push(...stream.getTracks());
    return stream;
  };
  window.__captions = [];
  document.addEventListener("DOMContentLoaded", () => {
    const el = document.querySelector("[data-caption]");
    if (!el) return;
    new MutationObserver(() => { if (!el.hidden && el.textContent) window.__captions.push(el.textContent); })
      .observe(el, {childList: true, characterData: true, subtree: true, attributes: true});
  });
})();
"""
LIVE_TRACKS_JS = "() => window.__tracks.filter((t) => t.readyState === 'live').length"


def seed_call(server: ConsultServer, *, starts_in_s: float = -60) -> tuple[SeededVisit, str, str]:
    """A confirmed visit of dr.wang with the demo patient: (the visit, patient link, room URL)."""
    server.cli("user", "passwd", DOCTOR, "--password", PASSWORD)
    doctor_id = rows(server, "SELECT id FROM users WHERE username = ?", [DOCTOR])[0]["id"]
    visit = seed_visit(server, doctor_id=doctor_id, starts_in_s=starts_in_s)
    token = patient_token(keyed_settings(server.data_dir), visit)
    return visit, server.url(f"/call/{token}"), server.url(f"/doctor/visits/{visit.public_id}/room")


async def join_call(patient: Page, doctor: Page, link: str, room: str, origin: str) -> None:
    """Patient: pre-call check and Join; doctor: signs in, admits; both decode video."""
    await patient.goto(link)
    await patient.locator("[data-testid=check-connect][data-state=ok]").wait_for(timeout=WAIT_MS)
    await patient.get_by_test_id("join").tap()
    await expect(patient.get_by_test_id("waiting-room")).to_be_visible(timeout=WAIT_MS)
    await sign_in_doctor(doctor, origin)
    await doctor.goto(room)
    await state(doctor, "patient_waiting", WAIT_MS)
    await doctor.get_by_test_id("admit").click()
    await expect(patient.get_by_test_id("stage")).to_be_visible(timeout=WAIT_MS)
    await asyncio.gather(wait_frames(patient, 10, 40), wait_frames(doctor, 10, 40))


async def test_too_early_page_shows_the_visit_tests_devices_and_opens_by_itself(
    consult_server: ConsultServer,
    zh_phone: BrowserContext,
    pages: PageRecorder,
) -> None:
    screens = Screens()
    async with asyncio.timeout(TEST_TIMEOUT):
        # The link opens EARLY_S before the start: this one opens 12 s from now.
        visit, link, _ = await asyncio.to_thread(seed_call, consult_server, starts_in_s=EARLY_S + 12)
        page = await pages.new_page(zh_phone, "patient")
        await page.add_init_script(WATCH_JS)
        await page.goto(link)
        opened = time.time()
        early = page.get_by_test_id("call-early")
        await expect(early).to_be_visible()
        # The site's header, the visit in the patient's words (today, or tomorrow a quarter of an
        # hour before midnight; no time-zone name).
        await expect(page.locator("header.topbar")).to_be_visible()
        text = await screens.read(page, "too early")
        tz = keyed_settings(consult_server.data_dir).timezone
        day = "今天" if to_local(visit.starts_at, tz).date() == to_local(opened, tz).date() else "明天"
        assert "王" in text and day in text, text
        assert "Asia/" not in text and "UTC" not in text and "CST" not in text
        left = int(await page.get_by_test_id("early-countdown").get_attribute("data-seconds-left"))
        assert 1 <= left <= 13, left
        # The device test: the preview plays and the meter moves (the fake device beeps).
        await page.get_by_test_id("test-devices").tap()
        await page.wait_for_function(
            "() => document.querySelector('[data-testid=preview]').videoWidth > 0", timeout=WAIT_MS
        )
        await page.locator("[data-check=mic][data-state=ok]").wait_for(timeout=WAIT_MS)
        await screens.read(page, "too early, device test")
        await save_screenshot(page, "call-too-early-portrait")
        # It stays local: no signaling socket, no peer connection.
        assert not [u for u in pages.log(page).requests if "/ws/" in u]
        assert await page.evaluate("typeof window.__consultPc === 'undefined'")
        # The countdown runs down, then the page moves on by itself to the pre-call check.
        await page.wait_for_function(
            "(n) => Number(document.querySelector('[data-testid=early-countdown]').dataset.secondsLeft) < n",
            arg=left,
            timeout=WAIT_MS,
        )
        await expect(page.get_by_test_id("precheck")).to_be_visible(timeout=WAIT_MS)
        assert page.url == link
        await page.locator("[data-testid=check-connect][data-state=ok]").wait_for(timeout=WAIT_MS)
        await screens.read(page, "pre-call check after the opening")
    assert not screens.english, "English on Chinese screens:\n" + "\n".join(screens.english)


async def test_remote_mute_and_camera_off_show_on_both_sides_and_the_phone_turns(
    consult_server: ConsultServer,
    app_origin: str,
    zh_phone: BrowserContext,
    zh_desktop: BrowserContext,
    pages: PageRecorder,
) -> None:
    screens = Screens()
    async with asyncio.timeout(TEST_TIMEOUT):
        _, link, room = await asyncio.to_thread(seed_call, consult_server)
        patient = await pages.new_page(zh_phone, "patient")
        doctor = await pages.new_page(zh_desktop, "doctor")
        for page in (patient, doctor):
            await page.add_init_script(WATCH_JS)
        await join_call(patient, doctor, link, room, app_origin)
        # The connection was captioned for the patient in plain words.
        assert "正在连接医生…" in await patient.evaluate("window.__captions"), await patient.evaluate(
            "window.__captions"
        )
        for page in (patient, doctor):
            await expect(page.get_by_test_id("remote-muted")).to_be_hidden()
            await expect(page.get_by_test_id("remote-camera-off")).to_be_hidden()

        # Patient mutes, then turns the camera off: the doctor sees both over the video.
        await patient.get_by_test_id("mute").tap()
        await expect(doctor.get_by_test_id("remote-muted")).to_be_visible(timeout=WAIT_MS)
        await expect(doctor.get_by_test_id("remote-muted")).to_have_text("患者已静音。")
        await patient.get_by_test_id("camera").tap()
        await expect(doctor.get_by_test_id("remote-camera-off")).to_be_visible(timeout=WAIT_MS)
        await expect(doctor.get_by_test_id("remote-camera-off")).to_have_text("患者已关闭摄像头。")
        await screens.read(doctor, "consult room, patient muted with camera off")
        await save_screenshot(doctor, "room-patient-muted-camera-off")
        # Still known after the doctor's page reloads (a new connection is told again).
        await doctor.reload()
        await wait_frames(doctor, 5, 40)
        await expect(doctor.get_by_test_id("remote-camera-off")).to_be_visible(timeout=WAIT_MS)
        await expect(doctor.get_by_test_id("remote-muted")).to_be_visible(timeout=WAIT_MS)
        # Back on: the overlays go.
        await patient.get_by_test_id("mute").tap()
        await patient.get_by_test_id("camera").tap()
        await expect(doctor.get_by_test_id("remote-muted")).to_be_hidden(timeout=WAIT_MS)
        await expect(doctor.get_by_test_id("remote-camera-off")).to_be_hidden(timeout=WAIT_MS)

        # The other way: the doctor mutes and turns the camera off; the patient sees both.
        await doctor.get_by_test_id("mute").click()
        await doctor.get_by_test_id("camera").click()
        await expect(patient.get_by_test_id("remote-muted")).to_have_text("医生已静音。", timeout=WAIT_MS)
        await expect(patient.get_by_test_id("remote-camera-off")).to_be_visible(timeout=WAIT_MS)
        await expect(patient.get_by_test_id("remote-camera-off")).to_have_text("医生已关闭摄像头。")
        await screens.read(patient, "in call, doctor muted with camera off")
        await save_screenshot(patient, "call-phone-doctor-muted-camera-off")
        await doctor.get_by_test_id("mute").click()
        await doctor.get_by_test_id("camera").click()
        await expect(patient.get_by_test_id("remote-muted")).to_be_hidden(timeout=WAIT_MS)
        await expect(patient.get_by_test_id("remote-camera-off")).to_be_hidden(timeout=WAIT_MS)

        # Chat messages show their time (HH:MM) on both sides.
        await doctor.get_by_test_id("tab-chat").click()
        await doctor.get_by_test_id("chat-input").fill("请把药盒拿给我看看。")
        await doctor.get_by_test_id("chat-send").click()
        message = patient.get_by_test_id("chat-message").last
        await expect(message).to_contain_text("请把药盒拿给我看看。", timeout=WAIT_MS)
        assert re.fullmatch(r"\d\d:\d\d", await message.get_by_test_id("chat-time").inner_text())
        mine = doctor.get_by_test_id("chat-message").last.get_by_test_id("chat-time")
        assert re.fullmatch(r"\d\d:\d\d", await mine.inner_text())
        await patient.get_by_test_id("chat-toggle").tap()  # close the chat: the video alone

        # Upright and sideways: the doctor large, yourself small, every control on the screen.
        for name, size in (("portrait", (390, 844)), ("landscape", (844, 390))):
            await patient.set_viewport_size({"width": size[0], "height": size[1]})
            await patient.get_by_test_id("stage").scroll_into_view_if_needed()
            layout = await settled_layout(patient)
            assert layout["scrollWidth"] <= layout["width"], (name, layout)
            assert layout["remote"]["area"] > 3 * layout["self"]["area"], (name, layout)
            for control in layout["controls"]:
                assert control["visible"], (name, control, layout)
                assert control["height"] >= 44, (name, control)
            await save_screenshot(patient, f"call-phone-{name}")
            await screens.read(patient, f"in call, {name}")
    assert not screens.english, "English on Chinese screens:\n" + "\n".join(screens.english)


# The call's geometry on the phone: page width, the two videos' boxes, each control in view.
LAYOUT_JS = """
() => {
  const box = (el) => { const r = el.getBoundingClientRect();
    return {top: r.top, left: r.left, bottom: r.bottom, right: r.right, area: r.width * r.height}; };
  const w = window.innerWidth, h = window.innerHeight;
  return {
    width: w, height: h, scrollWidth: document.documentElement.scrollWidth,
    remote: box(document.querySelector("[data-testid=remote-video]")),
    self: box(document.querySelector("[data-testid=self-video]")),
    controls: Array.from(document.querySelectorAll(".controls .control:not([hidden])")).map((b) => {
      const r = b.getBoundingClientRect();
      return {name: b.dataset.testid, height: r.height,
              visible: r.top >= 0 && r.left >= 0 && r.bottom <= h + 0.5 && r.right <= w + 0.5};
    }),
  };
}
"""


async def settled_layout(page: Page, timeout_s: float = 10) -> dict:
    """The layout once it stops changing after a resize (two equal readings 100 ms apart)."""
    deadline = time.monotonic() + timeout_s
    last = await page.evaluate(LAYOUT_JS)
    while time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        now = await page.evaluate(LAYOUT_JS)
        if now == last:
            return now
        last = now
    return last


async def test_warning_in_minutes_then_one_end_screen_with_next_steps(
    consult_server_factory,
    app_origin: str,
    zh_phone: BrowserContext,
    zh_desktop: BrowserContext,
    pages: PageRecorder,
) -> None:
    screens = Screens()
    async with asyncio.timeout(TEST_TIMEOUT):
        # A visit of 125 s with the warning 2 minutes before the end: it comes 5 s in.
        server = await consult_server_factory(
            env={"CONSULT_VISIT_SECONDS_OVERRIDE": "125", "CONSULT_WARNING_MINUTES": "2"}
        )
        visit, link, room = await asyncio.to_thread(seed_call, server)
        patient = await pages.new_page(zh_phone, "patient")
        doctor = await pages.new_page(zh_desktop, "doctor")
        await patient.add_init_script(WATCH_JS)
        await join_call(patient, doctor, link, room, app_origin)
        for page in (patient, doctor):
            warning = page.get_by_test_id("call-warning")
            await expect(warning).to_be_visible(timeout=WAIT_MS)
            await expect(warning).to_have_text("问诊还剩 2 分钟。")
        # The connection badge is up (stats every 5 s), so its going away below means something.
        await expect(patient.get_by_test_id("quality")).to_be_visible(timeout=WAIT_MS)
        await screens.read(patient, "in call, warned")
        assert await patient.evaluate(LIVE_TRACKS_JS) > 0

        doctor.once("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
        await doctor.get_by_test_id("end").click()
        ended = patient.get_by_test_id("call-ended")
        await expect(ended).to_be_visible(timeout=WAIT_MS)
        await expect(patient.get_by_test_id("ended-reason")).to_have_text("医生已结束问诊。")
        await assert_one_end_screen(patient, screens, "ended (patient)")
        # Nothing of the call is left running: warning, badge, countdown, caption gone; the
        # camera and microphone stopped (every track getUserMedia gave), no peer connection.
        for testid in ("call-warning", "quality", "countdown", "call-status", "caption"):
            await expect(patient.get_by_test_id(testid)).to_be_hidden()
        await patient.wait_for_function(f"() => ({LIVE_TRACKS_JS})() === 0", timeout=WAIT_MS)
        assert await patient.evaluate("window.__consultPc") is None
        await save_screenshot(patient, "call-ended-portrait")

        # The link again: the same single end screen, straight away, no camera asked for.
        await patient.goto(link)
        await expect(patient.get_by_test_id("call-ended")).to_be_visible(timeout=WAIT_MS)
        await assert_one_end_screen(patient, screens, "call link after the end")
        assert await patient.evaluate("window.__tracks.length") == 0
        await expect(patient.locator("header.topbar")).to_be_visible()
        # Its links lead where they say: the patient's home (sign-in first) and booking.
        assert await patient.get_by_test_id("next-record-link").get_attribute("href") == "/patient"
        assert await patient.get_by_test_id("next-book-link").get_attribute("href") == "/book"
        status = rows(server, "SELECT status FROM visits WHERE id = ?", [visit.id])[0]["status"]
        assert status == "completed"
    assert not screens.english, "English on Chinese screens:\n" + "\n".join(screens.english)


async def assert_one_end_screen(page: Page, screens: Screens, name: str) -> None:
    """The end said once, with what happens next: prescription, record, booking again."""
    deadline = time.monotonic() + 10
    text = await screens.read(page, name)
    while text.count("问诊已结束") != 1 and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        text = await page.evaluate("() => document.body.innerText")
    assert text.count("问诊已结束") == 1, text
    steps = page.get_by_test_id("next-steps")
    await expect(steps).to_be_visible()
    await expect(page.get_by_test_id("next-rx")).to_contain_text("处方")
    await expect(page.get_by_test_id("next-record")).to_contain_text("记录")
    await expect(page.get_by_test_id("next-book-link")).to_be_visible()
