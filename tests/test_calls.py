"""The consult side of calls, without a browser: ConsultPolicy over the real app and database,
driven with the protocol's Python client (signaling/client.py)."""

from __future__ import annotations

import asyncio
import json
import re
import time

import pytest

from consult.app import create_app
from consult.calls.policy import HOST_TOKEN_TTL_S
from signaling.client import ErrorReply, SignalingClient
from tests.booking_helpers import make_clinic, signed_in
from tests.call_helpers import host_token, keyed_settings, patient_token, seed_visit
from tests.conftest import login
from tests.db_helpers import rows, write


@pytest.fixture
def clinic(settings, make_user):
    c = make_clinic(settings, make_user, doctors=2)
    c.patient_id = make_user("patient", login="13900000001", name="Pat Ient")
    return c


async def open_app(aiohttp_client, settings):
    client = await aiohttp_client(create_app(settings))
    return client, keyed_settings(settings.data_dir)


async def hello(client, room_id: str, token: str, **headers) -> SignalingClient:
    sig = SignalingClient(await client.ws_connect(f"/ws/rooms/{room_id}", headers=headers))
    await sig.hello(token)
    return sig


async def refused(client, room_id: str, token: str) -> tuple[str, int | None]:
    sig = SignalingClient(await client.ws_connect(f"/ws/rooms/{room_id}"))
    with pytest.raises(ErrorReply) as exc:
        await sig.hello(token)
    code = await sig.wait_closed()
    return exc.value.code, code


async def flush_events(client) -> None:
    from consult.calls.policy import SIGNALING

    await client.app[SIGNALING].events.flush()


async def test_waiting_room_admit_clock_events_and_end(aiohttp_client, settings, clinic):
    client, keyed = await open_app(aiohttp_client, settings)
    visit = seed_visit(settings, doctor_id=clinic.doctor_ids[0], patient_id=clinic.patient_id)

    guest = await hello(client, visit.public_id, patient_token(keyed, visit), **{"User-Agent": "PhoneUA/1"})
    assert guest.welcome["role"] == "guest" and guest.welcome["polite"] is True
    assert guest.welcome["participant"] == "Pat Ient"
    assert guest.welcome["ice_servers"] == [] and guest.welcome["ice_transport_policy"] == "all"
    await guest.next_message("waiting")

    host = await hello(client, visit.public_id, host_token(keyed, visit))
    assert host.welcome["role"] == "host" and host.welcome["peer"]["participant"] == "Pat Ient"
    await host.send({"type": "admit"})
    clock = await guest.next_message("clock")
    assert clock["duration_s"] == 15 * 60  # the doctor's visit length
    await host.next_message("clock")

    await flush_events(client)
    room = rows(settings, "SELECT * FROM rooms WHERE visit_id = ?", [visit.id])
    assert (
        room and room[0]["started_at"] == pytest.approx(clock["started_at"]) and room[0]["ended_at"] is None
    )

    await host.send({"type": "chat", "text": "hello"})
    assert (await guest.next_message("chat"))["text"] == "hello"
    await host.send({"type": "end"})
    assert (await guest.next_message("ended"))["reason"] == "host_ended"
    assert await guest.wait_closed() == 4000
    await flush_events(client)

    assert rows(settings, "SELECT status FROM visits WHERE id = ?", [visit.id])[0]["status"] == "completed"
    room = rows(settings, "SELECT * FROM rooms WHERE visit_id = ?", [visit.id])[0]
    assert room["end_reason"] == "host_ended" and room["ended_at"] >= room["started_at"]
    events = rows(
        settings, "SELECT name, role, data FROM session_events WHERE visit_id = ? ORDER BY id", [visit.id]
    )
    names = [e["name"] for e in events]
    for expected in ("room_opened", "joined", "waiting", "admitted", "clock_started", "chat", "ended"):
        assert expected in names, names
    guest_join = next(e for e in events if e["name"] == "joined" and e["role"] == "guest")
    assert json.loads(guest_join["data"])["user_agent"] == "PhoneUA/1"
    # The admin session summary is fed in the same write.
    summary = rows(
        settings, "SELECT outcome, end_reason FROM session_summaries WHERE visit_id = ?", [visit.id]
    )
    assert summary == [{"outcome": "completed", "end_reason": "host_ended"}]
    # An ended visit cannot be rejoined.
    assert await refused(client, visit.public_id, patient_token(keyed, visit)) == ("room_ended", 4003)


async def test_refusals(aiohttp_client, settings, clinic):
    client, keyed = await open_app(aiohttp_client, settings)
    visit = seed_visit(settings, doctor_id=clinic.doctor_ids[0], patient_id=clinic.patient_id)
    other = seed_visit(settings, doctor_id=clinic.doctor_ids[1], patient_id=clinic.patient_id)
    good = patient_token(keyed, visit)
    cases = {
        "tampered": (visit.public_id, good[:-4] + "AAAA", "invalid_token"),
        "another visit's link": (visit.public_id, patient_token(keyed, other), "invalid_token"),
        "expired link": (visit.public_id, patient_token(keyed, visit, shift_s=-3 * 3600), "too_late"),
        "not yet": (visit.public_id, patient_token(keyed, visit, shift_s=86400), "too_early"),
        "replaced link": (visit.public_id, patient_token(keyed, visit, nonce="old-nonce"), "invalid_token"),
        "another doctor": (
            visit.public_id,
            host_token(keyed, visit, user_id=clinic.doctor_ids[1]),
            "forbidden",
        ),
        "expired host token": (
            visit.public_id,
            host_token(keyed, visit, now=time.time() - HOST_TOKEN_TTL_S - 5),
            "invalid_token",
        ),
        "forged host token": (visit.public_id, "host.eHh4.eHh4", "invalid_token"),
    }
    for name, (room, token, code) in cases.items():
        assert await refused(client, room, token) == (code, 4003), name
    # A doctor's own call link does not open the patient's seat.
    from consult.calls import links as calllinks

    doctor_link = calllinks.make_token(
        keyed, visit.public_id, "doctor", visit.nonce, visit.starts_at, visit.ends_at
    )
    assert (await refused(client, visit.public_id, doctor_link))[0] == "invalid_token"
    # Cancelled: refused with a clear message, in the request's language.
    write(settings, lambda d: d.execute("UPDATE visits SET status = 'cancelled' WHERE id = ?", [visit.id]))
    sig = SignalingClient(
        await client.ws_connect(f"/ws/rooms/{visit.public_id}", headers={"Accept-Language": "zh-CN"})
    )
    with pytest.raises(ErrorReply) as exc:
        await sig.hello(good)
    assert exc.value.code == "visit_not_confirmed"
    assert re.search(r"[\u4e00-\u9fff]", exc.value.message["message"]), exc.value.message
    await flush_events(client)
    errors = rows(
        settings, "SELECT data FROM session_events WHERE visit_id = ? AND name = 'error'", [visit.id]
    )
    assert {json.loads(e["data"])["code"] for e in errors} >= {"invalid_token", "too_late", "forbidden"}


async def test_clock_survives_a_restart(aiohttp_client, settings, clinic):
    client, keyed = await open_app(aiohttp_client, settings)
    visit = seed_visit(settings, doctor_id=clinic.doctor_ids[0], patient_id=clinic.patient_id)
    guest = await hello(client, visit.public_id, patient_token(keyed, visit))
    host = await hello(client, visit.public_id, host_token(keyed, visit))
    await host.send({"type": "admit"})
    first = await host.next_message("clock")
    await client.close()  # the whole app shuts down: sockets closed with 1001, timers stopped
    assert guest.ws.closed

    client2, _ = await open_app(aiohttp_client, settings)
    guest2 = await hello(client2, visit.public_id, patient_token(keyed, visit))
    # Admission and clock come back from the database: no waiting room, same end time.
    assert guest2.welcome["admitted"] is True
    assert guest2.welcome["clock"]["started_at"] == pytest.approx(first["started_at"])
    assert guest2.welcome["clock"]["ends_at"] == pytest.approx(first["ends_at"])


async def test_short_visit_warns_then_ends_and_completes(aiohttp_client, make_settings, clinic):
    settings = make_settings(visit_seconds_override=2.0, warning_minutes=1 / 60)
    client, keyed = await open_app(aiohttp_client, settings)
    visit = seed_visit(settings, doctor_id=clinic.doctor_ids[0], patient_id=clinic.patient_id)
    guest = await hello(client, visit.public_id, patient_token(keyed, visit))
    host = await hello(client, visit.public_id, host_token(keyed, visit))
    await host.send({"type": "admit"})
    assert (await guest.next_message("clock"))["duration_s"] == 2.0
    started = time.monotonic()
    assert (await guest.next_message("warning", timeout=4))["seconds_left"] == 1
    assert (await host.next_message("warning", timeout=4))["seconds_left"] == 1
    assert (await guest.next_message("ended", timeout=4))["reason"] == "time_limit"
    assert (await host.next_message("ended", timeout=4))["reason"] == "time_limit"
    assert 1.5 < time.monotonic() - started < 3.5
    await flush_events(client)
    assert rows(settings, "SELECT status FROM visits WHERE id = ?", [visit.id])[0]["status"] == "completed"
    assert (
        rows(settings, "SELECT end_reason FROM rooms WHERE visit_id = ?", [visit.id])[0]["end_reason"]
        == "time_limit"
    )


async def test_ice_servers_from_settings_and_masked_addresses(aiohttp_client, make_settings, clinic):
    settings = make_settings(
        turn_urls=("turn:turn.hospital.test:3478?transport=udp",),
        turn_secret="s3cret",
        ice_transport_policy="relay",
        mask_addresses=True,
    )
    client, keyed = await open_app(aiohttp_client, settings)
    visit = seed_visit(settings, doctor_id=clinic.doctor_ids[0], patient_id=clinic.patient_id)
    guest = await hello(client, visit.public_id, patient_token(keyed, visit))
    (server,) = guest.welcome["ice_servers"]
    assert server["urls"] == ["turn:turn.hospital.test:3478?transport=udp"]
    expiry, user = server["username"].split(":")
    assert user == f"p{clinic.patient_id}" and int(expiry) > time.time()  # an id, never a name
    assert guest.welcome["ice_transport_policy"] == "relay"
    await flush_events(client)
    joined = rows(settings, "SELECT data FROM session_events WHERE name = 'joined'")
    remote = json.loads(joined[0]["data"])["remote"]
    assert remote.endswith(".0/24") or remote.endswith("::/48"), remote


@pytest.mark.locale("en")  # asserts English texts
async def test_pages_and_who_may_open_them(aiohttp_server, aiohttp_client, settings, clinic):
    server = await aiohttp_server(create_app(settings))
    anon = await aiohttp_client(server)
    keyed = keyed_settings(settings.data_dir)
    visit = seed_visit(settings, doctor_id=clinic.doctor_ids[0], patient_id=clinic.patient_id)
    token = patient_token(keyed, visit)

    resp = await anon.get(f"/call/{token}")
    assert resp.status == 200
    page = await resp.text()
    assert f'data-ws-path="/ws/rooms/{visit.public_id}"' in page and f'data-token="{token}"' in page
    assert "playsinline" in page and 'id="i18n"' in page and 'data-testid="waiting-room"' in page
    # Nothing inline but the JSON block (CSP: script-src 'self').
    scripts = re.findall(r"<script([^>]*)>(.*?)</script>", page, re.S)
    assert all("src=" in attrs or 'type="application/json"' in attrs for attrs, _ in scripts)
    assert " style=" not in page
    strings = json.loads(
        re.search(r'<script type="application/json" id="i18n">(.*?)</script>', page, re.S)[1]
    )
    assert strings["waiting_doctor"].startswith("Waiting for the doctor")

    room = f"/doctor/visits/{visit.public_id}/room"
    resp = await anon.get(room, allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"].startswith("/login")
    # The doctor's own call link leads to the consult room.
    from consult.calls import links as calllinks

    doctor_link = calllinks.make_token(
        keyed, visit.public_id, "doctor", visit.nonce, visit.starts_at, visit.ends_at
    )
    resp = await anon.get(f"/call/{doctor_link}", allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"] == room

    doctor = await signed_in(aiohttp_client, server, "doc0")
    resp = await doctor.get(room)
    assert resp.status == 200
    page = await resp.text()
    assert 'data-role="host"' in page and 'data-token="host.' in page
    for tab in ("reports", "earlier", "notes", "rx", "chat"):
        assert f'data-tab="{tab}"' in page
    assert 'data-testid="reports-panel"' in page
    resp = await doctor.get(room + "/token")
    assert resp.status == 200 and (await resp.json())["token"].startswith("host.")

    other = await aiohttp_client(server)
    await login(other, "doc1")
    assert (await other.get(room)).status == 403
    assert (await other.get(room + "/token")).status == 403
    patient = await aiohttp_client(server)
    await login(patient, "13900000001")
    assert (await patient.get(room)).status == 403


@pytest.mark.netns  # real aiortc media over the bridge address
async def test_two_aiortc_peers_exchange_media_through_the_app(aiohttp_client, settings, clinic):
    """The same path the browsers take, with the protocol's Python client (aiortc)."""
    from signaling.client import PeerSession

    client, keyed = await open_app(aiohttp_client, settings)
    visit = seed_visit(settings, doctor_id=clinic.doctor_ids[0], patient_id=clinic.patient_id)
    guest = await hello(client, visit.public_id, patient_token(keyed, visit))
    host = await hello(client, visit.public_id, host_token(keyed, visit))
    await host.send({"type": "admit"})
    await guest.next_message("peer_joined")
    host_peer, guest_peer = PeerSession(host), PeerSession(guest)
    try:
        await host_peer.start()
        await asyncio.gather(host_peer.run(10, timeout_s=20), guest_peer.run(10, timeout_s=20))
        assert host_peer.frames_received >= 10 and guest_peer.frames_received >= 10
    finally:
        await asyncio.gather(host_peer.close(), guest_peer.close())


async def test_a_burst_of_room_events_is_stored_in_one_write_in_order(
    aiohttp_client, settings, clinic, monkeypatch
):
    """Events queued while the writer was busy (a clinic's sockets connecting at once) reach the
    database in one transaction, in order; an event of a room that is no visit is skipped without
    losing the others, and a seat over its budget is still told so."""
    from consult.calls.policy import POLICY, SIGNALING, Budget
    from signaling import RoomEvent

    client, _keyed = await open_app(aiohttp_client, settings)
    visit = seed_visit(settings, doctor_id=clinic.doctor_ids[0], patient_id=clinic.patient_id)
    server, policy = client.app[SIGNALING], client.app[POLICY]
    policy.seat_budget = Budget(rows=60, bytes=1 << 20)
    writes = []
    real_write = policy.db.execute_write_fn

    async def counted_write(fn):  # counts the writes, and still makes them
        writes.append(fn)
        return await real_write(fn)

    monkeypatch.setattr(policy.db, "execute_write_fn", counted_write)
    now = time.time()
    for i in range(100):
        server.emit(RoomEvent("chat", visit.public_id, "host", now + i, {"text": f"m{i}"}))
        if i == 30:
            server.emit(RoomEvent("chat", "no-such-visit", "host", now, {"text": "lost"}))
    assert not server.seats.get(visit.public_id, "host").muted
    await flush_events(client)

    sql = "SELECT data FROM session_events WHERE visit_id = ? AND name = 'chat' ORDER BY id"
    texts = [json.loads(r["data"])["text"] for r in rows(settings, sql, [visit.id])]
    assert texts == [f"m{i}" for i in range(60)]  # the budget's 60 rows, in order
    assert len(writes) == 1
    assert server.seats.get(visit.public_id, "host").muted  # the other 40 answered False
