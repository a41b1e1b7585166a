"""The join's shortcuts (issue 15, bench/join.py), in real browsers: Debian Chromium with a fake
camera, the real server, the private network namespace of tests/test_browser_call.py.

- The patient's page loads one script (core/templates.py BUNDLES: the call scripts joined by the
  server). While it is held back (a route that withholds it) the Join button stays disabled (a
  tap before call.js listens would be lost) and the patient is nowhere yet; once it runs, the
  socket opens first (call-boot.js), the doctor sees the patient waiting and admits before the
  patient taps Join, and the page acts on that admission: Join goes straight into the call.
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


async def test_patient_page_waits_for_its_one_script_then_is_admitted_before_the_tap(
    consult_server: ConsultServer, app_origin: str, patient_page: Page, doctor_page: Page
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        call = await asyncio.to_thread(prepare_call, consult_server)
        await sign_in_doctor(doctor_page, app_origin)
        await doctor_page.goto(call.room_url)
        await state(doctor_page, "waiting_patient")

        release = asyncio.Event()
        held: list[str] = []
        scripts: list[str] = []

        async def hold_bundle(route: Route) -> None:
            held.append(route.request.url)
            await release.wait()
            await route.continue_()

        patient_page.on("request", lambda r: scripts.append(r.url) if r.resource_type == "script" else None)
        await patient_page.route("**/static/bundle/call-patient.js?*", hold_bundle)
        # (Not "domcontentloaded": that waits for the deferred script.)
        await patient_page.goto(call.patient_url, wait_until="commit")

        # The page is there, its script held back: Join cannot be tapped, nobody waits yet.
        await expect(patient_page.get_by_test_id("join")).to_be_visible(timeout=WAIT_MS)
        await expect(patient_page.get_by_test_id("join")).to_be_disabled()
        await asyncio.sleep(0.5)  # time for a socket that should not open
        assert held, "the call script was not requested"
        assert await patient_page.evaluate("() => !window.__consultSignaling"), "call.js ran"
        await state(doctor_page, "waiting_patient")

        # The script runs: the socket opens first, and the doctor admits before the tap.
        release.set()
        await state(doctor_page, "patient_waiting")
        await doctor_page.get_by_test_id("admit").click()
        await state(doctor_page, "patient_admitted_not_joined")
        # Nothing of the camera left the phone: it has no peer connection, the doctor no track.
        assert await patient_page.evaluate("() => !window.__consultPc")
        await patient_page.locator("[data-testid=check-connect][data-state=ok]").wait_for(timeout=WAIT_MS)
        await expect(patient_page.get_by_test_id("join")).to_be_enabled()
        marks = await patient_page.evaluate(
            "() => Object.fromEntries(performance.getEntriesByType('mark').map((m) => [m.name, m.startTime]))"
        )
        assert marks["consult:socket"] <= marks["consult:start"], marks
        # One script for the whole call page, fetched once.
        assert [u for u in scripts if "/static/" in u] == held, scripts
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


MARKS_JS = "() => Object.fromEntries(performance.getEntriesByType('mark').map((m) => [m.name, m.startTime]))"


async def test_a_patient_who_pressed_join_gets_the_prepared_offer_with_the_admission(
    consult_server: ConsultServer, app_origin: str, patient_page: Page, doctor_page: Page
) -> None:
    """The patient pressed Join and waits: the doctor's click on Admit sends the admission and,
    right behind it on the same socket, the offer prepared meanwhile, without waiting for the
    server's "admitted" to come back (the server relays it only once it has admitted)."""
    async with asyncio.timeout(TEST_TIMEOUT):
        call = await asyncio.to_thread(prepare_call, consult_server)
        await sign_in_doctor(doctor_page, app_origin)
        await doctor_page.goto(call.room_url)
        await state(doctor_page, "waiting_patient")
        await patient_page.goto(call.patient_url)
        await expect(patient_page.get_by_test_id("join")).to_be_enabled(timeout=WAIT_MS)
        await patient_page.get_by_test_id("join").tap()
        await expect(patient_page.get_by_test_id("waiting-room")).to_be_visible(timeout=WAIT_MS)
        await state(doctor_page, "patient_waiting")
        await doctor_page.wait_for_function(
            "() => { const pc = window.__consultPc; return !!pc && pc.localDescription"
            " && pc.iceGatheringState === 'complete'; }",
            timeout=WAIT_MS,
        )
        await doctor_page.evaluate("() => { window.__preparedPc = window.__consultPc; }")
        # Still nothing at the patient's: waiting to be admitted, no connection.
        assert await patient_page.evaluate("() => !window.__consultPc")

        await doctor_page.get_by_test_id("admit").click()
        await asyncio.gather(wait_frames(patient_page, 20), wait_frames(doctor_page, 20))
        await asyncio.gather(frames_grow(patient_page), frames_grow(doctor_page))
        await state(doctor_page, "in_call")
        marks = await doctor_page.evaluate(MARKS_JS)
        # Sent before this page even heard that the patient was admitted.
        assert marks["consult:held offer released"] < marks["consult:admitted"], marks
        assert await doctor_page.evaluate("() => window.__consultPc === window.__preparedPc")
        doctor_trace = await doctor_page.evaluate(TRACE_JS)
        assert doctor_trace.count("offer sent") == 1, doctor_trace
