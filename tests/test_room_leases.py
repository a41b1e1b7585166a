"""Rooms owned by one node at a time (consult.calls.leases), on either engine.

Two `ConsultPolicy` objects on one database stand for two nodes: one claims a room when it
admits someone; the other may not take it while that lease is renewed, waits for it to lapse
(a dead node), or takes it at once after a graceful release. The room sweeper leaves a room
whose lease another node renews to that node, even when its clock says the visit is over.
"""

from __future__ import annotations

import asyncio
import secrets
import time

import pytest

from consult.calls import closing, leases
from consult.calls.policy import ConsultPolicy, make_host_token
from consult.core.i18n import set_locale
from signaling import PeerInfo, Refused
from tests.booking_helpers import make_clinic


@pytest.fixture
def visit(settings, make_user, database):
    clinic = make_clinic(settings, make_user)
    patient = make_user("patient", login="13900000042")
    now = time.time()

    def write(d):
        public_id = secrets.token_urlsafe(12)
        visit_id = d.execute(
            "INSERT INTO visits (public_id, patient_id, doctor_id, department_id, starts_at, ends_at, status,"
            " fee_minor, currency, created, updated, call_nonce)"
            " VALUES (?, ?, ?, ?, ?, ?, 'confirmed', 5000, 'CNY', ?, ?, ?) RETURNING id",
            [
                public_id,
                patient,
                clinic.doctor_ids[0],
                clinic.department_id,
                int(now - 60),
                int(now + 840),
                now,
                now,
                "n",
            ],
        ).fetchone()[0]
        return {"id": visit_id, "public_id": public_id, "doctor_id": clinic.doctor_ids[0]}

    return database.write_sync(write)


def node(settings, database, lease_s: float = 0.6) -> ConsultPolicy:
    policy = ConsultPolicy(settings)
    policy.db = database
    policy.lease_s = lease_s
    return policy


async def admit(policy: ConsultPolicy, settings, visit) -> None:
    token = make_host_token(settings, visit["public_id"], visit["doctor_id"], time.time())
    await policy.admit(visit["public_id"], token, PeerInfo(remote="127.0.0.1", user_agent="test"))


async def holder(database, visit) -> str:
    return (await database.query_one("SELECT node FROM rooms WHERE visit_id = ?", [visit["id"]]))[0]


def test_a_live_lease_is_kept_and_a_lapsed_one_is_taken(database, visit):
    now = time.time()
    claim = leases.claim_sync
    assert database.write_sync(lambda d: claim(d, visit["id"], "a", now, 3.0)) == "a"
    assert database.write_sync(lambda d: claim(d, visit["id"], "b", now + 1, 3.0)) == "a"
    assert (
        database.write_sync(lambda d: claim(d, visit["id"], "a", now + 2, 3.0)) == "a"
    )  # renewed by a claim
    assert database.write_sync(lambda d: claim(d, visit["id"], "b", now + 4, 3.0)) == "a"  # until now + 5
    assert database.write_sync(lambda d: claim(d, visit["id"], "b", now + 5.5, 3.0)) == "b"


async def test_a_second_node_waits_for_a_dead_nodes_lease_and_then_takes_the_room(settings, database, visit):
    a, b = node(settings, database), node(settings, database)
    await admit(a, settings, visit)
    assert await holder(database, visit) == a.node
    # a keeps renewing: b waits its lease and more, and is refused with a clear code.
    started = time.monotonic()
    renewing = True

    async def keep_renewing():
        while renewing:
            await a.renew_leases(frozenset({visit["public_id"]}))
            await asyncio.sleep(0.1)

    set_locale("zh_CN")  # as the signaling server does for the connecting page
    task = asyncio.create_task(keep_renewing())
    try:
        with pytest.raises(Refused) as refused:
            await admit(b, settings, visit)
    finally:
        renewing = False
        await task
    assert refused.value.code == "room_elsewhere"
    assert "另一台服务器" in refused.value.message  # zh_CN, what the page shows
    assert time.monotonic() - started >= b.lease_s
    # a dies (stops renewing): b takes the room over within a lease.
    started = time.monotonic()
    await admit(b, settings, visit)
    assert await holder(database, visit) == b.node
    assert time.monotonic() - started < b.lease_s + 1.5


async def test_a_graceful_stop_hands_the_room_over_at_once(settings, database, visit):
    a, b = node(settings, database, lease_s=30), node(settings, database, lease_s=30)
    await admit(a, settings, visit)
    assert database.write_sync(lambda d: leases.release_sync(d, a.node)) == 1
    started = time.monotonic()
    await admit(b, settings, visit)
    assert time.monotonic() - started < 2
    assert await holder(database, visit) == b.node


def test_the_sweep_leaves_a_room_alive_on_another_node_to_that_node(database, visit):
    now = time.time()

    def started_long_ago(d):
        d.execute("UPDATE rooms SET started_at = ? WHERE visit_id = ?", [now - 2000, visit["id"]])

    database.write_sync(lambda d: leases.claim_sync(d, visit["id"], "other-node", now, 3.0))
    database.write_sync(started_long_ago)

    def sweep(at: float):
        return database.write_sync(
            lambda d: closing.sweep_sync(d, at, live=frozenset(), length_s=lambda _m: 900.0, node="me")
        )

    assert sweep(now) == {}  # its clock ran out, but other-node renews its lease: its timer ends it
    row = database.read_sync(
        lambda d: d.execute("SELECT ended_at FROM rooms WHERE visit_id = ?", [visit["id"]]).fetchone()
    )
    assert row[0] is None
    assert sweep(now + 10) == {closing.SERVER_RESTART: 1}  # the lease lapsed: that node is gone


async def test_many_rooms_leases_are_renewed_with_the_loop_let_run_between_lookups(settings, database, visit):
    # 1,200 rooms held by one node: one renewal extends every lease (a room listed twice, as
    # while it opens, counts once); looking their visit ids up lets the loop run between steps
    # (9,950 rooms looked up in one step held it 8-13 ms every second).
    a = node(settings, database, lease_s=30)
    now = time.time()

    def write(d):
        patient, department = d.execute(
            "SELECT patient_id, department_id FROM visits WHERE id = ?", [visit["id"]]
        ).fetchone()
        rooms, ids = [], []
        for i in range(1200):
            starts = int(now) + 900 * (i + 1)  # the doctor's next 1,200 quarter hours
            rooms.append(f"many{i:05d}")
            ids.append(
                d.execute(
                    "INSERT INTO visits (public_id, patient_id, doctor_id, department_id, starts_at, ends_at,"
                    " status, fee_minor, currency, created, updated, call_nonce)"
                    " VALUES (?, ?, ?, ?, ?, ?, 'confirmed', 5000, 'CNY', ?, ?, ?) RETURNING id",
                    [
                        rooms[-1],
                        patient,
                        visit["doctor_id"],
                        department,
                        starts,
                        starts + 900,
                        now,
                        now,
                        f"n{i}",
                    ],
                ).fetchone()[0]
            )
        for visit_id in ids:
            assert leases.claim_sync(d, visit_id, a.node, now, 1.0) == a.node
        return rooms, ids

    rooms, visit_ids = database.write_sync(write)
    assert await a.renew_leases([*rooms, rooms[0]]) == 1200  # the first: ids read from the database
    ticks = 0
    done = False

    async def ticker():
        nonlocal ticks
        while not done:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    ids, missing = await a._known_visit_ids([*rooms, "no-such-room"])
    done = True
    await task
    assert sorted(ids) == sorted(visit_ids) and missing == ["no-such-room"]
    assert ticks >= 2  # 1,201 ids in steps of 500: the loop ran twice in between
    assert await a.renew_leases(rooms) == 1200  # the second: all known
    renewed = await database.query_one(
        "SELECT count(*) FROM rooms WHERE node = ? AND lease_until > ?", [a.node, now + 20]
    )
    assert renewed[0] == 1200  # claimed for 1 s, now held for the policy's 30
