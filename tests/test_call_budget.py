"""One call link cannot store more than its budget, whatever its clients send.

Through the real app and database: a guest (waiting, then admitted) and the host flood stats,
errors, chat and ICE states, reconnecting in loops, and strangers flood the room with bad
tokens. The database must hold at most the budget per seat (docs/protocol.md, "Limits on what
is recorded"), and the call must still work. Seen on the code before the budget (guest,
host, refused-join rows and bytes): guest 947 rows / 2,106,294 bytes against a budget of 60 rows
/ 6 KiB, host 61 / 155,106, refusals 41 rows; 2.2 MB for the visit in about 3 s. With it: guest
52 / 6,126, host 21 / 5,299, refusals 10 / 450; 8.5 kB for the visit.
"""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

from consult.app import create_app
from consult.calls.policy import POLICY, SIGNALING
from consult.core.metrics import METRICS
from signaling.client import ErrorReply, SignalingClient
from signaling.connection import Connection
from tests.booking_helpers import make_clinic
from tests.call_helpers import host_token, keyed_settings, patient_token, seed_visit
from tests.db_helpers import read

# Small enough to be reached in a few seconds under the default rate limit (20/s, burst 50).
SEAT = SimpleNamespace(rows=60, bytes=6 * 1024)
ROOM = SimpleNamespace(rows=10, bytes=1024)
# What a stored row costs beyond its data, as counted by the budget (consult.calls.policy).
EVENT_ROW, SAMPLE_ROW = 32, 48


@pytest.fixture
def clinic(settings, make_user):
    c = make_clinic(settings, make_user, doctors=1)
    c.patient_id = make_user("patient", login="13900000001", name="Pat Ient")
    return c


def query(settings, sql, params=()):
    return read(settings, lambda d: [tuple(r) for r in d.execute(sql, params).fetchall()])


def stored(settings, visit_id: int) -> dict[str, tuple[int, int]]:
    """(rows, bytes) stored per seat for the visit, counted from the tables themselves."""
    out: dict[str, tuple[int, int]] = {}
    for seat, rows, size in query(
        settings,
        "SELECT coalesce(role, ''), count(*), coalesce(sum(length(CAST(data AS BLOB)) + length(name)"
        " + length(coalesce(role, ''))), 0) FROM session_events"
        " WHERE visit_id = ? AND name NOT IN"
        " ('admitted', 'clock_started', 'warning', 'ended', 'recording_stopped') GROUP BY 1",
        [visit_id],
    ):
        out[seat] = (rows, size + rows * EVENT_ROW)
    for role, n in query(
        settings, "SELECT role, count(*) FROM quality_samples WHERE visit_id = ? GROUP BY role", [visit_id]
    ):
        seat = {"patient": "guest", "doctor": "host"}[role]
        rows, size = out.get(seat, (0, 0))
        out[seat] = (rows + n, size + n * SAMPLE_ROW)
    return out


def total_bytes(settings, visit_id: int) -> int:
    (events,) = query(
        settings,
        "SELECT coalesce(sum(length(CAST(data AS BLOB))), 0) FROM session_events WHERE visit_id = ?",
        [visit_id],
    )[0]
    (samples,) = query(settings, "SELECT count(*) FROM quality_samples WHERE visit_id = ?", [visit_id])[0]
    return events + samples * SAMPLE_ROW


async def hello(client, room_id: str, token: str) -> SignalingClient:
    sig = SignalingClient(await client.ws_connect(f"/ws/rooms/{room_id}"))
    await sig.hello(token)
    return sig


BIG_SAMPLE = {"fps": 30, "rtt_ms": 40, "junk": "x" * 15_000}


async def flood(sig: SignalingClient, n: int = 40) -> None:
    for i in range(n):
        await sig.send({"type": "stats", "sample": {**BIG_SAMPLE, "fps": i}})
        await sig.send({"type": "chat", "text": "y" * 2000})
        await sig.send_raw("{not json")
        await sig.send({"type": "dance"})
        await sig.send({"type": "ice_state", "state": "connected", "rtt_ms": i})
        await sig.send({"type": "ice_restart"})


async def reconnect_and_flood(
    client, room_id: str, token: str, loops: int, seen: list[SignalingClient]
) -> None:
    for _ in range(loops):
        sig = await hello(client, room_id, token)
        seen.append(sig)
        await flood(sig, 5)
        await sig.close()


async def test_one_call_link_cannot_store_more_than_its_budget(aiohttp_client, settings, clinic, monkeypatch):
    told: list[str | None] = []
    send = Connection.send

    def spy(conn: Connection, message: dict) -> bool:
        if message.get("code") == "over_budget":
            told.append(conn.role)
        return send(conn, message)

    monkeypatch.setattr(Connection, "send", spy)
    client = await aiohttp_client(create_app(settings))
    keyed = keyed_settings(settings.data_dir)
    policy = client.app[POLICY]
    policy.seat_budget, policy.room_budget = SEAT, ROOM
    visit = seed_visit(settings, doctor_id=clinic.doctor_ids[0], patient_id=clinic.patient_id)
    room, guest_token, doctor_token = visit.public_id, patient_token(keyed, visit), host_token(keyed, visit)
    guests: list[SignalingClient] = []

    # Waiting room: nothing but its own events.
    guest = await hello(client, room, guest_token)
    guests.append(guest)
    await flood(guest)
    await reconnect_and_flood(client, room, guest_token, 10, guests)
    await client.app[SIGNALING].events.flush()
    waiting = {
        name
        for (name,) in query(
            settings, "SELECT name FROM session_events WHERE visit_id = ? AND role = 'guest'", [visit.id]
        )
    }
    # ("ready": the client says `join` once per connection, as a patient pressing Join.)
    assert waiting <= {"joined", "left", "waiting", "reconnect", "replaced", "ready"}, waiting

    # Strangers with bad tokens.
    for _ in range(30):
        sig = SignalingClient(await client.ws_connect(f"/ws/rooms/{room}"))
        with pytest.raises(ErrorReply):
            await sig.hello(guest_token[:-4] + "AAAA")

    # Admitted, and the host floods too.
    host = await hello(client, room, doctor_token)
    guest = await hello(client, room, guest_token)
    guests.append(guest)
    await host.send({"type": "admit"})
    # The guest's seat spent its bucket flooding above: the `join` its hello sent goes through
    # only if 50 ms (one message at 20 a second) passed since, which the strangers' rejections
    # above need not take. The call page sends `join` again after a rate_limited error; so does
    # this client, until the clock starts.
    for _ in range(40):
        try:
            await guest.next_message("clock", timeout=0.25)
            break
        except TimeoutError:
            await guest.send({"type": "join"})
    else:
        raise AssertionError("the clock never started")
    await flood(guest)
    await flood(host)
    await reconnect_and_flood(client, room, guest_token, 10, guests)
    guest = await hello(client, room, guest_token)
    guests.append(guest)
    await flood(guest)

    # The call still works: an offer and an answer are relayed both ways (once the seats'
    # rate limits have refilled a little: 20 messages a second).
    # The last guest's `join` went out with a spent bucket and was dropped: a client sends it
    # again (it is idempotent), as the call page does after a rate_limited error.
    # The join and the host's offer travel on two sockets: offer until the room relays it.
    await asyncio.sleep(1)
    await guest.send({"type": "join"})
    offer = {"type": "signal", "data": {"description": {"type": "offer", "sdp": "v=0 offer"}}}
    for _ in range(20):
        await host.send(offer)
        try:
            relayed = await guest.next_message("signal", timeout=0.5)
            break
        except TimeoutError:
            continue
    assert relayed["data"]["description"]["type"] == "offer"
    await guest.send({"type": "signal", "data": {"description": {"type": "answer", "sdp": "v=0 answer"}}})
    assert (await host.next_message("signal", timeout=10))["data"]["description"]["type"] == "answer"
    await host.send({"type": "chat", "text": "still there?"})
    assert (await guest.next_message("chat", timeout=10))["text"] == "still there?"
    await client.app[SIGNALING].events.flush()

    used = stored(settings, visit.id)
    total = total_bytes(settings, visit.id)
    print(f"stored per seat (rows, bytes): {used}; visit total {total} bytes")
    for seat, budget in (("guest", SEAT), ("host", SEAT), ("", ROOM)):
        rows, size = used.get(seat, (0, 0))
        assert rows <= budget.rows and size <= budget.bytes, (seat, rows, size)
    assert used["guest"][1] > SEAT.bytes / 2  # the flood did reach the budget
    assert total <= 2 * SEAT.bytes + ROOM.bytes + 2048  # + the few events always stored
    # The database's own count agrees, and the drops were counted.
    budgets = dict(
        (seat, (rows, size, dropped))
        for seat, rows, size, dropped in query(
            settings, "SELECT seat, rows, bytes, dropped FROM session_budgets WHERE visit_id = ?", [visit.id]
        )
    )
    assert budgets["guest"][:2] == used["guest"] and budgets["guest"][2] > 0
    # Told once per seat that the budget is used up, not once per message or connection.
    assert sorted(told, key=str) == ["guest", "host"], told
    registry = client.app[METRICS].registry
    assert (registry.get_sample_value("consult_room_events_dropped_total") or 0) > 0
    reason = {"reason": "over_budget"}
    assert (registry.get_sample_value("consult_signaling_messages_dropped_total", reason) or 0) > 0


async def test_a_legitimate_call_still_records_its_samples(aiohttp_client, settings, clinic):
    client = await aiohttp_client(create_app(settings))
    keyed = keyed_settings(settings.data_dir)
    visit = seed_visit(settings, doctor_id=clinic.doctor_ids[0], patient_id=clinic.patient_id)
    guest = await hello(client, visit.public_id, patient_token(keyed, visit))
    host = await hello(client, visit.public_id, host_token(keyed, visit))
    await host.send({"type": "admit"})
    await guest.next_message("clock")
    for sig in (guest, host):
        # What web/static/call-peer.js sends every 5 s.
        await sig.send(
            {
                "type": "stats",
                "sample": {
                    "bitrate_kbps": 900,
                    "loss_pct": 1,
                    "jitter_ms": 12,
                    "framesPerSecond": 24,
                    "frameWidth": 640,
                    "frameHeight": 480,
                    "freezeCount": 0,
                    "framesDecoded": 99,
                    "rtt_ms": 35,
                    "packetsLost": 2,
                },
            }
        )
        await sig.send({"type": "ice_state", "state": "connected", "pair_type": "relay", "rtt_ms": 35})
    await guest.send({"type": "chat", "text": "hello doctor"})
    await host.next_message("chat")
    await client.app[SIGNALING].events.flush()
    samples = query(
        settings,
        "SELECT role, fps, width, rtt_ms FROM quality_samples WHERE visit_id = ? ORDER BY role",
        [visit.id],
    )
    assert samples == [("doctor", 24, 640, 35), ("patient", 24, 640, 35)]
    names = [n for (n,) in query(settings, "SELECT name FROM session_events WHERE visit_id = ?", [visit.id])]
    assert names.count("stats") == 2 and names.count("ice_state") == 2 and "chat" in names
    (used_turn,) = query(settings, "SELECT used_turn FROM session_summaries WHERE visit_id = ?", [visit.id])[
        0
    ]
    assert used_turn == 1
    data = json.loads(
        query(settings, "SELECT data FROM session_events WHERE visit_id = ? AND name = 'stats'", [visit.id])[
            0
        ][0]
    )
    assert "framesDecoded" not in data["sample"] and data["sample"]["framesPerSecond"] == 24
