"""Visits close themselves: a room's end, its session summary and the visit's status are one
write; the sweep closes rooms a dead server left open; an early open leaves no session.

In-process tests drive the real app (ConsultPolicy, the signaling server, the sweeper job) with
the protocol's Python client; `test_kill9_*` runs the real server process and SIGKILLs it.
"""

from __future__ import annotations

import asyncio
import errno
import json
import time
from typing import Any

import aiohttp
import pytest

from consult import booking
from consult.app import create_app
from consult.calls import closing
from consult.calls.policy import DOCTOR_EARLY_S, SIGNALING
from consult.core.engine import open_database
from signaling.client import ErrorReply, SignalingClient
from tests import db_helpers
from tests.booking_helpers import make_clinic
from tests.call_helpers import host_token, keyed_settings, patient_token, seed_visit
from tests.harness.server import ConsultServer, free_port
from tests.sessionlog_helpers import add_visit, make_world, record, write


def rows(path: Any, sql: str, params=()) -> list[dict]:
    return db_helpers.rows(path, sql, params)


def state(path: Any, visit_id: int) -> dict:
    """Everything that must agree about one visit's end."""
    visit = rows(path, "SELECT status FROM visits WHERE id = ?", [visit_id])[0]
    room = rows(path, "SELECT started_at, ended_at, end_reason FROM rooms WHERE visit_id = ?", [visit_id])
    ended = rows(
        path, "SELECT created, data FROM session_events WHERE visit_id = ? AND name = 'ended'", [visit_id]
    )
    summary = rows(
        path, "SELECT outcome, end_reason, ended_at FROM session_summaries WHERE visit_id = ?", [visit_id]
    )
    return {
        "status": visit["status"],
        "room": room[0] if room else None,
        "ended_events": [json.loads(e["data"])["reason"] for e in ended],
        "summary": summary[0] if summary else None,
    }


def assert_consistent(path: Any, visit_id: int) -> dict:
    """Either the room's end is written whole (room row, one event, summary, status) or not at all."""
    s = state(path, visit_id)
    room_ended = s["room"] is not None and s["room"]["ended_at"] is not None
    if room_ended:
        assert s["status"] == "completed", s
        assert s["ended_events"] == [s["room"]["end_reason"]], s
        assert s["summary"] is not None and s["summary"]["outcome"] != "in_progress", s
        assert s["summary"]["ended_at"] is not None, s
    else:
        assert s["status"] == "confirmed", s
        assert s["ended_events"] == [], s
        assert s["summary"] is None or s["summary"]["ended_at"] is None, s
    return s


# -- one write ------------------------------------------------------------------------------


@pytest.fixture
def world(settings, make_user):
    return make_world(settings, make_user)


def started_room(db, world, *, starts_at: int, started_at: float, last_event: float) -> int:
    """A visit whose room a dead server left running: both joined, clock started, stats."""
    visit_id, _ = add_visit(db, world, starts_at)
    db.execute(
        "INSERT INTO rooms (visit_id, started_at, updated) VALUES (?, ?, ?)",
        [visit_id, started_at, started_at],
    )
    record(
        db,
        visit_id,
        [
            ("room_opened", None, started_at - 20, {}),
            ("joined", "guest", started_at - 10, {}),
            ("joined", "host", started_at - 5, {}),
            ("clock_started", None, started_at, {"started_at": started_at}),
            ("stats", "guest", last_event, {"sample": {"fps": 24}}),
        ],
    )
    return visit_id


def test_a_failure_anywhere_in_the_end_leaves_nothing_half_written(world, monkeypatch):
    now = time.time()
    visit_id = write(
        world.settings,
        lambda db: started_room(
            db, world, starts_at=int(now - 3600), started_at=now - 3500, last_event=now - 3000
        ),
    )
    db = open_database(world.settings)
    try:

        def broken(*_a, **_k):
            raise OSError(errno.EIO, "disk I/O error")  # the last part of the end fails

        monkeypatch.setattr(booking, "complete_sync", broken)
        with pytest.raises(OSError, match="disk I/O error"):
            db.write_sync(lambda d: closing.end_room_sync(d, visit_id, "host_ended", now - 3000, now=now))
        s = assert_consistent(world.settings, visit_id)
        assert s["room"]["ended_at"] is None and s["summary"]["outcome"] == "in_progress"

        monkeypatch.undo()
        assert db.write_sync(lambda d: closing.end_room_sync(d, visit_id, "host_ended", now - 3000, now=now))
        s = assert_consistent(world.settings, visit_id)
        assert s["room"]["end_reason"] == "host_ended" and s["summary"]["end_reason"] == "host_ended"
        # Again (the "ended" event after save_state, a second sweep): nothing changes.
        assert db.write_sync(lambda d: closing.end_room_sync(d, visit_id, "time_limit", now, now=now)) is None
        assert state(world.settings, visit_id) == s
    finally:
        db.close()


# -- the sweep ------------------------------------------------------------------------------


def seed_sweep_cases(world, now: float) -> dict[str, int]:
    def fn(db) -> dict[str, int]:
        ids: dict[str, int] = {}
        # Started 40 min ago, a 15-minute clock: ran out while no server watched it.
        ids["crashed"] = started_room(
            db, world, starts_at=int(now - 2700), started_at=now - 2400, last_event=now - 2000
        )
        # The same, but this process holds the room (its own timer ends it).
        ids["live"] = started_room(
            db, world, starts_at=int(now - 2760), started_at=now - 2400, last_event=now - 2000
        )
        # Restarted while its clock still runs: the visit continues if they come back.
        ids["running"] = started_room(
            db, world, starts_at=int(now - 300), started_at=now - 200, last_event=now - 100
        )
        # An older version ended the room, then died before the visit's write.
        legacy = started_room(
            db, world, starts_at=int(now - 7200), started_at=now - 7000, last_event=now - 6500
        )
        db.execute(
            "UPDATE rooms SET ended_at = ?, end_reason = 'host_ended' WHERE visit_id = ?",
            [now - 6400, legacy],
        )
        ids["legacy"] = legacy
        # The patient waited, nobody admitted them, the window closed.
        waited, _ = add_visit(db, world, int(now - 5400))
        record(db, waited, [("room_opened", None, now - 5400, {}), ("joined", "guest", now - 5390, {})])
        ids["waited"] = waited
        # Nobody came: a no-show, as today (the no-show job, not this sweep).
        ids["nobody"] = add_visit(db, world, int(now - 3600))[0]
        return ids

    return write(world.settings, fn)


def sweep(world, now: float, *, live=frozenset(), limit: int = 100) -> dict[str, int]:
    return write(
        world.settings,
        lambda db: closing.sweep_sync(db, now, live=live, length_s=lambda _m: 900.0, limit=limit),
    )


def test_the_sweep_closes_what_nobody_will_end_once(world):
    now = time.time()
    ids = seed_sweep_cases(world, now)
    live_id = rows(world.settings, "SELECT public_id FROM visits WHERE id = ?", [ids["live"]])[0]["public_id"]

    assert sweep(world, now, live={live_id}) == {"server_restart": 1, "host_ended": 1, "time_limit": 1}
    assert sweep(world, now, live={live_id}) == {}  # idempotent
    assert sweep(world, now + 1, live={live_id}) == {}

    crashed = assert_consistent(world.settings, ids["crashed"])
    assert crashed["room"]["end_reason"] == "server_restart" == crashed["summary"]["end_reason"]
    assert crashed["summary"]["outcome"] == "failed"
    # It ended, as far as anyone can tell, at its last event: connected time stops there.
    assert crashed["room"]["ended_at"] == pytest.approx(now - 2000)
    connected = rows(
        world.settings, "SELECT connected_seconds FROM session_summaries WHERE visit_id = ?", [ids["crashed"]]
    )
    assert connected[0]["connected_seconds"] == 400

    legacy = assert_consistent(world.settings, ids["legacy"])
    assert legacy["ended_events"] == ["host_ended"] and legacy["room"]["ended_at"] == pytest.approx(
        now - 6400
    )
    waited = assert_consistent(world.settings, ids["waited"])
    assert waited["room"]["end_reason"] == "time_limit" and waited["summary"]["outcome"] == "failed"

    for untouched in ("live", "running"):
        s = assert_consistent(world.settings, ids[untouched])
        assert s["status"] == "confirmed" and s["summary"]["outcome"] == "in_progress", untouched
    nobody = assert_consistent(world.settings, ids["nobody"])
    assert nobody["room"] is None and nobody["summary"] is None  # left to mark_no_shows_sync

    # Once the process no longer holds the room, the next run closes it.
    assert sweep(world, now + 2) == {"server_restart": 1}
    # The running visit closes once its clock has run out, not before.
    assert sweep(world, now + 699) == {}
    assert sweep(world, now + 701) == {"server_restart": 1}


def test_the_sweep_does_bounded_work_per_run(world):
    now = time.time()
    seed_sweep_cases(world, now)
    runs = []
    while (closed := sweep(world, now, limit=1)) and len(runs) < 10:
        runs.append(closed)
    assert [sum(r.values()) for r in runs] == [1, 1, 1, 1]


# -- the app: live ends, early opens, the start-up sweep ----------------------------------------


@pytest.fixture
def clinic(settings, make_user):
    c = make_clinic(settings, make_user, doctors=1)
    c.patient_id = make_user("patient", login="13900000001", name="Pat Ient")
    return c


async def hello(client, room_id: str, token: str) -> SignalingClient:
    sig = SignalingClient(await client.ws_connect(f"/ws/rooms/{room_id}"))
    await sig.hello(token)
    return sig


async def test_a_room_ended_by_the_doctor_is_written_once_and_whole(aiohttp_client, settings, clinic):
    client = await aiohttp_client(create_app(settings))
    keyed = keyed_settings(settings.data_dir)
    path = settings
    visit = seed_visit(path, doctor_id=clinic.doctor_ids[0], patient_id=clinic.patient_id)
    guest = await hello(client, visit.public_id, patient_token(keyed, visit))
    host = await hello(client, visit.public_id, host_token(keyed, visit))
    await host.send({"type": "admit"})
    await guest.next_message("clock")
    await host.send({"type": "end"})
    await guest.next_message("ended")
    # Before the events are delivered, the end is already written whole (by save_state).
    s = assert_consistent(path, visit.id)
    assert s["ended_events"] == ["host_ended"] and s["summary"]["outcome"] == "completed"
    await client.app[SIGNALING].events.flush()
    assert state(path, visit.id) == s  # the "ended" event added nothing


@pytest.mark.locale("en")  # asserts an English text
async def test_an_early_open_creates_no_session(aiohttp_client, settings, clinic):
    client = await aiohttp_client(create_app(settings))
    keyed = keyed_settings(settings.data_dir)
    path = settings
    visit = seed_visit(
        path, doctor_id=clinic.doctor_ids[0], patient_id=clinic.patient_id, starts_in_s=2 * 3600
    )
    messages = []
    for token in (host_token(keyed, visit), patient_token(keyed, visit)):
        sig = SignalingClient(await client.ws_connect(f"/ws/rooms/{visit.public_id}"))
        with pytest.raises(ErrorReply) as exc:
            await sig.hello(token)
        assert exc.value.code == "too_early"
        assert await sig.wait_closed() == 4003
        messages.append(exc.value.message["message"])
    assert "opens 30 minutes before" in messages[0]
    await client.app[SIGNALING].events.flush()
    assert rows(path, "SELECT * FROM session_summaries WHERE visit_id = ?", [visit.id]) == []
    assert rows(path, "SELECT * FROM rooms WHERE visit_id = ?", [visit.id]) == []
    # The refusals are in the raw log; no room was opened.
    names = [r["name"] for r in rows(path, "SELECT name FROM session_events WHERE visit_id = ?", [visit.id])]
    assert names == ["error", "error"]
    assert visit.public_id not in client.app[SIGNALING].live_rooms()

    # Within the doctor's early window the room opens (and that is a session).
    soon = seed_visit(
        path, doctor_id=clinic.doctor_ids[0], patient_id=clinic.patient_id, starts_in_s=DOCTOR_EARLY_S - 120
    )
    host = await hello(client, soon.public_id, host_token(keyed, soon))
    assert host.welcome["role"] == "host"
    await client.app[SIGNALING].events.flush()
    assert rows(path, "SELECT outcome FROM session_summaries WHERE visit_id = ?", [soon.id]) == [
        {"outcome": "in_progress"}
    ]


def left_running(path: Any, visit_id: int, started_at: float) -> None:
    """What a server killed mid-visit leaves: both joined, the clock started, no end."""

    def fn(db) -> None:
        db.execute(
            "INSERT INTO rooms (visit_id, started_at, updated) VALUES (?, ?, ?)",
            [visit_id, started_at, started_at],
        )
        record(
            db,
            visit_id,
            [
                ("joined", "guest", started_at - 10, {}),
                ("joined", "host", started_at - 5, {}),
                ("clock_started", None, started_at, {"started_at": started_at}),
            ],
        )

    write(path, fn)


async def test_the_start_up_sweep_closes_before_anyone_can_join(aiohttp_client, settings, clinic):
    path = settings
    visit = seed_visit(path, doctor_id=clinic.doctor_ids[0], patient_id=clinic.patient_id, starts_in_s=-3600)
    left_running(path, visit.id, visit.starts_at + 30)
    client = await aiohttp_client(create_app(settings))  # started: the sweep has run
    s = assert_consistent(path, visit.id)
    assert s["room"]["end_reason"] == "server_restart"
    assert s["room"]["ended_at"] == pytest.approx(visit.starts_at + 30)  # its last event
    assert (s["summary"]["outcome"], s["summary"]["end_reason"]) == ("failed", "server_restart")
    keyed = keyed_settings(settings.data_dir)
    sig = SignalingClient(await client.ws_connect(f"/ws/rooms/{visit.public_id}"))
    with pytest.raises(ErrorReply) as exc:
        await sig.hello(host_token(keyed, visit))
    assert exc.value.code == "room_ended"


async def test_the_session_log_shows_the_new_reason(aiohttp_client, settings, clinic):
    from tests.conftest import login

    path = settings
    visit = seed_visit(path, doctor_id=clinic.doctor_ids[0], patient_id=clinic.patient_id, starts_in_s=-3600)
    left_running(path, visit.id, visit.starts_at + 30)
    client = await aiohttp_client(create_app(settings))
    await login(client, "boss")
    for lang, label in (("en", "Server restarted"), ("zh-CN", "服务器重启")):
        page = await client.get(f"/admin/sessions/{visit.public_id}", headers={"Accept-Language": lang})
        assert page.status == 200
        text = await page.text()
        assert label in text, lang
    listed = await (await client.get("/admin/sessions?end_reason=server_restart")).text()
    assert "Pat Ient" in listed
    others = await (await client.get("/admin/sessions?end_reason=host_ended")).text()
    assert "Pat Ient" not in others


# -- the real server, killed ----------------------------------------------------------------

VISIT_S = 12.0  # every visit's clock, so that "past its end" is seconds away


def ws_url(server, visit) -> str:
    return server.url(f"/ws/rooms/{visit.public_id}").replace("http", "ws", 1)


SOCKETS: list[SignalingClient] = []


async def connect(session: aiohttp.ClientSession, server, visit) -> SignalingClient:
    sig = await SignalingClient.connect(session, ws_url(server, visit))
    SOCKETS.append(sig)  # a killed server does not close them: the test does
    return sig


async def open_room(session: aiohttp.ClientSession, server, keyed, visit) -> tuple[SignalingClient, ...]:
    """Patient and doctor join, the doctor admits: the clock runs."""
    guest = await connect(session, server, visit)
    await guest.hello(patient_token(keyed, visit))
    host = await connect(session, server, visit)
    await host.hello(host_token(keyed, visit))
    if not guest.welcome["admitted"]:
        await host.send({"type": "admit"})
    clock = await guest.next_message("clock")
    return guest, host, clock


async def test_kill9_at_any_point_leaves_every_visit_closed_or_continuing(tmp_path):
    server = ConsultServer(
        tmp_path / "data",
        log_dir=tmp_path,
        host="127.0.0.1",
        port=free_port("127.0.0.1"),
        env={"CONSULT_VISIT_SECONDS_OVERRIDE": str(VISIT_S), "CONSULT_REAPER_INTERVAL_SECONDS": "0.5"},
    )
    await asyncio.to_thread(server.init, demo=True)
    await server.astart()
    path = server.data_dir / "consult.db"
    keyed = keyed_settings(server.data_dir)
    async with aiohttp.ClientSession() as session:
        try:
            abandoned, resumed, ending, told = (seed_visit(path, starts_in_s=-60 - i) for i in range(4))
            # Four rooms running. The doctor ends one and the server dies as the patient hears
            # it (the old crash window: room ended, visit not yet); the doctor ends another
            # and the server dies at that instant.
            await open_room(session, server, keyed, abandoned)
            _, _, first_clock = await open_room(session, server, keyed, resumed)
            _, ending_host, _ = await open_room(session, server, keyed, ending)
            told_guest, told_host, _ = await open_room(session, server, keyed, told)
            await told_host.send({"type": "end"})
            await told_guest.next_message("ended")
            await ending_host.send({"type": "end"})
            await server.akill9()
            for visit in (abandoned, resumed, ending, told):
                assert_consistent(path, visit.id)  # whatever the instant, nothing half-written
            assert state(path, told.id)["ended_events"] == ["host_ended"]
            await server.astart()

            # Both come back while the clock runs: the visit continues where it was.
            guest, _host, clock = await open_room(session, server, keyed, resumed)
            assert guest.welcome["admitted"] is True
            assert clock["ends_at"] == pytest.approx(first_clock["ends_at"])
            assert (await guest.next_message("ended", timeout=VISIT_S + 5))["reason"] == "time_limit"

            # Nobody came back to the other two: closed by the periodic sweep once over.
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                states = [state(path, v.id) for v in (abandoned, ending)]
                if all(s["status"] == "completed" for s in states):
                    break
                await asyncio.sleep(0.2)
            closed = {v.id: assert_consistent(path, v.id) for v in (abandoned, resumed, ending)}
            assert closed[abandoned.id]["ended_events"] == ["server_restart"]
            assert closed[abandoned.id]["summary"]["outcome"] == "failed"
            assert closed[resumed.id]["ended_events"] == ["time_limit"]
            # Ended before the kill, or open at it and then swept: either way whole.
            assert closed[ending.id]["ended_events"] in (["host_ended"], ["server_restart"])
            print("ended by the doctor, killed at once:", closed[ending.id]["ended_events"])

            # Killed mid-visit and down past its end: closed before the server answers anyone.
            late = seed_visit(path, starts_in_s=-70)
            await open_room(session, server, keyed, late)
            await server.akill9()
            assert assert_consistent(path, late.id)["status"] == "confirmed"
            await asyncio.sleep(VISIT_S + 1)
            await server.astart()
            s = assert_consistent(path, late.id)
            assert s["ended_events"] == ["server_restart"] and s["status"] == "completed"
            sig = await connect(session, server, late)
            with pytest.raises(ErrorReply) as exc:
                await sig.hello(host_token(keyed, late))
            assert exc.value.code == "room_ended"
        finally:
            for sig in SOCKETS:
                await sig.close()
            SOCKETS.clear()
            await server.astop()
