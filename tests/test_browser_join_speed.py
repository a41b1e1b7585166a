"""The join's shortcuts (issue 15, bench/join.py), in real browsers: Debian Chromium with a fake
camera, the real server, the private network namespace of tests/test_browser_call.py.

- The patient's page opens its socket before its call scripts have run (call-boot.js): the
  doctor sees the patient waiting and admits while call.js is still held back (a route that
  withholds it), and call.js, once it runs, acts on what it missed. The Join button stays
  disabled until call.js listens (a tap before would be lost).
- The doctor's page prepares its connection (offer and candidates) while the patient waits
  and holds it: nothing reaches the patient's page before Join (no offer, no connection), and
  the call then runs on that same connection.
"""

from __future__ import annotations

import asyncio

from playwright.async_api import Page, Route, expect

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

TRACE_JS = "() => (window.__consultTrace || []).join('\\n')"


async def test_patient_socket_opens_before_call_js_and_call_js_acts_on_what_it_missed(
    consult_server: ConsultServer, app_origin: str, patient_page: Page, doctor_page: Page
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        call = await asyncio.to_thread(prepare_call, consult_server)
        await sign_in_doctor(doctor_page, app_origin)
        await doctor_page.goto(call.room_url)
        await state(doctor_page, "waiting_patient")

        release = asyncio.Event()
        held: list[str] = []

        async def hold_call_js(route: Route) -> None:
            held.append(route.request.url)
            await release.wait()
            await route.continue_()

        await patient_page.route("**/static/call.js?*", hold_call_js)
        # (Not "domcontentloaded": that waits for the deferred scripts, call.js among them.)
        await patient_page.goto(call.patient_url, wait_until="commit")

        # call.js has not run, yet the doctor sees the patient in the waiting room and admits.
        await state(doctor_page, "patient_waiting")
        assert held, "call.js was not requested"
        assert await patient_page.evaluate("() => !window.__consultSignaling"), "call.js ran"
        await expect(patient_page.get_by_test_id("join")).to_be_disabled()
        await doctor_page.get_by_test_id("admit").click()
        await state(doctor_page, "patient_admitted_not_joined")
        # Nothing of the camera left the phone: it has no peer connection, the doctor no track.
        assert await patient_page.evaluate("() => !window.__consultPc")

        # call.js runs now: the welcome and the admission it missed are handled, in order.
        release.set()
        await patient_page.locator("[data-testid=check-connect][data-state=ok]").wait_for(timeout=WAIT_MS)
        await expect(patient_page.get_by_test_id("join")).to_be_enabled()
        marks = await patient_page.evaluate(
            "() => Object.fromEntries(performance.getEntriesByType('mark').map((m) => [m.name, m.startTime]))"
        )
        assert marks["consult:socket"] < marks["consult:start"], marks
        await patient_page.get_by_test_id("join").tap()
        # Admitted already: straight into the call, no waiting room.
        await expect(patient_page.get_by_test_id("stage")).to_be_visible(timeout=WAIT_MS)
        await asyncio.gather(wait_frames(patient_page, 20), wait_frames(doctor_page, 20))
        await asyncio.gather(frames_grow(patient_page), frames_grow(doctor_page))
        await state(doctor_page, "in_call")


async def test_doctor_prepares_its_connection_while_the_patient_waits_and_sends_it_after_join(
    consult_server: ConsultServer, app_origin: str, patient_page: Page, doctor_page: Page
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        call = await asyncio.to_thread(prepare_call, consult_server)
        await patient_page.goto(call.patient_url)
        await patient_page.locator("[data-testid=check-connect][data-state=ok]").wait_for(timeout=WAIT_MS)
        await sign_in_doctor(doctor_page, app_origin)
        await doctor_page.goto(call.room_url)
        await state(doctor_page, "patient_waiting")

        # The doctor's page has its offer ready, all candidates gathered, and says nothing of
        # it: the status still reads "in the waiting room".
        await doctor_page.wait_for_function(
            "() => { const pc = window.__consultPc; return !!pc && pc.localDescription"
            " && pc.localDescription.type === 'offer' && pc.iceGatheringState === 'complete'; }",
            timeout=WAIT_MS,
        )
        await doctor_page.evaluate("() => { window.__preparedPc = window.__consultPc; }")
        await state(doctor_page, "patient_waiting")

        # Admitted, the patient still on the pre-call check: still nothing sent.
        await doctor_page.get_by_test_id("admit").click()
        await state(doctor_page, "patient_admitted_not_joined")
        await asyncio.sleep(1.5)  # time for an offer that should not come
        assert await patient_page.evaluate("() => !window.__consultPc")
        assert "offer received" not in await patient_page.evaluate(TRACE_JS)
        assert "held offer released" not in await doctor_page.evaluate(TRACE_JS)
        assert await doctor_page.evaluate("() => window.__consultPc === window.__preparedPc")

        # Join: the prepared offer goes out, and the call runs on that very connection.
        await patient_page.get_by_test_id("join").tap()
        await asyncio.gather(wait_frames(patient_page, 20), wait_frames(doctor_page, 20))
        await asyncio.gather(frames_grow(patient_page), frames_grow(doctor_page))
        await state(doctor_page, "in_call")
        assert await doctor_page.evaluate("() => window.__consultPc === window.__preparedPc")
        doctor_trace = await doctor_page.evaluate(TRACE_JS)
        assert "held offer released" in doctor_trace, doctor_trace
        assert doctor_trace.count("offer sent") == 1, doctor_trace
