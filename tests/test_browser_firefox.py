"""A second browser engine: Firefox ESR (Gecko) calling Debian Chromium through the real pages,
both ways round, inside the test run's private network namespace.

Firefox is driven over WebDriver BiDi (tests/harness/firefox.py), Chromium through Playwright.
Each test walks a whole short visit: the pre-call check, the waiting room, admission, Join, the
codec both sides negotiated (read from getStats), video decoded both ways, mute heard as
silence on the other side, and the server's timed end on both pages.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from playwright.async_api import Page, expect

from tests.harness.firefox import Firefox
from tests.test_browser_call import (
    DOCTOR,
    MEDIA_JS,
    PASSWORD,
    STATUS_LOG_JS,
    WAIT_MS,
    prepare_call,
    sign_in_doctor,
)

TEST_TIMEOUT = 180
# Long enough for a slow machine to connect and check everything before the visit ends.
VISIT_S = 45

pytestmark = pytest.mark.locale("en")

# The codec of the video this page receives, and of the video it sends.
CODECS_JS = """
async () => {
  const pc = window.__consultPc;
  if (!pc) return null;
  const report = await pc.getStats();
  const out = {};
  report.forEach((s) => {
    if (s.kind !== "video" || (s.type !== "inbound-rtp" && s.type !== "outbound-rtp")) return;
    const codec = s.codecId && report.get(s.codecId);
    if (codec) out[s.type === "inbound-rtp" ? "receives" : "sends"] = codec.mimeType;
  });
  return out;
}
"""
# Audio energy received so far (a muted sender sends silence: the energy stops growing).
AUDIO_ENERGY_JS = """
async () => {
  const pc = window.__consultPc;
  if (!pc) return null;
  let energy = null, packets = 0;
  (await pc.getStats()).forEach((s) => {
    if (s.type === "inbound-rtp" && s.kind === "audio") {
      energy = s.totalAudioEnergy;
      packets = s.packetsReceived;
    }
  });
  return {energy, packets};
}
"""


class Side:
    """One participant's page, in Firefox or in Chromium, behind the same few calls."""

    def __init__(self, name: str, firefox: Firefox | None = None, page: Page | None = None) -> None:
        self.name, self.firefox, self.page = name, firefox, page

    async def run(self, function: str) -> Any:
        """A JS function (may be async) run in the page; its JSON-able result."""
        if self.firefox is not None:
            return await self.firefox.call(function)
        return await self.page.evaluate(function)

    async def goto(self, url: str) -> None:
        if self.firefox is not None:
            await self.firefox.navigate(url)
        else:
            await self.page.goto(url)

    async def click(self, testid: str) -> None:
        if self.firefox is not None:
            await self.firefox.click(f"[data-testid={testid}]")
        else:
            await self.page.get_by_test_id(testid).click(timeout=WAIT_MS)

    async def wait(self, function: str, what: str, timeout_s: float = 20) -> Any:
        deadline = time.monotonic() + timeout_s
        value = None
        while time.monotonic() < deadline:
            value = await self.run(function)
            if value:
                return value
            await asyncio.sleep(0.25)
        raise AssertionError(f"{self.name}: not within {timeout_s} s: {what} (last: {value!r})")

    async def visible(self, testid: str, timeout_s: float = 20) -> None:
        found = f"document.querySelector('[data-testid={testid}]')"
        fn = f"() => {{ const e = {found}; return !!e && e.checkVisibility(); }}"
        await self.wait(fn, f"{testid} visible", timeout_s)

    async def status(self, value: str, timeout_s: float = 20) -> None:
        shown = "document.querySelector('[data-testid=call-status]')?.dataset.state"
        fn = f"() => {shown} === {json.dumps(value)}"
        await self.wait(fn, f"status {value}", timeout_s)

    async def frames(self, at_least: int, timeout_s: float = 30) -> dict:
        info: dict = {}
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            info = await self.run(MEDIA_JS)
            if info["frames"] >= at_least and info["state"] == "connected":
                return info
            await asyncio.sleep(0.25)
        raise AssertionError(f"{self.name}: fewer than {at_least} frames decoded in {timeout_s} s: {info}")

    async def audio_energy_growth(self, seconds: float = 2.0) -> float:
        before = await self.run(AUDIO_ENERGY_JS)
        await asyncio.sleep(seconds)
        after = await self.run(AUDIO_ENERGY_JS)
        assert before and after and after["packets"] > before["packets"], (self.name, before, after)
        return (after["energy"] or 0) - (before["energy"] or 0)


async def sign_in_doctor_firefox(firefox: Firefox, origin: str) -> None:
    """The login form's own fields (CSRF token included), posted by the page with fetch():
    a form submission from a BiDi script here stalls in Firefox's https upgrade attempt on
    the plain-http test origin. The session cookie lands in the browser as from the form."""
    await firefox.navigate(origin + "/login")
    status = await firefox.call(
        """async (user, password) => {
          const form = document.querySelector("main form[action='/login']");
          form.querySelector("input[name=identifier]").value = user;
          form.querySelector("input[name=password]").value = password;
          const response = await fetch(form.action, {
            method: "POST", body: new URLSearchParams(new FormData(form)), credentials: "same-origin",
          });
          return [response.status, new URL(response.url).pathname];
        }""",
        DOCTOR,
        PASSWORD,
    )
    assert status == [200, "/doctor"], status
    await firefox.navigate(origin + "/doctor")
    assert await firefox.url() == origin + "/doctor"


async def patient_joins(patient: Side, url: str) -> None:
    """The pre-call check passes (camera plays, the microphone meter moves, the server is
    reachable), then Join: the waiting room."""
    await patient.goto(url)
    check = "() => document.querySelector('[data-testid=check-connect]').dataset.state === 'ok'"
    await patient.wait(check, "connection check")
    preview = "() => document.querySelector('[data-testid=preview]').videoWidth > 0"
    await patient.wait(preview, "camera preview")
    if patient.firefox is None:
        # Headless Firefox here has no audio output device: its AudioContext (the meter's)
        # never leaves "suspended", even after a click. Chromium's meter moves.
        await patient.wait(
            "() => document.querySelector('[data-check=mic]').dataset.state === 'ok'", "microphone meter"
        )
    await patient.click("join")
    await patient.visible("waiting-room")
    text = await patient.run("() => document.querySelector('[data-testid=waiting-room]').textContent")
    assert "The doctor will admit you shortly" in text


async def mute_is_heard(speaker: Side, listener: Side) -> None:
    """The listener hears the speaker's audio, and silence once the speaker mutes."""
    deadline = time.monotonic() + 20
    while (growth := await listener.audio_energy_growth()) <= 0:
        assert time.monotonic() < deadline, f"{listener.name} hears nothing from {speaker.name}"
    await speaker.click("mute")
    pressed = "() => document.querySelector('[data-testid=mute]').getAttribute('aria-pressed') === 'true'"
    await speaker.wait(pressed, "mute pressed")
    await asyncio.sleep(1)  # audio already in flight
    deadline = time.monotonic() + 20
    while (muted := await listener.audio_energy_growth()) > growth / 20:
        assert time.monotonic() < deadline, f"{listener.name} still hears {speaker.name}: {muted} vs {growth}"
    await speaker.click("mute")  # and back
    deadline = time.monotonic() + 20
    while await listener.audio_energy_growth() <= growth / 20:
        assert time.monotonic() < deadline, f"{listener.name} does not hear {speaker.name} after unmuting"


async def whole_visit(
    patient: Side, doctor: Side, call, sign_in: Callable[[], Awaitable[None]], started: float
) -> None:
    await patient_joins(patient, call.patient_url)
    await sign_in()
    await doctor.goto(call.room_url)
    await doctor.status("patient_waiting")
    await doctor.click("admit")
    await patient.visible("stage")
    await asyncio.gather(patient.frames(20), doctor.frames(20))
    await asyncio.gather(patient.status("in_call"), doctor.status("in_call"))
    # From here on every status each page shows is logged: a healthy call stays "in_call"
    # (no ICE restart from a stats reading that one engine does not give).
    await asyncio.gather(patient.run(STATUS_LOG_JS), doctor.run(STATUS_LOG_JS))
    # Both sides agree on the codec; between Gecko and Chromium here that is VP8 (this
    # Firefox has no OpenH264 plugin: it would be downloaded).
    codecs = await asyncio.gather(patient.run(CODECS_JS), doctor.run(CODECS_JS))
    print("codecs (patient, doctor):", codecs)
    for mine, theirs in (codecs, codecs[::-1]):
        assert mine["receives"] == theirs["sends"], codecs
        assert mine["receives"].lower() in ("video/vp8", "video/h264"), codecs
    # Video keeps flowing both ways.
    p, d = await asyncio.gather(patient.run(MEDIA_JS), doctor.run(MEDIA_JS))
    await asyncio.gather(patient.frames(p["frames"] + 20), doctor.frames(d["frames"] + 20))
    # Mute both ways.
    await mute_is_heard(patient, doctor)
    await mute_is_heard(doctor, patient)
    for side in (patient, doctor):
        log = await side.run("() => window.__statusLog")
        assert all(entry.startswith("in_call@") for entry in log), (side.name, log)
    # The server ends the visit on time, on both pages.
    left = VISIT_S - (time.monotonic() - started)
    assert left > 0, f"the checks took longer than the visit ({VISIT_S} s): raise VISIT_S"
    for side in (patient, doctor):
        await side.visible("call-ended", timeout_s=left + 20)
        reason = "() => document.querySelector('[data-testid=ended-reason]').dataset.reason"
        assert await side.run(reason) == "ended_time_limit"
        assert await side.run("() => window.__consultPc") is None  # media torn down
        await side.status("ended", 5)


async def test_patient_on_firefox_calls_doctor_on_chromium(
    consult_server_factory, app_origin: str, firefox: Firefox, doctor_page: Page
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        server = await consult_server_factory(env={"CONSULT_VISIT_SECONDS_OVERRIDE": str(VISIT_S)})
        call = await asyncio.to_thread(prepare_call, server)
        patient = Side("patient (firefox)", firefox=firefox)
        doctor = Side("doctor (chromium)", page=doctor_page)
        started = time.monotonic()
        await whole_visit(patient, doctor, call, lambda: sign_in_doctor(doctor_page, app_origin), started)
        await expect(doctor_page.get_by_test_id("ended-reason")).to_have_text("The visit time is over.")
        assert "The visit time is over." in await firefox.text("[data-testid=ended-reason]")
        assert not firefox.errors, firefox.errors


async def test_doctor_on_firefox_admits_patient_on_chromium(
    consult_server_factory, app_origin: str, firefox: Firefox, patient_page: Page
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        server = await consult_server_factory(env={"CONSULT_VISIT_SECONDS_OVERRIDE": str(VISIT_S)})
        call = await asyncio.to_thread(prepare_call, server)
        patient = Side("patient (chromium)", page=patient_page)
        doctor = Side("doctor (firefox)", firefox=firefox)
        started = time.monotonic()
        await whole_visit(patient, doctor, call, lambda: sign_in_doctor_firefox(firefox, app_origin), started)
        await expect(patient_page.get_by_test_id("ended-reason")).to_have_text("The visit time is over.")
        assert "The visit time is over." in await firefox.text("[data-testid=ended-reason]")
        assert not firefox.errors, firefox.errors
