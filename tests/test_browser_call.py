"""The consultation call in real browsers: Debian Chromium (fake camera), the real server
process, everything inside the test run's private network namespace.

The patient is on the phone context and opens the signed link without signing in; the doctor
signs in through the login page and opens the consult room. Media is checked through
`getStats()` of the page's RTCPeerConnection (`window.__consultPc`): frames must be decoded,
not only the connection reported as connected.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
from dataclasses import dataclass

from playwright.async_api import Page, expect

from tests.call_helpers import SeededVisit, keyed_settings, patient_token, seed_visit
from tests.db_helpers import insert, rows, write
from tests.harness.browser import PageRecorder, assert_only_local_requests
from tests.harness.programs import require_program
from tests.harness.server import ConsultServer

TEST_TIMEOUT = 120
WAIT_MS = 20_000
PASSWORD = "Browser-call-pass-2024"
DOCTOR = "dr.wang"

MEDIA_JS = """
async () => {
  const pc = window.__consultPc;
  if (!pc) return {frames: 0, state: "none", local: null, remote: null};
  const report = await pc.getStats();
  let frames = 0, pairId = null, local = null, remote = null;
  report.forEach((s) => {
    if (s.type === "inbound-rtp" && s.kind === "video") frames += s.framesDecoded || 0;
    if (s.type === "transport" && s.selectedCandidatePairId) pairId = s.selectedCandidatePairId;
  });
  const pair = pairId && report.get(pairId);
  if (pair) {
    const l = report.get(pair.localCandidateId), r = report.get(pair.remoteCandidateId);
    local = l ? {type: l.candidateType, address: l.address, port: l.port, protocol: l.protocol} : null;
    remote = r ? {type: r.candidateType, address: r.address, port: r.port} : null;
  }
  return {frames, state: pc.connectionState, ice: pc.iceConnectionState, local, remote};
}
"""

SENDER_ENABLED_JS = """
() => window.__consultPc.getSenders().find((s) => s.track && s.track.kind === "%s").track.enabled
"""
SENDER_TRACK_ID_JS = """
() => window.__consultPc.getSenders().find((s) => s.track && s.track.kind === "video").track.id
"""

# Records every status the page shows (some last only a few hundred milliseconds).
STATUS_LOG_JS = """
() => {
  const el = document.querySelector("[data-testid=call-status]");
  window.__statusT0 = performance.now();
  window.__statusLog = [el.dataset.state + "@0"];
  if (!window.__statusObserver) {
    window.__statusObserver = new MutationObserver(() => window.__statusLog.push(
      el.dataset.state + "@" + Math.round(performance.now() - window.__statusT0)));
    window.__statusObserver.observe(el, {attributes: true, attributeFilter: ["data-state"]});
  }
}
"""
LOCAL_UDP_PORTS_JS = """
async () => {
  const ports = new Set();
  (await window.__consultPc.getStats()).forEach((s) => {
    if (s.type === "local-candidate" && s.protocol === "udp") ports.add(s.port);
  });
  return Array.from(ports);
}
"""
# The page's status is back to normal: restored if it had said "reconnecting", else in_call.
RECOVERED_JS = """
() => {
  const log = window.__statusLog;
  const last = log[log.length - 1];
  return last.startsWith("restored@") || (last.startsWith("in_call@") && log.length === 1);
}
"""


@dataclass
class Call:
    server: ConsultServer
    visit: SeededVisit
    patient_url: str
    room_url: str


def prepare_call(server: ConsultServer, *, starts_in_s: float = -60, origin: str | None = None) -> Call:
    """A confirmed visit of dr.wang with the demo patient, starting now; a known password.
    The pages' URLs are on `origin` (default the server's own; a proxy's in tests/test_nginx.py)."""
    server.cli("user", "passwd", DOCTOR, "--password", PASSWORD)
    (doctor_id,) = rows(server, "SELECT id FROM users WHERE username = ?", [DOCTOR])[0].values()
    visit = seed_visit(server, doctor_id=doctor_id, starts_in_s=starts_in_s)
    token = patient_token(keyed_settings(server.data_dir), visit)
    base = origin or server.origin
    return Call(server, visit, f"{base}/call/{token}", f"{base}/doctor/visits/{visit.public_id}/room")


async def sign_in_doctor(page: Page, origin: str) -> None:
    await page.goto(origin + "/login")
    form = page.locator("main form[action='/login']")
    await form.locator("input[name=identifier]").fill(DOCTOR)
    await form.locator("input[name=password]").fill(PASSWORD)
    await form.locator("button[type=submit]").click()
    await page.wait_for_url(origin + "/doctor", timeout=WAIT_MS)


async def media(page: Page) -> dict:
    return await page.evaluate(MEDIA_JS)


async def wait_frames(page: Page, at_least: int, timeout_s: float = 20) -> dict:
    """Poll getStats until `at_least` video frames were decoded; return the last reading."""
    info: dict = {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info = await media(page)
        if info["frames"] >= at_least and info["state"] == "connected":
            return info
        await asyncio.sleep(0.25)
    raise AssertionError(f"fewer than {at_least} frames decoded within {timeout_s} s: {info}")


async def frames_grow(page: Page, by: int = 10, timeout_s: float = 10) -> dict:
    start = (await media(page))["frames"]
    return await wait_frames(page, start + by, timeout_s)


async def state(page: Page, value: str, timeout_ms: int = WAIT_MS) -> None:
    await page.locator(f"[data-testid=call-status][data-state={value}]").wait_for(timeout=timeout_ms)


async def connect_both(call: Call, patient: Page, doctor: Page, origin: str) -> None:
    """Patient: pre-call check, join, waiting room. Doctor: room, admit. Both decode video."""
    await patient.goto(call.patient_url)
    await patient.locator("[data-testid=check-connect][data-state=ok]").wait_for(timeout=WAIT_MS)
    await expect(patient.get_by_test_id("preview")).to_be_visible()
    # The pre-call check: camera preview plays, the microphone meter moves (fake device beeps).
    await patient.wait_for_function(
        "() => document.querySelector('[data-testid=preview]').videoWidth > 0", timeout=WAIT_MS
    )
    await patient.locator("[data-check=mic][data-state=ok]").wait_for(timeout=WAIT_MS)
    await patient.get_by_test_id("join").tap()
    await expect(patient.get_by_test_id("waiting-room")).to_be_visible()
    await expect(patient.get_by_test_id("waiting-room")).to_contain_text("The doctor will admit you shortly")

    await sign_in_doctor(doctor, origin)
    await doctor.goto(call.room_url)
    await state(doctor, "patient_waiting")
    await doctor.get_by_test_id("admit").click()
    await expect(patient.get_by_test_id("stage")).to_be_visible(timeout=WAIT_MS)
    await asyncio.gather(wait_frames(patient, 20), wait_frames(doctor, 20))


async def wait_quality_samples(
    server: ConsultServer, visit_id: int, timeout_s: float
) -> list[tuple[str, int, int, int]]:
    """The visit's quality_samples rows (role, fps, bitrate_kbps, width) once both sides have
    one with frames per second, bitrate and resolution all above zero."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = [
            tuple(r.values())
            for r in await asyncio.to_thread(
                rows,
                server,
                "SELECT role, coalesce(fps, 0) AS fps, coalesce(bitrate_kbps, 0) AS kbps,"
                " coalesce(width, 0) AS width FROM quality_samples WHERE visit_id = ? ORDER BY t",
                [visit_id],
            )
        ]
        good = {role for role, fps, kbps, width in found if fps > 0 and kbps > 0 and width > 0}
        if good >= {"patient", "doctor"}:
            return found
        assert time.monotonic() < deadline, f"no quality sample with video from both sides: {found}"
        await asyncio.sleep(0.5)


async def test_patient_waits_doctor_admits_both_decode_video(
    consult_server: ConsultServer, app_origin: str, patient_page: Page, doctor_page: Page, pages: PageRecorder
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        call = await asyncio.to_thread(prepare_call, consult_server)
        started = time.monotonic()
        await connect_both(call, patient_page, doctor_page, app_origin)
        connected_s = time.monotonic() - started
        await state(patient_page, "in_call")
        await state(doctor_page, "in_call")
        # Video keeps flowing both ways.
        await asyncio.gather(frames_grow(patient_page), frames_grow(doctor_page))
        # The countdown runs from the server's clock.
        left = int(await patient_page.get_by_test_id("countdown").get_attribute("data-seconds-left"))
        assert 14 * 60 < left <= 15 * 60
        # Mute, and the front/back switch (replaceTrack: same connection, video goes on).
        await patient_page.get_by_test_id("mute").tap()
        await expect(patient_page.get_by_test_id("mute")).to_have_attribute("aria-pressed", "true")
        assert await patient_page.evaluate(SENDER_ENABLED_JS % "audio") is False
        before_id = await patient_page.evaluate(SENDER_TRACK_ID_JS)
        await patient_page.get_by_test_id("flip").tap()
        await patient_page.wait_for_function(f"() => ({SENDER_TRACK_ID_JS})() !== {json.dumps(before_id)}")
        await frames_grow(doctor_page)
        # Chat works both ways.
        await doctor_page.get_by_test_id("tab-chat").click()
        await doctor_page.get_by_test_id("chat-input").fill("Please show me the rash.")
        await doctor_page.get_by_test_id("chat-send").click()
        await expect(patient_page.get_by_test_id("chat-log")).to_contain_text("Please show me the rash.")
        # The phone page fits the phone: no horizontal scrolling.
        assert await patient_page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        # Each page reports quality samples and the selected candidate pair (session log).
        # Stats are stored at most once per seat per 10 s (docs/protocol.md): the first stored
        # one may predate the first decoded frame, so wait for the next.
        deadline = time.monotonic() + 25
        while True:
            found = [
                (r["name"], r["role"], r["data"])
                for r in await asyncio.to_thread(
                    rows,
                    call.server,
                    "SELECT name, role, data FROM session_events WHERE visit_id = ?"
                    " AND ((name = 'stats' AND data LIKE '%frameWidth%')"
                    " OR (name = 'ice_state' AND data LIKE '%pair_type%'))",
                    [call.visit.id],
                )
            ]
            wanted = {(n, r) for n in ("stats", "ice_state") for r in ("host", "guest")}
            if {(n, r) for n, r, _ in found} >= wanted:
                break
            assert time.monotonic() < deadline, found
            await asyncio.sleep(0.5)
        sample = json.loads(next(d for n, r, d in found if n == "stats" and r == "guest"))["sample"]
        assert sample["frameWidth"] > 0 and "framesPerSecond" in sample and "freezeCount" in sample, sample
        assert any(json.loads(d).get("pair_type") == "host" for n, _, d in found if n == "ice_state")
        # ... which the server folds into quality_samples (issue 6): both sides, with video
        # flowing. Pages sample every 5 s and a bitrate needs two readings: bounded poll.
        samples = await wait_quality_samples(call.server, call.visit.id, timeout_s=15)
        print("quality samples (role, fps, kbps, width):", samples)
        assert_only_local_requests(pages, app_origin)

        # The doctor ends the visit; the patient's page says so.
        doctor_page.once("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
        await doctor_page.get_by_test_id("end").click()
        await expect(patient_page.get_by_test_id("ended-reason")).to_have_text("The doctor ended the visit.")
        await expect(doctor_page.get_by_test_id("call-ended")).to_be_visible()
        print(f"both decoding {connected_s:.1f} s after the patient opened the link")


async def test_short_visit_warns_and_the_server_ends_it_on_both_pages(
    consult_server_factory, app_origin: str, patient_page: Page, doctor_page: Page
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        server = await consult_server_factory(
            env={"CONSULT_VISIT_SECONDS_OVERRIDE": "3", "CONSULT_WARNING_MINUTES": str(1 / 60)}
        )
        call = await asyncio.to_thread(prepare_call, server)
        await patient_page.goto(call.patient_url)
        await patient_page.get_by_test_id("join").tap()
        await expect(patient_page.get_by_test_id("waiting-room")).to_be_visible(timeout=WAIT_MS)
        await sign_in_doctor(doctor_page, app_origin)
        await doctor_page.goto(call.room_url)
        await doctor_page.get_by_test_id("admit").click(timeout=WAIT_MS)
        admitted = time.monotonic()
        for page in (patient_page, doctor_page):
            warning = page.get_by_test_id("call-warning")
            await expect(warning).to_be_visible(timeout=5000)
            # In minutes, as people count: under one, "less than a minute" (never "1 seconds").
            await expect(warning).to_have_text("The visit ends in less than a minute.")
        for page in (patient_page, doctor_page):
            await expect(page.get_by_test_id("call-ended")).to_be_visible(timeout=5000)
            await expect(page.get_by_test_id("ended-reason")).to_have_text("The visit time is over.")
            # The end screen says it; the header's status line, warning and countdown are gone.
            await expect(page.get_by_test_id("call-status")).to_have_attribute("data-state", "ended")
            await expect(page.get_by_test_id("call-status")).to_be_hidden()
            await expect(page.get_by_test_id("call-warning")).to_be_hidden()
        elapsed = time.monotonic() - admitted
        assert 2.0 < elapsed < 6.0, elapsed
        assert await patient_page.evaluate("window.__consultPc") is None  # media torn down
        # The visit is over for good: reopening the link shows the end, not a new call.
        await patient_page.goto(call.patient_url)
        await expect(patient_page.get_by_test_id("call-ended")).to_be_visible(timeout=WAIT_MS)
        status = rows(server, "SELECT status FROM visits WHERE id = ?", [call.visit.id])[0]["status"]
        assert status == "completed"


async def test_relay_only_through_coturn(
    consult_server_factory,
    coturn,
    app_origin: str,
    patient_page: Page,
    doctor_page: Page,
    pages: PageRecorder,
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        server = await consult_server_factory(
            env={
                "CONSULT_TURN_URLS": coturn.url,
                "CONSULT_TURN_SECRET": coturn.secret,
                "CONSULT_ICE_TRANSPORT_POLICY": "relay",
            }
        )
        call = await asyncio.to_thread(prepare_call, server)
        await connect_both(call, patient_page, doctor_page, app_origin)
        for page in (patient_page, doctor_page):
            info = await frames_grow(page)
            assert info["local"]["type"] == "relay", info
            assert info["local"]["address"] == coturn.host, info
        assert_only_local_requests(pages, app_origin)


async def said_reconnecting(watched: tuple[Page, ...], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for page in watched:
            if any(s.startswith("reconnecting@") for s in await page.evaluate("window.__statusLog")):
                return
        await asyncio.sleep(0.1)
    raise AssertionError("no page said it was reconnecting")


async def restarted_ice(watched: tuple[Page, ...], timeout_s: float) -> None:
    """Wait until one of the pages restarted ICE (window.__consultTrace, call-peer.js)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for page in watched:
            if any("ice restart" in step for step in await page.evaluate("window.__consultTrace")):
                return
        await asyncio.sleep(0.1)
    raise AssertionError("no page restarted ICE")


def iptables(*args: str) -> None:
    subprocess.run([require_program("iptables"), "-w", *args], check=True, capture_output=True)


async def test_network_switch_recovers_by_itself(
    consult_server: ConsultServer, app_origin: str, patient_page: Page, doctor_page: Page
) -> None:
    """The phone's network path dies (its UDP ports are dropped for good, as when a phone
    leaves Wi-Fi); ICE restarts on new ports and video flows again. Then the phone's signaling
    socket drops: it reconnects and both sides renegotiate."""
    async with asyncio.timeout(TEST_TIMEOUT):
        call = await asyncio.to_thread(prepare_call, consult_server)
        await connect_both(call, patient_page, doctor_page, app_origin)
        before = await media(patient_page)
        assert before["local"]["protocol"] == "udp", before
        # Every UDP socket the phone gathered candidates on dies, as when it leaves a Wi-Fi
        # network: ICE cannot just switch pairs, it has to restart on new ports.
        ports = await patient_page.evaluate(LOCAL_UDP_PORTS_JS)
        assert before["local"]["port"] in ports, (before, ports)
        rules = [
            rule
            for port in ports
            for rule in (
                ("INPUT", "-p", "udp", "--dport", str(port), "-j", "DROP"),
                ("OUTPUT", "-p", "udp", "--sport", str(port), "-j", "DROP"),
            )
        ]
        for rule in rules:
            iptables("-I", *rule)
        try:
            cut = time.monotonic()
            await asyncio.gather(patient_page.evaluate(STATUS_LOG_JS), doctor_page.evaluate(STATUS_LOG_JS))
            # The media path is really gone: decoding stalls and the pages say so (both, or
            # the one whose ICE restart then fixes it for the other: whichever noticed first),
            # and ICE restarts. (Recovery now takes about 2 s: too quick to catch the stall
            # itself by polling frames; the new local port below shows the path changed.)
            await said_reconnecting((patient_page, doctor_page), timeout_s=10)
            await restarted_ice((patient_page, doctor_page), timeout_s=10)
            # ... and comes back by itself, over another port, within 10 s of the cut.
            left = 10 - (time.monotonic() - cut)
            after, _ = await asyncio.gather(
                frames_grow(patient_page, 10, timeout_s=left), frames_grow(doctor_page, 10, timeout_s=left)
            )
            recovered_s = time.monotonic() - cut
            for page in (patient_page, doctor_page):
                await page.wait_for_function(RECOVERED_JS, timeout=5000)
            assert after["local"]["port"] not in ports, after
        finally:
            for rule in rules:
                iptables("-D", *rule)
        print(f"media recovered {recovered_s:.1f} s after the path was cut")
        for name, page in (("patient", patient_page), ("doctor", doctor_page)):
            print(name, await page.evaluate("window.__statusLog"))

        # The signaling socket closes under the page (the server only sees it go away): it
        # reconnects, and the media, which never needed it, goes on on the same connection.
        await patient_page.evaluate(STATUS_LOG_JS)
        await patient_page.evaluate("window.__consultPc.__kept = true")
        await patient_page.evaluate("window.__oldWs = window.__consultSignaling.ws")
        await patient_page.evaluate("window.__oldWs.close()")
        await patient_page.wait_for_function(
            "() => window.__consultSignaling.isOpen && window.__consultSignaling.ws !== window.__oldWs",
            timeout=30_000,
        )
        print("patient status after the socket dropped:", await patient_page.evaluate("window.__statusLog"))
        await asyncio.gather(frames_grow(patient_page, 20), frames_grow(doctor_page, 20))
        assert await patient_page.evaluate("window.__consultPc.__kept === true")


PNG_1X1 = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360f8cfc0f01f0005000201e221bc330000000049454e44ae426082"
)


def add_report(server: ConsultServer, visit: SeededVisit, name: str) -> int:
    """A report as the upload path would leave it: a row and a file under a server-chosen name."""
    import hashlib
    import secrets

    digest = secrets.token_hex(32)
    stored = f"{digest[:2]}/{digest}"
    path = server.data_dir / "uploads" / stored
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(PNG_1X1)
    return write(
        server,
        lambda db: insert(
            db,
            "INSERT INTO reports (visit_id, owner_id, display_name, stored_name, content_type, size, sha256,"
            " created) VALUES (?, ?, ?, ?, 'image/png', ?, ?, ?)",
            [
                visit.id,
                visit.patient_id,
                name,
                stored,
                len(PNG_1X1),
                hashlib.sha256(PNG_1X1).hexdigest(),
                time.time(),
            ],
        ),
    )


async def test_doctor_sidebar_shows_the_uploaded_report_and_earlier_visits(
    consult_server: ConsultServer, app_origin: str, doctor_page: Page, pages: PageRecorder
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        call = await asyncio.to_thread(prepare_call, consult_server)
        report_id = await asyncio.to_thread(add_report, consult_server, call.visit, "Blood test 血常规.png")
        earlier = await asyncio.to_thread(
            seed_visit,
            consult_server,
            doctor_id=call.visit.doctor_id,
            starts_in_s=-14 * 86400,
            status="completed",
        )
        await sign_in_doctor(doctor_page, app_origin)
        await doctor_page.goto(call.room_url)
        item = doctor_page.get_by_test_id("report-item")
        await expect(item).to_have_count(1, timeout=WAIT_MS)
        await expect(item).to_contain_text("Blood test 血常规.png")
        async with doctor_page.expect_response(re.compile(rf"/reports/{report_id}$")) as response:
            await item.get_by_role("link", name=re.compile("Blood test")).click()
        assert (await response.value).status == 200
        await expect(doctor_page.get_by_test_id("report-viewer")).to_be_visible()
        img = doctor_page.get_by_test_id("viewer-image")
        await expect(img).to_have_attribute("src", f"/reports/{report_id}", timeout=WAIT_MS)
        await expect(img).to_be_visible(timeout=WAIT_MS)  # the viewer's (tests/test_browser_viewer.py)
        assert len(doctor_page.context.pages) == 1  # inline, not a new tab

        await doctor_page.get_by_test_id("tab-earlier").click()
        await expect(doctor_page.get_by_test_id("panel-reports")).to_be_hidden()
        visits = doctor_page.get_by_test_id("earlier-visit")
        await expect(visits).to_have_count(1)
        assert await visits.locator(f"a[href='/visits/{earlier.public_id}']").count() == 1
        assert_only_local_requests(pages, app_origin)
