"""Nothing leaves the patient's phone before the patient presses Join (issue "The patient's
phone"), in real browsers: Debian Chromium with a fake camera, the real server, the private
network namespace of tests/test_browser_call.py.

The patient opens the link and stays on the pre-call check (the camera preview plays locally);
the doctor admits. For a few seconds the doctor's page must receive no track and no media byte
and the visit clock must not start (the database has no room start and no `clock_started`).
Then the patient presses Join: video flows both ways, and the clock's start is after the press.
Every RTCPeerConnection either page makes is counted (an init script wraps the constructor),
so "no media" is measured on every connection, not only the page's main one.
"""

from __future__ import annotations

import asyncio
import time

from playwright.async_api import Page, expect

from tests.db_helpers import read
from tests.harness.server import ConsultServer
from tests.test_browser_call import (
    TEST_TIMEOUT,
    WAIT_MS,
    frames_grow,
    prepare_call,
    sign_in_doctor,
    state,
    wait_frames,
)

# Before any page script: remember every RTCPeerConnection and count the tracks they receive.
COUNT_PCS_JS = """
(() => {
  const Native = window.RTCPeerConnection;
  window.__allPcs = [];
  window.__tracksReceived = 0;
  class Counted extends Native {
    constructor(...args) {
      super(...args);
      window.__allPcs.push(this);
      this.addEventListener("track", () => { window.__tracksReceived += 1; });
    }
  }
  window.RTCPeerConnection = Counted;
})();
"""

# Media in and out over every connection the page ever made (getStats; a closed connection
# has no stats any more, which is why `pcs` and `closed` are reported too).
ALL_MEDIA_JS = """
async () => {
  const out = {pcs: window.__allPcs.length, closed: 0, tracks: window.__tracksReceived,
               inBytes: 0, inPackets: 0, framesDecoded: 0, outBytes: 0, outPackets: 0, senders: 0};
  for (const pc of window.__allPcs) {
    if (pc.signalingState === "closed") { out.closed += 1; continue; }
    out.senders += pc.getSenders().filter((s) => s.track).length;
    (await pc.getStats()).forEach((s) => {
      if (s.type === "inbound-rtp") {
        out.inBytes += s.bytesReceived || 0;
        out.inPackets += s.packetsReceived || 0;
        out.framesDecoded += s.framesDecoded || 0;
      }
      if (s.type === "outbound-rtp") {
        out.outBytes += s.bytesSent || 0;
        out.outPackets += s.packetsSent || 0;
      }
    });
  }
  return out;
}
"""


def room_facts(
    server: ConsultServer, visit_id: int
) -> tuple[float | None, list[tuple[str, str | None, float]]]:
    """The room row's clock start (None: not started) and the visit's session events."""

    def fn(db):
        row = db.execute("SELECT started_at FROM rooms WHERE visit_id = ?", [visit_id]).fetchone()
        events = db.execute(
            "SELECT name, role, created FROM session_events WHERE visit_id = ? ORDER BY id", [visit_id]
        ).fetchall()
        return (row[0] if row else None), [tuple(e) for e in events]

    return read(server, fn)


async def test_no_media_and_no_clock_before_the_patient_presses_join(
    consult_server: ConsultServer, app_origin: str, patient_page: Page, doctor_page: Page
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        call = await asyncio.to_thread(prepare_call, consult_server)
        for page in (patient_page, doctor_page):
            await page.add_init_script(COUNT_PCS_JS)

        # The patient opens the link: pre-call check with a live local preview, socket open.
        await patient_page.goto(call.patient_url)
        await patient_page.locator("[data-testid=check-connect][data-state=ok]").wait_for(timeout=WAIT_MS)
        await patient_page.wait_for_function(
            "() => document.querySelector('[data-testid=preview]').videoWidth > 0", timeout=WAIT_MS
        )

        # The doctor admits the patient, who has not pressed Join.
        await sign_in_doctor(doctor_page, app_origin)
        await doctor_page.goto(call.room_url)
        await state(doctor_page, "patient_waiting")
        await doctor_page.get_by_test_id("admit").click()
        await state(doctor_page, "patient_admitted_not_joined")
        await expect(doctor_page.get_by_test_id("call-status")).to_have_text(
            "Patient admitted, waiting for them to press Join."
        )
        admitted_at = time.time()

        # A few seconds admitted: nothing arrives at the doctor, nothing leaves the phone.
        readings = []
        for _ in range(8):
            await asyncio.sleep(0.5)
            doctor, patient = await asyncio.gather(
                doctor_page.evaluate(ALL_MEDIA_JS), patient_page.evaluate(ALL_MEDIA_JS)
            )
            readings.append((doctor, patient))
            assert doctor["tracks"] == 0 and doctor["inBytes"] == 0 and doctor["inPackets"] == 0, doctor
            assert doctor["framesDecoded"] == 0, doctor
            assert patient["pcs"] == 0 and patient["outBytes"] == 0 and patient["senders"] == 0, patient
        print("admitted, before Join (doctor, patient):", readings[-1])
        # ... while the phone's camera is live for the preview (the check is not vacuous).
        assert await patient_page.evaluate(
            "() => document.querySelector('[data-testid=preview]').srcObject.getVideoTracks()"
            ".some((t) => t.readyState === 'live')"
        )
        await expect(patient_page.get_by_test_id("join")).to_be_visible()
        assert await doctor_page.get_by_test_id("countdown").get_attribute("data-seconds-left") is None
        started_at, events = await asyncio.to_thread(room_facts, consult_server, call.visit.id)
        names = [name for name, _, _ in events]
        assert started_at is None, (started_at, events)
        assert "admitted" in names and "clock_started" not in names and "ready" not in names, names
        print(f"{time.time() - admitted_at:.1f} s admitted: no room start, no clock_started; events {names}")

        # The patient presses Join: video both ways, and only now the clock.
        pressed = time.time()
        await patient_page.get_by_test_id("join").tap()
        await expect(patient_page.get_by_test_id("stage")).to_be_visible(timeout=WAIT_MS)
        await asyncio.gather(wait_frames(patient_page, 20), wait_frames(doctor_page, 20))
        await asyncio.gather(frames_grow(patient_page), frames_grow(doctor_page))
        await state(doctor_page, "in_call")
        deadline = time.monotonic() + 10  # the session log is written off the rooms' path
        while True:
            started_at, events = await asyncio.to_thread(room_facts, consult_server, call.visit.id)
            created = {name: at for name, _, at in events}
            if {"ready", "clock_started"} <= created.keys() or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.25)
        assert started_at is not None and started_at >= pressed, (pressed, started_at)
        assert created["ready"] >= pressed and created["clock_started"] >= created["ready"], events
        left = int(await doctor_page.get_by_test_id("countdown").get_attribute("data-seconds-left"))
        assert 14 * 60 < left <= 15 * 60
        doctor = await doctor_page.evaluate(ALL_MEDIA_JS)
        assert doctor["tracks"] >= 2 and doctor["framesDecoded"] > 0, doctor
        print(
            f"clock started {started_at - pressed:.2f} s after Join was pressed"
            f" ({started_at - admitted_at:.1f} s after admission); doctor then: {doctor}"
        )
