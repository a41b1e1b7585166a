"""Payments: the simulator's signed callbacks, idempotency, refunds, the cashier desk."""

from __future__ import annotations

import asyncio
import json
import re
import time

import pytest

from consult import payments
from consult.app import create_app
from consult.core import jobs, metrics
from consult.payments import simulator
from tests.test_reports import ADMIN, PATIENT, World, build_world, sign_in

CALLBACK = "/api/payments/callback/simulator"


@pytest.fixture
def world(client, settings, make_user):
    w = build_world(client, settings, make_user)
    yield w
    w.db.close()


def payment_rows(world: World) -> list[dict]:
    return world.db.read_sync(lambda d: [dict(r) for r in d.execute("SELECT * FROM payments ORDER BY id")])


def visit_row(world: World) -> dict:
    return world.db.read_sync(
        lambda d: dict(d.execute("SELECT * FROM visits WHERE id = ?", [world.visit_id]).fetchone())
    )


def events(world: World, kind: str | None = None) -> list[dict]:
    rows = world.db.read_sync(
        lambda d: [dict(r) for r in d.execute("SELECT * FROM payment_events ORDER BY id")]
    )
    return [r for r in rows if kind is None or r["kind"] == kind]


async def start_payment(world: World) -> str:
    """Sign in as the patient and press Pay; returns the order id."""
    client = world.client
    token = await sign_in(client, PATIENT)
    resp = await client.post(
        f"/visits/{world.public_id}/pay", data={"csrf_token": token}, allow_redirects=False
    )
    assert resp.status == 303, await resp.text()
    return payment_rows(world)[-1]["order_id"]


def payments_counted(world: World) -> float | None:
    return world.client.server.app[metrics.METRICS].registry.get_sample_value("consult_payments_total")


async def wait_for(predicate, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


def signed(world: World, payload: dict, secret: str | None = None) -> tuple[bytes, dict]:
    app = world.client.server.app
    key = secret if secret is not None else app[payments.keys.SETTINGS].payment_secret
    return simulator.canonical(payload), {
        "Content-Type": "application/json",
        "X-Signature": simulator.sign(key, payload),
    }


def notice(order_id: str, **changes) -> dict:
    body = {
        "order_id": order_id,
        "amount_minor": 5000,
        "currency": "CNY",
        "status": "SUCCESS",
        "notify_id": "N-test-1",
        "timestamp": int(time.time()),
    }
    body.update(changes)
    return body


async def test_simulator_happy_path(world):
    client = world.client
    token = await sign_in(client, PATIENT)
    resp = await client.post(
        f"/visits/{world.public_id}/pay", data={"csrf_token": token}, allow_redirects=False
    )
    assert resp.status == 303
    (payment,) = payment_rows(world)
    assert resp.headers["Location"] == f"/simulator/pay/{payment['order_id']}"
    assert payment["status"] == "pending"
    assert payment["amount_minor"] == 5000
    assert payment["currency"] == "CNY"

    page = await (await client.get(resp.headers["Location"])).text()
    assert "Payment gateway (simulator)" in page
    assert "¥50.00" in page
    token = re.search(r'name="csrf_token" value="([0-9a-f]+)"', page).group(1)
    resp = await client.post(
        resp.headers["Location"].replace("/simulator/pay/", "/simulator/pay/"),
        data={"csrf_token": token, "action": "pay"},
        allow_redirects=False,
    )
    assert resp.status == 303
    assert resp.headers["Location"] == f"/pay/{payment['order_id']}"
    waiting = await (await client.get(resp.headers["Location"])).text()
    assert "data-payment-wait" in waiting

    # The gateway calls back over HTTP, asynchronously; the return page polls this JSON.
    await wait_for(lambda: visit_row(world)["status"] == "confirmed")
    (payment,) = payment_rows(world)
    assert payment["status"] == "paid"
    assert len(events(world, "paid")) == 1
    status = await (await client.get(f"/api/payments/{payment['order_id']}")).json()
    assert status["status"] == "paid"
    assert status["visit_status"] == "confirmed"
    assert status["visit_url"] == f"/visits/{world.public_id}"
    receipt = await client.get(status["receipt_url"])
    assert receipt.status == 200
    assert payment["order_id"] in await receipt.text()
    panel = await (await client.get(f"/api/visits/{world.public_id}/payment")).json()
    assert panel["payment"]["status"] == "paid"
    outbox = world.db.read_sync(lambda d: d.execute("SELECT recipient FROM outbox").fetchall())
    assert [r[0] for r in outbox] == [PATIENT]  # the confirmation went out once


async def test_pressing_pay_twice_reuses_the_pending_payment(world):
    order = await start_payment(world)
    token = await sign_in(world.client, PATIENT)
    resp = await world.client.post(
        f"/visits/{world.public_id}/pay", data={"csrf_token": token}, allow_redirects=False
    )
    assert resp.status == 303
    assert [p["order_id"] for p in payment_rows(world)] == [order]


async def test_valid_callback_then_replay_changes_nothing(world):
    order = await start_payment(world)
    body, headers = signed(world, notice(order))
    resp = await world.client.post(CALLBACK, data=body, headers=headers)
    assert resp.status == 200
    assert (await resp.json())["result"] == "paid"
    before = (payment_rows(world), visit_row(world), len(events(world)))
    assert before[1]["status"] == "confirmed"

    resp = await world.client.post(CALLBACK, data=body, headers=headers)
    assert resp.status == 200
    assert (await resp.json())["result"] == "already processed"
    assert (payment_rows(world), visit_row(world), len(events(world))) == before
    assert payments_counted(world) == 1  # the replay is not a second payment


async def test_duplicate_success_notification_records_one_paid_event(world):
    order = await start_payment(world)
    for notify_id in ("N-a", "N-b", "N-c"):
        body, headers = signed(world, notice(order, notify_id=notify_id))
        resp = await world.client.post(CALLBACK, data=body, headers=headers)
        assert resp.status == 200
    assert len(events(world, "paid")) == 1
    assert len(events(world, "duplicate_notice")) == 2
    assert payment_rows(world)[0]["status"] == "paid"


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("forged", "bad signature"),
        ("tampered", "bad signature"),
        ("amount", "amount mismatch"),
        ("currency", "currency mismatch"),
        ("stale", "stale timestamp"),
        ("future", "stale timestamp"),
        ("unknown", "unknown order"),
        ("malformed", "malformed body"),
    ],
)
async def test_bad_callbacks_are_rejected_and_change_nothing(world, case, reason):
    order = await start_payment(world)
    payload = notice(order)
    if case == "forged":
        body, headers = signed(world, payload, secret="not-the-secret")
    elif case == "tampered":
        body, headers = signed(world, payload)
        body = simulator.canonical({**payload, "amount_minor": 1})
    elif case == "amount":
        body, headers = signed(world, notice(order, amount_minor=1))
    elif case == "currency":
        body, headers = signed(world, notice(order, currency="USD"))
    elif case == "stale":
        body, headers = signed(world, notice(order, timestamp=int(time.time()) - 301))
    elif case == "future":
        body, headers = signed(world, notice(order, timestamp=int(time.time()) + 3600))
    elif case == "unknown":
        body, headers = signed(world, notice("C20990101DEADBEEF"))
    else:
        body, headers = b"[not json", {"Content-Type": "application/json", "X-Signature": "00"}
    before = (payment_rows(world), visit_row(world))

    resp = await world.client.post(CALLBACK, data=body, headers=headers)
    assert resp.status == 400
    assert (await resp.json())["reason"] == reason
    assert (payment_rows(world), visit_row(world)) == before
    assert before[0][0]["status"] == "pending"
    assert before[1]["status"] == "held"
    rejected = events(world, "rejected_callback")
    assert len(rejected) == 1
    assert json.loads(rejected[0]["detail"])["reason"] == reason
    assert rejected[0]["notify_id"] is None

    # The genuine notification still goes through afterwards.
    body, headers = signed(world, notice(order, notify_id="N-genuine"))
    resp = await world.client.post(CALLBACK, data=body, headers=headers)
    assert resp.status == 200
    assert visit_row(world)["status"] == "confirmed"


async def test_refund_visit_is_idempotent(world):
    order = await start_payment(world)
    body, headers = signed(world, notice(order))
    assert (await world.client.post(CALLBACK, data=body, headers=headers)).status == 200
    app = world.client.server.app

    assert await payments.refund_visit(app, world.visit_id, reason="cancelled by doctor", actor=None) is True
    assert await payments.refund_visit(app, world.visit_id, reason="cancelled by doctor", actor=None) is False
    (payment,) = payment_rows(world)
    assert payment["status"] == "refunded"
    assert payment["refund_minor"] == 5000
    assert payment["refunded_at"] is not None
    assert len(events(world, "refunded")) == 1
    # A late replay of the original notification does not resurrect the payment.
    assert (await world.client.post(CALLBACK, data=body, headers=headers)).status == 200
    assert payment_rows(world)[0]["status"] == "refunded"


async def test_concurrent_refunds_refund_once(world):
    order = await start_payment(world)
    body, headers = signed(world, notice(order))
    assert (await world.client.post(CALLBACK, data=body, headers=headers)).status == 200
    app = world.client.server.app
    results = await asyncio.gather(
        *(payments.refund_visit(app, world.visit_id, reason="x", actor=None) for _ in range(5))
    )
    assert sorted(results) == [False] * 4 + [True]
    assert len(events(world, "refunded")) == 1


async def test_admin_refunds_from_the_desk(world):
    order = await start_payment(world)
    body, headers = signed(world, notice(order))
    assert (await world.client.post(CALLBACK, data=body, headers=headers)).status == 200
    token = await sign_in(world.client, ADMIN)
    page = await world.client.get("/admin/payments")
    assert order in await page.text()
    resp = await world.client.post(
        f"/admin/payments/{order}/refund", data={"csrf_token": token}, allow_redirects=False
    )
    assert resp.status == 303
    assert payment_rows(world)[0]["status"] == "refunded"
    audit = world.db.read_sync(
        lambda d: [dict(r) for r in d.execute("SELECT * FROM audit_log WHERE action = 'payment.refund'")]
    )
    assert [(a["actor_id"], a["object_id"]) for a in audit] == [(world.admin_id, order)]


async def test_slot_lost_while_paying_is_refunded_automatically(world):
    order = await start_payment(world)

    def steal(d) -> None:
        # The hold lapsed and someone else booked the same slot before the money arrived.
        d.execute(
            "UPDATE visits SET status = 'expired', hold_expires = ? WHERE id = ?",
            [time.time() - 1, world.visit_id],
        )
        v = d.execute("SELECT * FROM visits WHERE id = ?", [world.visit_id]).fetchone()
        d.execute(
            "INSERT INTO visits (public_id, patient_id, doctor_id, department_id, starts_at, ends_at,"
            " status, fee_minor, currency, created, updated, call_nonce)"
            " VALUES ('other', ?, ?, 1, ?, ?, 'confirmed', 5000, 'CNY', 0, 0, 'n')",
            [world.other_patient_id, world.doctor_id, v["starts_at"], v["ends_at"]],
        )

    world.db.write_sync(steal)
    body, headers = signed(world, notice(order))
    resp = await world.client.post(CALLBACK, data=body, headers=headers)
    assert resp.status == 200
    # The refund is a job queued with the payment; the worker runs it (drained here, not raced).
    await jobs.drain(world.client.server.app)
    (payment,) = payment_rows(world)
    assert payment["status"] == "refunded"
    assert visit_row(world)["status"] == "expired"
    assert [e["kind"] for e in events(world)] == [
        "created",
        "paid",
        "slot_lost",
        "refund_requested",
        "refunded",
    ]
    assert json.loads(events(world, "refunded")[0]["detail"])["reason"] == "slot_lost"


async def test_cannot_pay_someone_elses_visit(world):
    token = await sign_in(world.client, "13900000002")
    resp = await world.client.post(
        f"/visits/{world.public_id}/pay", data={"csrf_token": token}, allow_redirects=False
    )
    assert resp.status == 404
    assert payment_rows(world) == []


async def test_callback_for_cashier_is_not_found(world):
    resp = await world.client.post("/api/payments/callback/cashier", json={})
    assert resp.status == 404
    assert events(world) == []


async def test_cashier_mark_paid_needs_admin_and_csrf(aiohttp_client, make_settings, make_user):
    settings = make_settings(payment_provider="cashier")
    client = await aiohttp_client(create_app(settings))
    world = build_world(client, settings, make_user)
    try:
        order = await start_payment(world)
        page = await client.get(f"/pay/{order}")
        text = await page.text()
        assert "Pay at the counter" in text
        assert order in text
        assert (await client.get(f"/simulator/pay/{order}")).status == 404

        token = await sign_in(client, PATIENT)  # a patient cannot mark their own order paid
        resp = await client.post(
            f"/admin/payments/{order}/mark-paid", data={"csrf_token": token}, allow_redirects=False
        )
        assert resp.status == 403
        await sign_in(client, ADMIN)
        resp = await client.post(f"/admin/payments/{order}/mark-paid", data={}, allow_redirects=False)
        assert resp.status == 403  # no CSRF token
        assert payment_rows(world)[0]["status"] == "pending"

        listing = await client.get("/admin/payments")
        html = await listing.text()
        assert order in html
        token = re.search(r'name="csrf_token" value="([0-9a-f]+)"', html).group(1)
        resp = await client.post(
            f"/admin/payments/{order}/mark-paid", data={"csrf_token": token}, allow_redirects=False
        )
        assert resp.status == 303
        assert payment_rows(world)[0]["status"] == "paid"
        assert visit_row(world)["status"] == "confirmed"
        audit = world.db.read_sync(
            lambda d: [
                dict(r) for r in d.execute("SELECT * FROM audit_log WHERE action = 'payment.mark_paid'")
            ]
        )
        assert [(a["actor_id"], a["object_id"]) for a in audit] == [(world.admin_id, order)]
        # Twice is harmless.
        resp = await client.post(
            f"/admin/payments/{order}/mark-paid", data={"csrf_token": token}, allow_redirects=False
        )
        assert resp.status == 303
        assert len(events(world, "paid")) == 1
        assert payments_counted(world) == 1
    finally:
        world.db.close()


async def test_a_flood_of_refused_callbacks_is_counted_but_stored_only_up_to_a_limit(world):
    """Anyone can reach the callback URL: refusals must not grow the database without bound."""
    from consult.core.metrics import METRICS

    order = await start_payment(world)
    body, headers = signed(world, notice(order), secret="not-the-secret")
    flood = payments.REJECTIONS_STORED_PER_HOUR + 25
    for _ in range(flood):
        resp = await world.client.post(CALLBACK, data=body, headers=headers)
        assert resp.status == 400 and (await resp.json())["reason"] == "bad signature"
    assert len(events(world, "rejected_callback")) == payments.REJECTIONS_STORED_PER_HOUR
    counted = world.client.app[METRICS].counters["payment_callbacks_rejected"]._value.get()
    assert counted == flood
    assert payment_rows(world)[0]["status"] == "pending"
