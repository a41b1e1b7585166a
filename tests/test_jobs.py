"""Durable jobs: refunds and messages survive a crash, money never moves twice.

A "crash" here is the worker never having run: the facts and their jobs are written straight to
the data directory (as the killed process left them), then a new app on the same directory must
finish them. The test gateway (``Gateway``) stands for the provider's side, which survives our
crashes; it counts every payout and, unlike the simulator, does not refuse a repeated refund
number, so only our own status query keeps money from moving twice.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time

import pytest
from aiohttp import web

from consult import booking, payments
from consult.app import create_app
from consult.booking import holds, notices
from consult.core import jobs, keys, metrics
from consult.core.db import Database
from consult.core.outbox import OutboxNotifier
from consult.payments.gateway import PAYMENTS, RefundStatus
from consult.payments.simulator import REFUND_LEDGER, SimulatorProvider, read_ledger
from tests.test_reports import PATIENT, build_world, sign_in

pytestmark = pytest.mark.locale("en")  # asserts the English texts of messages and pages


class Gateway:
    """The provider's side: its records outlive our process."""

    def __init__(self) -> None:
        self.paid_out: dict[str, list[str]] = {}  # refund id -> every payout made for it
        self.refund_calls = 0
        self.status_calls = 0
        self.failing = False
        self.wait_for_peer = False  # each refund waits until another is in flight too
        self.inside = 0
        self.max_inside = 0
        self.delay = 0.0

    @property
    def payouts(self) -> int:
        return sum(len(v) for v in self.paid_out.values())


class CountingProvider(SimulatorProvider):
    def __init__(self, gateway: Gateway) -> None:
        super().__init__()
        self.gw = gateway

    async def refund(self, app, payment, amount_minor, refund_id):
        gw = self.gw
        gw.refund_calls += 1
        gw.inside += 1
        gw.max_inside = max(gw.max_inside, gw.inside)
        try:
            if gw.wait_for_peer:
                deadline = time.monotonic() + 3
                while gw.max_inside < 2:
                    if time.monotonic() > deadline:
                        raise RuntimeError("refunds ran one at a time")
                    await asyncio.sleep(0.01)
            await asyncio.sleep(gw.delay)
            if gw.failing:
                raise RuntimeError("gateway down")
            ref = f"T{gw.payouts + 1}"
            gw.paid_out.setdefault(refund_id, []).append(ref)
            return ref
        finally:
            gw.inside -= 1

    async def refund_status(self, app, payment, refund_id):
        self.gw.status_calls += 1
        refs = self.gw.paid_out.get(refund_id)
        return RefundStatus("refunded", refs[0], payment.amount_minor) if refs else RefundStatus("none")


@pytest.fixture
def gateway(monkeypatch) -> Gateway:
    gw = Gateway()
    real = payments.make_state

    def make_state(fulfilment):
        state = real(fulfilment)
        state.providers["simulator"] = CountingProvider(gw)
        return state

    monkeypatch.setattr(payments, "make_state", make_state)
    return gw


@pytest.fixture
def settings(make_settings):
    return make_settings(job_poll_seconds=0.05, reaper_interval_seconds=0.2)


@pytest.fixture
def world(settings, make_user):
    w = build_world(None, settings, make_user)
    yield w
    w.db.close()


# -- building the facts, as the killed process wrote them ---------------------------------------


def held_visit(db: Database, patient_id: int, doctor_id: int, starts: int) -> int:
    now = time.time()
    return db.write_sync(
        lambda d: d.execute(
            "INSERT INTO visits (public_id, patient_id, doctor_id, department_id, starts_at, ends_at,"
            " status, hold_expires, fee_minor, currency, created, updated, call_nonce)"
            " VALUES (?, ?, ?, 1, ?, ?, 'held', ?, 5000, 'CNY', ?, ?, 'n') RETURNING id",
            [secrets.token_urlsafe(9), patient_id, doctor_id, starts, starts + 900, now + 900, now, now],
        ).fetchone()[0]
    )


def lose_slot(db: Database, visit_id: int, taker_id: int) -> None:
    """The hold lapsed and someone else booked the same slot before the money arrived."""

    def write(d) -> None:
        v = d.execute("SELECT * FROM visits WHERE id = ?", [visit_id]).fetchone()
        d.execute(
            "UPDATE visits SET status = 'expired', hold_expires = ? WHERE id = ?", [time.time() - 1, visit_id]
        )
        d.execute(
            "INSERT INTO visits (public_id, patient_id, doctor_id, department_id, starts_at, ends_at,"
            " status, fee_minor, currency, created, updated, call_nonce)"
            " VALUES (?, ?, ?, 1, ?, ?, 'confirmed', 5000, 'CNY', 0, 0, 'n')",
            [secrets.token_urlsafe(9), taker_id, v["doctor_id"], v["starts_at"], v["ends_at"]],
        )

    db.write_sync(write)


def pay_sync(d, visit_id: int) -> int:
    """The gateway's notice is applied: the payment's own transaction, nothing after it."""
    pending = start_payment_sync(d, visit_id)
    payments.mark_paid_sync(d, pending, now=time.time(), fulfilment=booking.VisitFulfilment())
    return pending


def start_payment_sync(d, visit_id: int) -> int:
    return payments.create_payment_sync(d, visit_id, "simulator", now=time.time(), default_currency="CNY").id


def lost_slot_payment(world, starts_in: float) -> int:
    visit = held_visit(world.db, world.other_patient_id, world.doctor_id, int(time.time() + starts_in))
    pending = world.db.write_sync(lambda d: start_payment_sync(d, visit))
    lose_slot(world.db, visit, world.patient_id)
    world.db.write_sync(
        lambda d: payments.mark_paid_sync(d, pending, now=time.time(), fulfilment=booking.VisitFulfilment())
    )
    return pending


def job_rows(db: Database) -> list[dict]:
    return db.read_sync(lambda d: [dict(r) for r in d.execute("SELECT * FROM jobs ORDER BY id")])


def payment(db: Database, payment_id: int) -> dict:
    return db.read_sync(
        lambda d: dict(d.execute("SELECT * FROM payments WHERE id = ?", [payment_id]).fetchone())
    )


def payment_events(db: Database, payment_id: int, kind: str) -> list[dict]:
    return db.read_sync(
        lambda d: [
            {**dict(r), "detail": json.loads(r["detail"])}
            for r in d.execute(
                "SELECT * FROM payment_events WHERE payment_id = ? AND kind = ? ORDER BY id",
                [payment_id, kind],
            )
        ]
    )


def outbox(db: Database) -> list[dict]:
    return db.read_sync(lambda d: [dict(r) for r in d.execute("SELECT * FROM outbox ORDER BY id")])


async def wait_for(predicate, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


# -- the tests ----------------------------------------------------------------------------------


async def test_the_payment_commits_its_message_and_refund_and_a_new_app_finishes_them(
    aiohttp_client, settings, world
):
    db = world.db
    confirmed = db.write_sync(lambda d: pay_sync(d, world.visit_id))
    lost = lost_slot_payment(world, 3 * 86400)
    # Killed right after the commits: the jobs are there, nothing was sent or refunded.
    assert {(j["kind"], j["key"], j["status"]) for j in job_rows(db)} == {
        ("notify", f"visit:{world.visit_id}:confirmed", "queued"),
        ("refund", f"payment:{lost}", "queued"),
    }
    assert outbox(db) == []
    assert payment(db, confirmed)["status"] == payment(db, lost)["status"] == "paid"
    # A transaction that fails leaves no job behind either.
    third = held_visit(db, world.other_patient_id, world.other_doctor_id, int(time.time() + 4 * 86400))

    def pay_then_fail(d):
        pay_sync(d, third)
        raise RuntimeError("crash inside the transaction")

    with pytest.raises(RuntimeError):
        db.write_sync(pay_then_fail)
    assert len(job_rows(db)) == 2

    client = await aiohttp_client(create_app(settings))  # the restarted process
    await wait_for(lambda: payment(db, lost)["status"] == "refunded" and len(outbox(db)) == 1)
    assert outbox(db)[0]["recipient"] == PATIENT and outbox(db)[0]["subject"] == "Visit confirmed"
    assert payment(db, confirmed)["status"] == "paid"
    await wait_for(lambda: {j["status"] for j in job_rows(db)} == {"done"})
    registry = client.server.app[metrics.METRICS].registry
    await wait_for(
        lambda: registry.get_sample_value("consult_jobs_done_total") == 2
    )  # counted after the commit


@pytest.mark.parametrize("gateway_paid", [True, False])
async def test_a_refund_cut_off_mid_call_asks_the_provider_and_never_pays_twice(
    aiohttp_client, settings, world, gateway, gateway_paid
):
    db = world.db
    lost = lost_slot_payment(world, 3 * 86400)
    refund_id = payments.refund_id_for(payments.Payment.from_row(payment(db, lost)))
    # The old process claimed the job and asked the gateway, then died before recording the outcome.
    past = time.time() - 600

    def cut_off(d) -> None:
        assert jobs.claim_key_sync(d, "refund", payments.refund_key(lost), past, 60.0) is not None
        payments.record_event_sync(d, lost, "refund_requested", now=past, detail={"refund_id": refund_id})

    db.write_sync(cut_off)
    if gateway_paid:  # the money did go out before the kill
        gateway.paid_out[refund_id] = ["T-before-the-crash"]
        gateway.refund_calls = 1
    assert job_rows(db)[0]["status"] == "running"

    await aiohttp_client(create_app(settings))  # start-up: the lease has expired, the job is due again
    await wait_for(lambda: payment(db, lost)["status"] == "refunded")
    assert gateway.status_calls == 1  # asked first
    assert gateway.payouts == 1 and gateway.refund_calls == 1  # money moved exactly once
    (refunded,) = payment_events(db, lost, "refunded")
    if gateway_paid:
        assert refunded["detail"]["ref"] == "T-before-the-crash"
        assert refunded["detail"]["resolved_by"] == "status_query"
    (job,) = job_rows(db)
    assert job["attempts"] == 2
    await wait_for(lambda: job_rows(db)[0]["status"] == "done")


async def test_refunds_of_different_payments_run_at_once_and_one_payment_never_twice(
    aiohttp_client, settings, world, gateway
):
    db = world.db
    first = lost_slot_payment(world, 3 * 86400)
    second = lost_slot_payment(world, 3 * 86400 + 3600)
    gateway.wait_for_peer = True  # fails unless both refunds are inside the provider together
    client = await aiohttp_client(create_app(settings))
    await wait_for(lambda: payment(db, first)["status"] == payment(db, second)["status"] == "refunded")
    assert gateway.max_inside == 2 and gateway.payouts == 2

    # Five people press Refund on the same payment at once: one payout, one "refunded".
    gateway.wait_for_peer, gateway.delay, gateway.max_inside = False, 0.2, 0
    third = db.write_sync(lambda d: pay_sync(d, world.visit_id))
    app = client.server.app
    results = await asyncio.gather(
        *(payments.request_refund(app, third, reason="staff", actor=None) for _ in range(5))
    )
    # One press runs the refund at once, unless the job worker claimed it first (then all say
    # "queued" and the worker pays it): either way one payout, never two.
    assert results.count("refunded") <= 1 and set(results) <= {"refunded", "queued", "nothing"}
    await wait_for(lambda: payment(db, third)["status"] == "refunded")
    assert gateway.payouts == 3 and gateway.max_inside == 1
    assert len(payment_events(db, third, "refunded")) == 1


async def test_a_failing_provider_is_retried_with_backoff_then_dead(
    aiohttp_client, make_settings, make_user, gateway, caplog
):
    settings = make_settings(
        job_poll_seconds=0.05, job_max_attempts=3, job_retry_base_seconds=10, job_retry_max_seconds=15
    )
    world = build_world(None, settings, make_user)
    db = world.db
    lost = lost_slot_payment(world, 3 * 86400)
    gateway.failing = True
    client = await aiohttp_client(create_app(settings))
    app = client.server.app
    await wait_for(lambda: job_rows(db)[0]["attempts"] == 1 and job_rows(db)[0]["status"] == "queued")
    job = job_rows(db)[0]
    assert job["next_run_at"] - job["updated"] == pytest.approx(10)  # the base wait
    assert "gateway down" in job["last_error"]

    await jobs.drain(app, now=job["next_run_at"] + 1)  # ten seconds later
    job2 = job_rows(db)[0]
    assert (job2["attempts"], job2["status"]) == (2, "queued")
    assert job2["next_run_at"] - job2["updated"] == pytest.approx(15)  # 20, capped at 15
    assert gateway.status_calls == 1  # asked before trying again

    with caplog.at_level(logging.ERROR, logger="consult.core.jobs"):
        await jobs.drain(app, now=job2["next_run_at"] + 1)
    job3 = job_rows(db)[0]
    assert (job3["attempts"], job3["status"]) == (3, "dead")
    assert any("is dead after 3 attempts" in r.getMessage() for r in caplog.records)
    assert gateway.refund_calls == 3 and gateway.payouts == 0
    assert len(payment_events(db, lost, "refund_failed")) == 3
    assert payment(db, lost)["status"] == "paid"
    registry = app[metrics.METRICS].registry
    assert registry.get_sample_value("consult_jobs_died_total") == 1
    await app[jobs.JOBS].sweep(app)
    assert registry.get_sample_value("consult_jobs_dead") == 1
    assert await db.execute_fn(lambda d: jobs.dead_sync(d, "refund"))

    # Staff press Refund once the gateway is back: the dead job starts over and succeeds.
    gateway.failing = False
    assert await payments.request_refund(app, lost, reason="staff", actor=None) == "refunded"
    assert gateway.payouts == 1 and payment(db, lost)["status"] == "refunded"
    db.close()


async def test_cancel_says_refunded_only_when_the_money_is_back(aiohttp_client, settings, world, gateway):
    db = world.db
    db.write_sync(lambda d: pay_sync(d, world.visit_id))
    gateway.failing = True
    client = await aiohttp_client(create_app(settings))
    token = await sign_in(client, PATIENT)
    resp = await client.post(
        f"/visits/{world.public_id}/cancel",
        data={"csrf_token": token, "confirm": "yes"},
        allow_redirects=False,
    )
    assert resp.status == 303 and resp.headers["Location"].endswith("m=cancelled_refund_pending")
    page = await (await client.get(resp.headers["Location"])).text()
    assert "is being refunded" in page and "was refunded" not in page
    assert [(j["kind"], j["status"]) for j in job_rows(db) if j["kind"] == "refund"] == [("refund", "queued")]
    await jobs.drain(client.server.app)
    sms = [m["body"] for m in outbox(db) if m["subject"] == "Visit cancelled"]
    assert len(sms) == 1 and "will be refunded" in sms[0]
    # The gateway recovers; the retry (due later) refunds.
    gateway.failing = False
    await jobs.drain(client.server.app, now=time.time() + 3600)
    assert gateway.payouts == 1
    page = await (await client.get(f"/visits/{world.public_id}?m=cancelled_refunded")).text()
    assert "was refunded" in page


async def test_reminders_are_marked_sent_only_after_sending(
    aiohttp_client, make_settings, make_user, monkeypatch
):
    settings = make_settings(job_poll_seconds=0.05)
    world = build_world(None, settings, make_user, starts_in=1800)
    db = world.db
    db.write_sync(lambda d: pay_sync(d, world.visit_id))  # confirmed within the day: day reminder counted
    real_send = OutboxNotifier.send
    sent: list[str] = []

    async def broken(self, message):
        raise ConnectionError("SMS gateway unreachable")

    async def working(self, message):
        sent.append(message.subject)
        await real_send(self, message)

    monkeypatch.setattr(OutboxNotifier, "send", broken)
    client = await aiohttp_client(create_app(settings))
    app = client.server.app
    reminder_sent = lambda: db.read_sync(  # noqa: E731
        lambda d: d.execute("SELECT reminder_sent FROM visits WHERE id = ?", [world.visit_id]).fetchone()[0]
    )
    assert await booking.housekeeping(app) == {"expired": 0, "reminders": 1}
    reminder = lambda: [j for j in job_rows(db) if ":reminder:" in j["key"]]  # noqa: E731
    await jobs.drain(app)
    # The app's worker, woken by the same queueing, may have claimed it just before the drain
    # looked: its attempt is then still under way.
    await wait_for(lambda: [(j["status"], j["attempts"]) for j in reminder()] == [("queued", 1)])
    assert reminder_sent() == booking.REMINDER_DAY  # queued and failed: not marked
    assert (await booking.housekeeping(app))["reminders"] == 0  # queued once, not again

    monkeypatch.setattr(OutboxNotifier, "send", working)
    await jobs.drain(app, now=time.time() + 3600)
    assert reminder_sent() == booking.REMINDER_HOUR
    assert sorted(sent) == ["Visit confirmed", "Visit reminder"]
    assert (await booking.housekeeping(app))["reminders"] == 0
    db.close()


async def test_a_burst_of_reminders_is_queued_in_steps_with_the_loop_let_run_between(
    settings, world, monkeypatch, caplog
):
    """1,100 confirmed visits within the hour (a big clinic's next hour: the signaling bench has
    9,950) are queued in writes of 500, the loop running between them; once queued, a reminder is
    not read again; the hour's reminder still follows a day's one that was queued."""
    db = world.db
    now = time.time()

    def confirmed(d, count: int, first_start: int) -> None:
        for i in range(count):
            d.execute(
                "INSERT INTO visits (public_id, patient_id, doctor_id, department_id, starts_at, ends_at,"
                " status, fee_minor, currency, created, updated, call_nonce)"
                " VALUES (?, ?, ?, 1, ?, ?, 'confirmed', 5000, 'CNY', ?, ?, 'n')",
                [
                    secrets.token_urlsafe(9),
                    world.patient_id,
                    world.doctor_id,
                    first_start + i,
                    first_start + i + 900,
                    now,
                    now,
                ],
            )

    db.write_sync(lambda d: confirmed(d, 1100, int(now) + 600))  # within the hour
    later = db.write_sync(lambda d: confirmed(d, 1, int(now) + 3 * 3600) or int(now) + 3 * 3600)
    app = web.Application()
    app[keys.SETTINGS], app[keys.DB] = settings, db  # housekeeping alone, no worker to send them
    steps: list[int] = []
    step = holds.reminders_due_sync

    def counted(d, at):
        steps.append(step(d, at))
        return steps[-1]

    monkeypatch.setattr(holds, "reminders_due_sync", counted)
    assert await booking.housekeeping(app, now) == {"expired": 0, "reminders": 1101}
    assert steps == [500, 500, 101]  # three writes, each awaited alone: the loop runs between
    reminders = [j for j in job_rows(db) if ":reminder:" in j["key"]]
    assert len(reminders) == 1101 and {j["status"] for j in reminders} == {"queued"}
    assert len({j["key"] for j in reminders}) == 1101
    assert db.read_sync(lambda d: notices.unqueued_reminders_sync(d, now, 10_000)) == []  # read no more
    assert await booking.housekeeping(app, now + 1) == {"expired": 0, "reminders": 0}
    assert steps[3:] == [0]

    # Two and a half hours on, the later visit is due its hour's reminder beside the day's one.
    two_half = now + 2.5 * 3600
    assert [
        (r["starts_at"], r["level"])
        for r in db.read_sync(lambda d: notices.unqueued_reminders_sync(d, two_half, 10))
    ] == [(later, booking.REMINDER_HOUR)]
    assert (await booking.housekeeping(app, two_half))["reminders"] == 1
    keys_of_later = sorted(j["key"] for j in job_rows(db) if f":reminder:{later}:" in j["key"])
    assert [k.rsplit(":", 1)[1] for k in keys_of_later] == ["1", "2"]
    assert "read as not queued" not in caplog.text  # the SQL's key and enqueue's agreed throughout


async def test_the_sweep_refunds_paid_payments_left_without_a_job(aiohttp_client, settings, world):
    """Data from before the job table: paid on an expired visit, refund_requested, no outcome."""
    db = world.db
    lost = lost_slot_payment(world, 3 * 86400)
    db.write_sync(lambda d: d.execute("DELETE FROM jobs"))
    db.write_sync(
        lambda d: payments.record_event_sync(
            d, lost, "refund_requested", now=time.time() - 3600, detail={"reason": "slot_lost"}
        )
    )
    client = await aiohttp_client(create_app(settings))
    await wait_for(lambda: payment(db, lost)["status"] == "refunded")
    assert len(payment_events(db, lost, "refund_queued_by_sweep")) == 1
    ledger = read_ledger(settings.data_dir / REFUND_LEDGER)
    assert [r["order_id"] for r in ledger] == [payment(db, lost)["order_id"]]  # the simulator paid once
    # Sweeping again finds nothing to do.
    found = await client.server.app[jobs.JOBS].sweep(client.server.app)
    assert found["refunds"] == 0


async def test_the_simulator_remembers_its_refunds_across_restarts(aiohttp_client, settings, world):
    client = await aiohttp_client(create_app(settings))
    app = client.server.app
    pid = world.db.write_sync(lambda d: pay_sync(d, world.visit_id))
    pay = payments.Payment.from_row(payment(world.db, pid))
    sim = app[PAYMENTS].providers["simulator"]
    assert (await sim.refund_status(app, pay, "X1")).state == "none"
    ref = await sim.refund(app, pay, 5000, "X1")
    assert await sim.refund(app, pay, 5000, "X1") == ref  # the same refund number is not paid again
    fresh = SimulatorProvider()  # a new process
    assert await fresh.refund_status(app, pay, "X1") == RefundStatus("refunded", ref, 5000)
    assert len(read_ledger(settings.data_dir / REFUND_LEDGER)) == 1


async def test_jobs_are_claimed_once_and_finished_ones_pruned(aiohttp_client, settings, database):
    client = await aiohttp_client(create_app(settings))
    app = client.server.app
    ran: list[int] = []

    async def handler(app, job):
        ran.append(job.payload["n"])
        await asyncio.sleep(0.005)

    app[jobs.JOBS].register("test", handler)

    def enqueue(d) -> list[bool]:
        return [jobs.enqueue_sync(d, "test", {"n": n}, key=str(n % 30)) for n in range(40)]

    assert (await database.execute_write_fn(enqueue)).count(True) == 30  # a key is queued once
    await asyncio.gather(*(jobs.drain(app) for _ in range(3)))
    await wait_for(lambda: len(ran) == 30)
    assert sorted(ran) == list(range(30))
    with pytest.raises(RuntimeError):  # read_sync's handle has no transaction open
        database.read_sync(lambda d: jobs.enqueue_sync(d, "test", {}, key="outside"))

    now = time.time()
    retention = settings.job_retention_days * 86400

    def age(d) -> None:
        d.execute(
            "UPDATE jobs SET finished_at = ? WHERE kind = 'test' AND key IN ('0', '1')", [now - retention - 1]
        )
        d.execute("UPDATE jobs SET status = 'dead', finished_at = ? WHERE key = '1'", [now - retention - 1])
        jobs.enqueue_sync(d, "test", {"n": 99}, key="stuck", now=now)
        d.execute(
            "UPDATE jobs SET status = 'running', attempts = 8, lease_until = ? WHERE key = 'stuck'", [now - 1]
        )

    await database.execute_write_fn(age)
    found = await database.execute_write_fn(
        lambda d: jobs.sweep_sync(d, now, retention_s=retention, default_max_attempts=8)
    )
    assert found["pruned"] == 1 and found["dead"] == ["test:stuck"]
    statuses = {r["key"]: r["status"] for r in job_rows(database)}
    assert "0" not in statuses and statuses["1"] == "dead" and statuses["2"] == "done"
    assert statuses["stuck"] == "dead"  # a lease that ran out on its last attempt


def test_backoff_doubles_and_is_capped(settings):
    runner = jobs.Runner(settings)
    base, cap = settings.job_retry_base_seconds, settings.job_retry_max_seconds
    assert [runner.backoff(n) for n in (1, 2, 3)] == [base, 2 * base, 4 * base]
    assert runner.backoff(50) == cap
