"""The doctor's clinic board without a browser: its live stream (who may follow it, what it
shows as rooms change), admitting from it, the next patient, the running-late notice, and the
doctor's own visit page."""

from __future__ import annotations

import asyncio
import json
import re
import time

import pytest

from consult.app import create_app
from consult.calls import board_views
from consult.calls.policy import SIGNALING
from signaling.client import SignalingClient
from tests.booking_helpers import make_clinic, post, signed_in
from tests.call_helpers import host_token, keyed_settings, patient_token, seed_visit, within_today
from tests.conftest import login
from tests.db_helpers import rows, write

SSE = {"Accept": "text/event-stream"}  # what EventSource sends


def execute(settings, sql, params=()):
    write(settings, lambda d: d.execute(sql, params))


@pytest.fixture
def clinic(settings, make_user):
    c = make_clinic(settings, make_user, doctors=2)
    c.patients = [
        make_user("patient", login=f"1390000000{i}", name=name)
        for i, name in enumerate(["王芳", "李雷", "韩梅"])
    ]
    return c


@pytest.fixture
async def server(aiohttp_server, settings):
    return await aiohttp_server(create_app(settings))


async def events(resp):
    """Each `data:` frame of a server-sent-events response, parsed."""
    while True:
        line = await resp.content.readline()
        if not line:
            return
        if line.startswith(b"data: "):
            yield json.loads(line[6:])


async def frame_where(resp, condition, within_s: float = 20):
    """The first frame for which ``condition`` holds (earlier ones are skipped)."""
    async with asyncio.timeout(within_s):
        async for frame in events(resp):
            if condition(frame):
                return frame
    raise AssertionError("the stream ended")


def state_of(frame, public_id):
    return next((v["state"] for v in frame["visits"] if v["public_id"] == public_id), None)


async def test_board_stream_follows_the_doctors_rooms_and_only_theirs(
    aiohttp_client, server, settings, clinic
):
    doc0, doc1 = clinic.doctor_ids
    ago, ahead, other_ago = within_today(settings.timezone, -120, 300, -60)
    first = seed_visit(settings, doctor_id=doc0, patient_id=clinic.patients[0], starts_in_s=ago)
    second = seed_visit(settings, doctor_id=doc0, patient_id=clinic.patients[1], starts_in_s=ahead)
    other = seed_visit(settings, doctor_id=doc1, patient_id=clinic.patients[2], starts_in_s=other_ago)
    keyed = keyed_settings(settings.data_dir)

    board0 = await signed_in(aiohttp_client, server, "doc0")
    board1 = await signed_in(aiohttp_client, server, "doc1")
    stream0 = await board0.get("/doctor/board/events", headers=SSE)
    assert stream0.status == 200 and stream0.headers["Content-Type"].startswith("text/event-stream")
    assert stream0.headers["Cache-Control"] == "no-store"
    stream1 = await board1.get("/doctor/board/events", headers=SSE)
    frame = await frame_where(stream0, lambda f: True)
    assert [v["public_id"] for v in frame["visits"]] == [first.public_id, second.public_id]  # time order
    assert [v["state"] for v in frame["visits"]] == ["booked", "booked"]
    assert frame["visits"][0]["patient"] == "王芳" and frame["visits"][0]["state_label"] == "已预约"
    frame1 = await frame_where(stream1, lambda f: True)
    assert [v["public_id"] for v in frame1["visits"]] == [other.public_id]

    # The patient opens the call link: waiting, on the board at once, with an admit button.
    anon = await aiohttp_client(server)
    guest = SignalingClient(await anon.ws_connect(f"/ws/rooms/{first.public_id}"))
    await guest.hello(patient_token(keyed, first))
    frame = await frame_where(stream0, lambda f: state_of(f, first.public_id) == "waiting")
    row = frame["visits"][0]
    assert row["state_label"] == "候诊中" and row["admit_url"] == f"/doctor/visits/{first.public_id}/admit"

    host = SignalingClient(await board0.ws_connect(f"/ws/rooms/{first.public_id}"))
    await host.hello(host_token(keyed, first))
    await host.send({"type": "admit"})
    await guest.send({"type": "join"})
    await frame_where(stream0, lambda f: state_of(f, first.public_id) == "in_call")
    await host.send({"type": "end"})
    frame = await frame_where(stream0, lambda f: state_of(f, first.public_id) == "finished")
    assert frame["visits"][0]["room_url"] is None and frame["visits"][0]["admit_url"] is None

    # The other doctor's board never named the first doctor's visits.
    stream1.close()
    await asyncio.sleep(0)
    assert first.public_id not in json.dumps(frame1) and second.public_id not in json.dumps(frame1)
    stream0.close()


async def test_only_doctors_follow_a_board_and_only_a_few_streams_each(
    aiohttp_client, server, settings, clinic, monkeypatch
):
    patient = await signed_in(aiohttp_client, server, "13900000000")
    assert (await patient.get("/doctor/board/events", headers=SSE)).status == 403
    doctor = await signed_in(aiohttp_client, server, "doc0")
    plain = await doctor.get("/doctor/board/events")  # not EventSource: refused, not an endless body
    assert plain.status == 400 and "实时更新" in await plain.text()
    admin = await signed_in(aiohttp_client, server, "boss")
    assert (await admin.get("/doctor/board/events", headers=SSE)).status == 403
    anon = await aiohttp_client(server)
    resp = await anon.get("/doctor/board/events", headers=SSE, allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"].startswith("/login")

    streams = [
        await doctor.get("/doctor/board/events", headers=SSE)
        for _ in range(board_views.BOARD_STREAMS_PER_DOCTOR)
    ]
    assert all(s.status == 200 for s in streams)
    refused = await doctor.get("/doctor/board/events", headers=SSE)
    assert refused.status == 429
    assert "打开此页面的窗口过多" in await refused.text()
    # Another doctor's boards are counted apart.
    other = await signed_in(aiohttp_client, server, "doc1")
    extra = await other.get("/doctor/board/events", headers=SSE)
    assert extra.status == 200
    for s in [*streams, extra]:
        s.close()
    # A closed stream frees its place.
    async with asyncio.timeout(20):
        while True:
            again = await doctor.get("/doctor/board/events", headers=SSE)
            if again.status == 200:
                again.close()
                break
            await asyncio.sleep(0.2)


async def test_admit_from_the_board_needs_csrf_and_the_visits_doctor(
    aiohttp_client, server, settings, clinic
):
    visit = seed_visit(settings, doctor_id=clinic.doctor_ids[0], patient_id=clinic.patients[0])
    doctor = await signed_in(aiohttp_client, server, "doc0")
    path = f"/doctor/visits/{visit.public_id}/admit"
    assert (await doctor.post(path, data={}, allow_redirects=False)).status == 403  # no CSRF token
    resp = await post(doctor, path, {})
    assert resp.status == 303
    location = resp.headers["Location"]
    assert location.startswith(f"/doctor/visits/{visit.public_id}/room?admit=")
    room = await (await doctor.get(location)).text()
    assert "room-admit.js" in room  # the room admits the waiting patient itself
    plain = await (await doctor.get(f"/doctor/visits/{visit.public_id}/room?admit=1.forged")).text()
    assert "room-admit.js" not in plain  # a link without a ticket from the POST admits nobody
    assert 'data-testid="next-patient"' in plain and f"/doctor/next?after={visit.public_id}" in plain

    other = await signed_in(aiohttp_client, server, "doc1")
    assert (await post(other, path, {})).status == 404


async def test_next_patient_is_the_one_waiting_then_the_next_booked(aiohttp_client, server, settings, clinic):
    doc0 = clinic.doctor_ids[0]
    done_at, booked_at, waiting_at = within_today(settings.timezone, -600, -300, -60)
    done = seed_visit(settings, doctor_id=doc0, patient_id=clinic.patients[0], starts_in_s=done_at)
    booked = seed_visit(settings, doctor_id=doc0, patient_id=clinic.patients[1], starts_in_s=booked_at)
    waiting = seed_visit(settings, doctor_id=doc0, patient_id=clinic.patients[2], starts_in_s=waiting_at)
    execute(settings, "UPDATE visits SET status = 'completed' WHERE id = ?", [done.id])
    doctor = await signed_in(aiohttp_client, server, "doc0")

    async def next_after(public_id):
        resp = await doctor.get(f"/doctor/next?after={public_id}", allow_redirects=False)
        assert resp.status == 303
        return resp.headers["Location"]

    assert await next_after(done.public_id) == f"/doctor/visits/{booked.public_id}/room"
    guest = SignalingClient(await doctor.ws_connect(f"/ws/rooms/{waiting.public_id}"))
    await guest.hello(patient_token(keyed_settings(settings.data_dir), waiting))
    await doctor.app[SIGNALING].events.flush()
    assert await next_after(done.public_id) == f"/doctor/visits/{waiting.public_id}/room"
    execute(settings, "UPDATE visits SET status = 'completed' WHERE id IN (?, ?)", [booked.id, waiting.id])
    await guest.close()
    assert (await next_after(waiting.public_id)).startswith("/doctor?m=no_next")


async def test_running_late_reaches_the_waiting_page_and_the_outbox(aiohttp_client, server, settings, clinic):
    doc0 = clinic.doctor_ids[0]
    ahead, ago = within_today(settings.timezone, 600, -60)
    later = seed_visit(settings, doctor_id=doc0, patient_id=clinic.patients[0], starts_in_s=ahead)
    doc1 = clinic.doctor_ids[1]
    other = seed_visit(settings, doctor_id=doc1, patient_id=clinic.patients[1], starts_in_s=ago)
    keyed = keyed_settings(settings.data_dir)
    anon = await aiohttp_client(server)
    notices = await anon.get(f"/call/{patient_token(keyed, later)}/notices", headers=SSE)
    assert notices.status == 200
    assert (await frame_where(notices, lambda f: True)) == {"late": 0, "text": ""}
    others = await anon.get(f"/call/{patient_token(keyed, other)}/notices", headers=SSE)

    doctor = await signed_in(aiohttp_client, server, "doc0")
    bad = await post(doctor, "/doctor/running-late", {"minutes": "7"})
    assert bad.status == 400 and "请从列表中选择推迟的时间" in await bad.text()
    resp = await post(doctor, "/doctor/running-late", {"minutes": "20"}, json=True)
    assert await resp.json() == {"late": 20, "told": 1}
    frame = await frame_where(notices, lambda f: f["late"] == 20)
    assert "20" in frame["text"] and "推迟" in frame["text"]
    # The other doctor's patient is told nothing.
    assert await frame_where(others, lambda f: True) == {"late": 0, "text": ""}

    for _ in range(150):  # up to 30 s: the job worker sends the SMS through the outbox
        if sent := rows(settings, "SELECT * FROM outbox WHERE body LIKE '%20%'"):
            break
        await asyncio.sleep(0.2)
    assert sent[0]["recipient"] == "13900000000" and "20" in sent[0]["body"]
    audit = rows(settings, "SELECT action, detail FROM audit_log WHERE action = 'clinic.running_late'")
    assert json.loads(audit[0]["detail"])["minutes"] == 20
    # One link holds a few streams at most, whatever its holder opens.
    more = [
        await anon.get(f"/call/{patient_token(keyed, later)}/notices", headers=SSE)
        for _ in range(board_views.NOTICE_STREAMS_PER_VISIT - 1)
    ]
    assert [m.status for m in more] == [200] * len(more)
    assert (await anon.get(f"/call/{patient_token(keyed, later)}/notices", headers=SSE)).status == 429
    for m in more:
        m.close()
    # A stale or forged link follows nothing.
    assert (await anon.get("/call/forged.token/notices", headers=SSE)).status == 404
    notices.close()
    others.close()


async def test_the_doctor_opening_a_visit_gets_the_doctors_view(aiohttp_client, server, settings, clinic):
    visit = seed_visit(settings, doctor_id=clinic.doctor_ids[0], patient_id=clinic.patients[0])
    earlier = seed_visit(
        settings,
        doctor_id=clinic.doctor_ids[1],
        patient_id=clinic.patients[0],
        starts_in_s=-7 * 86400,
    )
    execute(settings, "UPDATE visits SET status = 'completed' WHERE id = ?", [earlier.id])
    doctor = await signed_in(aiohttp_client, server, "doc0")
    page = await (await doctor.get(f"/visits/{visit.public_id}")).text()
    assert 'data-testid="doctor-visit-title"' in page and "王芳 的就诊" in page
    assert f'href="/doctor/visits/{visit.public_id}/room"' in page  # enter the room
    assert 'data-testid="reports-panel"' in page and 'data-testid="notes-panel"' in page
    assert f"/visits/{earlier.public_id}" in page  # the patient's earlier visit
    # Never the patient's page: no call link, no QR code, no "no sign-in needed", not "with Doctor 0".
    assert "/call/" not in page and "qr.svg" not in page and 'data-testid="qr"' not in page
    assert "无需登录" not in page and "Doctor 0" not in re.sub(r"<header.*?</header>", "", page, flags=re.S)

    assert (
        await (await signed_in(aiohttp_client, server, "doc1")).get(f"/visits/{visit.public_id}")
    ).status == 404
    patient = await signed_in(aiohttp_client, server, "13900000000")
    mine = await (await patient.get(f"/visits/{visit.public_id}")).text()
    assert 'data-testid="call-link"' in mine and 'data-testid="doctor-visit-title"' not in mine
    admin = await signed_in(aiohttp_client, server, "boss")
    seen = await (await admin.get(f"/visits/{visit.public_id}")).text()
    assert 'data-testid="patient-name"' in seen and "/call/" not in seen


async def test_new_reports_count_until_the_doctor_looks(aiohttp_client, server, settings, clinic):
    (ago,) = within_today(settings.timezone, -60)
    doc0 = clinic.doctor_ids[0]
    visit = seed_visit(settings, doctor_id=doc0, patient_id=clinic.patients[0], starts_in_s=ago)
    for n in range(2):
        execute(
            settings,
            "INSERT INTO reports (visit_id, owner_id, display_name, stored_name, content_type, size, sha256,"
            " created) VALUES (?, ?, ?, ?, 'application/pdf', 10, 'x', ?)",
            [visit.id, clinic.patients[0], f"r{n}.pdf", f"stored-{n}", time.time()],
        )
    doctor = await signed_in(aiohttp_client, server, "doc0")
    stream = await doctor.get("/doctor/board/events", headers=SSE)
    frame = await frame_where(stream, lambda f: True)
    assert (frame["visits"][0]["reports"], frame["visits"][0]["new_reports"]) == (2, 2)
    assert frame["visits"][0]["reports_label"] == "新增 2 份"
    await doctor.get(f"/visits/{visit.public_id}")  # the doctor's visit page shows them
    frame = await frame_where(stream, lambda f: f["visits"][0]["new_reports"] == 0)
    assert frame["visits"][0]["reports"] == 2
    stream.close()


async def test_board_page_lists_today_in_zh(aiohttp_client, server, settings, clinic):
    (ago,) = within_today(settings.timezone, -60)
    seed_visit(settings, doctor_id=clinic.doctor_ids[0], patient_id=clinic.patients[0], starts_in_s=ago)
    client = await aiohttp_client(server)
    await login(client, "doc0")
    page = await (await client.get("/doctor")).text()
    assert 'data-testid="board"' in page and "王芳" in page and "已预约" in page
    assert 'data-events-url="/doctor/board/events"' in page and "board.js" in page
    assert "推迟约 20 分钟" in page and "%(num)" not in page  # the running-late choices
