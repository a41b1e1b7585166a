"""Payments: the service around the provider interface a hospital's gateway plugs into.

The interface itself (``Payment``, ``Notice``, ``Outcome``, ``PaymentProvider``, ``Fulfilment``,
``CallbackRejected``, the app state) lives in ``consult.payments.gateway``, which the providers
import; it is re-exported here, so ``payments.Payment`` and friends keep working.

A payment belongs to one visit, in integer minor units. Every change to it is recorded in
``payment_events``; a gateway notification's id is UNIQUE there, so a replayed or duplicated
notification finds its own earlier row and changes nothing. Marking a payment paid and
confirming its visit happen in one write transaction; if the slot was lost meanwhile, the
payment stays paid and is refunded automatically, with an event saying why.

A refund is a durable job (``consult.core.jobs``, kind ``refund``, one per payment), queued in the
transaction of the fact that calls for it (slot lost, duplicate payment, visit cancelled, staff
asked) and run by the worker, by ``perform_refund``. Before retrying a refund whose outcome was
never recorded, it asks the provider (``refund_status``) so that money never moves twice. A sweep
(``sweep_refunds_sync``) queues refunds that data written before the job table lacks.
"""

from __future__ import annotations

import json
import logging
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator
from typing import Any

import sqlite_utils
from aiohttp import web

from consult.accounts.users import User
from consult.audit import chain as audit
from consult.core import jobs, keys, metrics
from consult.core.db import Database
from consult.core.errors import BadRequest, Conflict, NotFound
from consult.core.i18n import _
from consult.payments.cashier import CashierProvider
from consult.payments.gateway import (
    FULFILMENT,
    PAYMENTS,
    CallbackRejected,
    Fulfilment,
    Notice,
    Outcome,
    Payment,
    PaymentProvider,
    PaymentsState,
    RefundStatus,  # noqa: F401 - re-exported: payments.RefundStatus
)
from consult.payments.simulator import SimulatorProvider

log = logging.getLogger(__name__)

PROVIDER_NAMES = ("simulator", "cashier")
FRESHNESS_SECONDS = 300
ORDER_PREFIX = "C"
REFUND_JOB = "refund"
REFUND_WAIT_S = 5.0  # how long a person who asked for a refund waits for its first attempt


def make_state(fulfilment: Fulfilment) -> PaymentsState:
    return PaymentsState(
        providers={"simulator": SimulatorProvider(), "cashier": CashierProvider()}, fulfilment=fulfilment
    )


async def payments_ctx(app: web.Application) -> AsyncIterator[None]:
    """``cleanup_ctx``: the providers, and the payment tasks cancelled and awaited at shutdown."""
    state = make_state(app[FULFILMENT])
    if not app[keys.SETTINGS].demo:
        # The simulator takes no money: outside demo mode it does not exist, callbacks included.
        state.providers.pop("simulator", None)
    app[PAYMENTS] = state
    try:
        yield
    finally:
        await app[PAYMENTS].close()


def provider_for(app: web.Application, name: str | None = None) -> PaymentProvider:
    name = name or app[keys.SETTINGS].payment_provider
    try:
        return app[PAYMENTS].providers[name]
    except KeyError:
        raise NotFound(_("This payment method is not available.")) from None


# -- reads ------------------------------------------------------------------------------------

PAYMENT_COLUMNS = (
    "id, visit_id, order_id, provider, amount_minor, currency, status, provider_ref, created,"
    " paid_at, refunded_at, refund_minor"
)


async def by_order(db: Database, order_id: str) -> Payment | None:
    row = await db.query_one(
        f"SELECT {PAYMENT_COLUMNS} FROM payments WHERE order_id = ?",  # noqa: S608
        [order_id],
    )
    return Payment.from_row(row) if row else None


async def latest_for_visit(db: Database, visit_id: int) -> Payment | None:
    row = await db.query_one(
        f"SELECT {PAYMENT_COLUMNS} FROM payments WHERE visit_id = ?"  # noqa: S608
        " ORDER BY (status = 'paid') DESC, created DESC, id DESC LIMIT 1",
        [visit_id],
    )
    return Payment.from_row(row) if row else None


async def events_for(db: Database, payment_id: int) -> list[dict[str, Any]]:
    rows = await db.query(
        "SELECT kind, notify_id, detail, created FROM payment_events WHERE payment_id = ? ORDER BY id",
        [payment_id],
    )
    return [dict(r) for r in rows]


DESK_SELECT = (
    "SELECT p.*, v.public_id, v.starts_at, v.status AS visit_status,"
    " pu.display_name AS patient, pu.phone AS patient_phone, du.display_name AS doctor"
    " FROM payments p JOIN visits v ON v.id = p.visit_id"
    " JOIN users pu ON pu.id = v.patient_id JOIN users du ON du.id = v.doctor_id"
)


def desk_sync(db: sqlite_utils.Database) -> tuple[list[sqlite3.Row], list[sqlite3.Row]]:
    """The cashier desk: pending payments, oldest first, and the latest paid or refunded ones."""
    pending = db.execute(DESK_SELECT + " WHERE p.status = 'pending' ORDER BY p.created LIMIT 200").fetchall()
    recent = db.execute(
        DESK_SELECT
        + " WHERE p.status IN ('paid', 'refunded') ORDER BY coalesce(p.paid_at, p.created) DESC LIMIT 50"
    ).fetchall()
    return pending, recent


def _payment_sync(db: sqlite_utils.Database, payment_id: int) -> Payment:
    row = db.execute(
        f"SELECT {PAYMENT_COLUMNS} FROM payments WHERE id = ?",  # noqa: S608
        [payment_id],
    ).fetchone()
    if row is None:
        raise NotFound(_("This payment does not exist."))
    return Payment.from_row(row)


# -- writes (each *_sync runs inside the caller's write transaction) --------------------------


def record_event_sync(
    db: sqlite_utils.Database,
    payment_id: int | None,
    kind: str,
    *,
    now: float,
    notify_id: str | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    db.execute(
        "INSERT INTO payment_events (payment_id, kind, notify_id, detail, created) VALUES (?, ?, ?, ?, ?)",
        [payment_id, kind, notify_id, json.dumps(detail or {}, sort_keys=True, ensure_ascii=False), now],
    )


def new_order_id(now: float) -> str:
    stamp = time.strftime("%Y%m%d", time.gmtime(now))
    return f"{ORDER_PREFIX}{stamp}{secrets.token_hex(6).upper()}"


def create_payment_sync(
    db: sqlite_utils.Database, visit_id: int, provider: str, *, now: float, default_currency: str
) -> Payment:
    """A pending payment for a held visit; the existing one when it is already pending."""
    visit = db.execute("SELECT * FROM visits WHERE id = ?", [visit_id]).fetchone()
    if visit is None:
        raise NotFound(_("This visit does not exist."))
    paid = db.execute("SELECT id FROM payments WHERE visit_id = ? AND status = 'paid'", [visit_id]).fetchone()
    if paid is not None:
        raise Conflict(_("This visit is already paid."), code="already_paid")
    if visit["status"] != "held" or (visit["hold_expires"] and visit["hold_expires"] <= now):
        raise Conflict(
            _("This booking is no longer held for you. Please choose a time again."), code="not_held"
        )
    amount = int(visit["fee_minor"])
    currency = visit["currency"] or default_currency
    pending = db.execute(
        f"SELECT {PAYMENT_COLUMNS} FROM payments WHERE visit_id = ? AND status = 'pending'",  # noqa: S608
        [visit_id],
    ).fetchone()
    if pending is not None:
        existing = Payment.from_row(pending)
        if (existing.provider, existing.amount_minor, existing.currency) == (provider, amount, currency):
            return existing
        db.execute("UPDATE payments SET status = 'cancelled' WHERE id = ?", [existing.id])
        record_event_sync(db, existing.id, "cancelled", now=now, detail={"reason": "superseded"})
    order_id = new_order_id(now)
    cur = db.execute(
        "INSERT INTO payments (visit_id, order_id, provider, amount_minor, currency, status, created)"
        " VALUES (?, ?, ?, ?, ?, 'pending', ?) RETURNING id",
        [visit_id, order_id, provider, amount, currency, now],
    )
    payment_id = int(cur.fetchone()[0])
    record_event_sync(
        db, payment_id, "created", now=now, detail={"amount_minor": amount, "currency": currency}
    )
    return _payment_sync(db, payment_id)


async def create_payment(app: web.Application, visit_id: int, provider: str | None = None) -> Payment:
    settings = app[keys.SETTINGS]
    name = provider or settings.payment_provider
    now = time.time()
    return await app[keys.DB].execute_write_fn(
        lambda db: create_payment_sync(db, visit_id, name, now=now, default_currency=settings.currency)
    )


def mark_paid_sync(
    db: sqlite_utils.Database,
    payment_id: int,
    *,
    now: float,
    fulfilment: Fulfilment,
    notify_id: str | None = None,
    provider_ref: str | None = None,
    detail: dict[str, Any] | None = None,
) -> Outcome:
    """Mark paid and confirm the visit, in the caller's transaction. Idempotent per payment.

    What must follow is queued in this transaction: the confirmation message (by the fulfilment)
    or, when the visit cannot have this payment, its refund.
    """
    payment = _payment_sync(db, payment_id)
    if payment.status in ("paid", "refunded"):
        # The gateway telling us twice (under a new notification id): remember the id, change nothing.
        if notify_id is not None:
            record_event_sync(db, payment.id, "duplicate_notice", now=now, notify_id=notify_id, detail=detail)
        return Outcome("already", payment)
    db.execute(
        "UPDATE payments SET status = 'paid', paid_at = ?, provider_ref = coalesce(?, provider_ref)"
        " WHERE id = ?",
        [now, provider_ref, payment.id],
    )
    record_event_sync(db, payment.id, "paid", now=now, notify_id=notify_id, detail=detail)
    other_paid = db.execute(
        "SELECT id FROM payments WHERE visit_id = ? AND status = 'paid' AND id != ?",
        [payment.visit_id, payment.id],
    ).fetchone()
    visit = db.execute("SELECT status FROM visits WHERE id = ?", [payment.visit_id]).fetchone()
    outcome = Outcome("paid", _payment_sync(db, payment.id))
    if other_paid is not None:
        record_event_sync(db, payment.id, "duplicate_payment", now=now, detail={"other": other_paid[0]})
        outcome.refund_reason = "duplicate_payment"
        enqueue_refund_sync(db, payment.id, reason=outcome.refund_reason, now=now)
        return outcome
    if visit is not None and visit["status"] == "confirmed":
        return outcome
    db.execute("SAVEPOINT confirm_visit")
    try:
        fulfilment.confirm_sync(db, payment.visit_id, now)
    except Conflict as exc:
        db.execute("ROLLBACK TO confirm_visit")
        db.execute("RELEASE confirm_visit")
        record_event_sync(db, payment.id, "slot_lost", now=now, detail={"message": exc.message})
        outcome.refund_reason = "slot_lost"
        enqueue_refund_sync(db, payment.id, reason=outcome.refund_reason, now=now)
        return outcome
    db.execute("RELEASE confirm_visit")
    outcome.confirmed = True
    return outcome


def process_notice_sync(
    db: sqlite_utils.Database,
    provider: str,
    notice: Notice,
    *,
    now: float,
    freshness: float,
    fulfilment: Fulfilment,
) -> Outcome:
    """Apply one verified notification: a replay or a mismatch changes no payment or visit."""
    if db.execute("SELECT 1 FROM payment_events WHERE notify_id = ?", [notice.notify_id]).fetchone():
        return Outcome("already", reason="replayed notification")
    row = db.execute(
        f"SELECT {PAYMENT_COLUMNS} FROM payments WHERE order_id = ?",  # noqa: S608
        [notice.order_id],
    ).fetchone()
    claimed = {
        "order_id": notice.order_id,
        "amount_minor": notice.amount_minor,
        "currency": notice.currency,
        "status": notice.status,
        "notify_id": notice.notify_id,
        "timestamp": notice.timestamp,
    }

    def reject(reason: str, payment_id: int | None) -> Outcome:
        # notify_id stays out of the UNIQUE column: a rejected id must not block a genuine one.
        record_event_sync(
            db, payment_id, "rejected_callback", now=now, detail={"reason": reason, "claimed": claimed}
        )
        return Outcome("rejected", reason=reason)

    if row is None:
        return reject("unknown order", None)
    payment = Payment.from_row(row)
    if payment.provider != provider:
        return reject("wrong provider", payment.id)
    if abs(now - notice.timestamp) > freshness:
        return reject("stale timestamp", payment.id)
    if notice.amount_minor != payment.amount_minor:
        return reject("amount mismatch", payment.id)
    if notice.currency != payment.currency:
        return reject("currency mismatch", payment.id)
    if notice.status != "SUCCESS":
        if payment.status == "pending":
            db.execute("UPDATE payments SET status = 'failed' WHERE id = ?", [payment.id])
        record_event_sync(
            db, payment.id, "failed", now=now, notify_id=notice.notify_id, detail={"status": notice.status}
        )
        return Outcome("failed", _payment_sync(db, payment.id))
    return mark_paid_sync(
        db,
        payment.id,
        now=now,
        fulfilment=fulfilment,
        notify_id=notice.notify_id,
        provider_ref=notice.notify_id,
        detail={"via": provider, "timestamp": notice.timestamp},
    )


# Refused notifications come from anyone who can reach the callback URL: every one is counted
# (metrics), but only the first few an hour are stored, and stored ones are kept for a while only.
REJECTIONS_STORED_PER_HOUR = 50
REJECTIONS_KEPT_DAYS = 30


async def record_rejection(
    app: web.Application, provider: str, exc: CallbackRejected, remote: str | None
) -> bool:
    """A notification refused before it could be applied (bad signature, malformed body).

    Counted always; stored (as a ``rejected_callback`` payment event) only while fewer than
    ``REJECTIONS_STORED_PER_HOUR`` were stored in the last hour. Whether it was stored.
    """
    metrics.count(app, "payment_callbacks_rejected")
    now = time.time()
    order_id = exc.order_id if isinstance(exc.order_id, str) else None

    def write(db: sqlite_utils.Database) -> bool:
        db.execute(
            "DELETE FROM payment_events WHERE kind = 'rejected_callback' AND created < ?",
            [now - REJECTIONS_KEPT_DAYS * 86400],
        )
        recent = db.execute(
            "SELECT count(*) FROM payment_events WHERE kind = 'rejected_callback' AND created >= ?",
            [now - 3600],
        ).fetchone()[0]
        if recent >= REJECTIONS_STORED_PER_HOUR:
            return False
        payment_id = None
        if order_id:
            row = db.execute("SELECT id FROM payments WHERE order_id = ?", [order_id[:64]]).fetchone()
            payment_id = row[0] if row else None
        detail = {"reason": exc.reason, "provider": provider, "remote": remote}
        detail.update({k: str(v)[:128] for k, v in list(exc.detail.items())[:8]})
        record_event_sync(db, payment_id, "rejected_callback", now=now, detail=detail)
        return True

    return await app[keys.DB].execute_write_fn(write)


async def handle_notice(app: web.Application, provider: str, notice: Notice) -> Outcome:
    now = time.time()
    outcome = await app[keys.DB].execute_write_fn(
        lambda db: process_notice_sync(
            db, provider, notice, now=now, freshness=FRESHNESS_SECONDS, fulfilment=app[PAYMENTS].fulfilment
        )
    )
    await after_commit(app, outcome)
    return outcome


async def after_commit(app: web.Application, outcome: Outcome, *, settle_wait: float | None = None) -> None:
    """After a committed payment: count it and wake the job worker for what it queued.

    With ``settle_wait`` (a person is waiting: staff at the counter), an automatic refund gets its
    first attempt now, and ``outcome.refund_state`` says whether it is done.
    """
    if outcome.payment is None:
        return
    if outcome.result == "paid":  # paid in this transaction; "already" was counted the first time
        metrics.count(app, "payments")
    if outcome.confirmed or outcome.refund_reason:
        jobs.wake(app)
    if outcome.refund_reason and settle_wait is not None:
        outcome.refund_state = await settle_refunds(app, [refund_key(outcome.payment.id)], wait=settle_wait)


async def mark_paid_by_staff(app: web.Application, order_id: str, actor: User, remote: str | None) -> Outcome:
    """The cashier took the money at the counter."""
    now = time.time()

    def write(db: sqlite_utils.Database) -> Outcome:
        row = db.execute(
            "SELECT id, provider, status FROM payments WHERE order_id = ?", [order_id]
        ).fetchone()
        if row is None:
            raise NotFound(_("This payment does not exist."))
        if row["provider"] != "cashier":
            raise BadRequest(_("Only counter payments can be marked paid by staff."), code="not_cashier")
        if row["status"] not in ("pending", "paid"):
            raise Conflict(_("This payment can no longer be marked paid."), code="not_pending")
        outcome = mark_paid_sync(
            db,
            row["id"],
            now=now,
            fulfilment=app[PAYMENTS].fulfilment,
            detail={"via": "cashier", "staff": actor.id},
        )
        if outcome.result == "paid":
            patient = db.execute(
                "SELECT v.patient_id FROM visits v JOIN payments p ON p.visit_id = v.id WHERE p.id = ?",
                [row["id"]],
            ).fetchone()
            audit.record(
                db,
                "payment.mark_paid",
                "payment",
                order_id,
                actor=actor,
                subject_user_id=patient[0] if patient else None,
                remote=remote,
                detail={"confirmed": outcome.confirmed},
                created=now,
            )
        return outcome

    outcome = await app[keys.DB].execute_write_fn(write)
    await after_commit(app, outcome, settle_wait=REFUND_WAIT_S)
    return outcome


# -- refunds ----------------------------------------------------------------------------------


def refund_key(payment_id: int) -> str:
    return f"payment:{payment_id}"


def refund_id_for(payment: Payment) -> str:
    """Our number for the refund of a payment, the same on every attempt (one refund per payment)."""
    return f"{payment.order_id}R"


def enqueue_refund_sync(
    db: sqlite_utils.Database,
    payment_id: int,
    *,
    reason: str,
    now: float,
    actor: User | None = None,
    remote: str | None = None,
) -> str:
    """Queue the refund of a payment in the caller's transaction (once per payment); its job key."""
    key = refund_key(payment_id)
    payload = {
        "payment_id": payment_id,
        "reason": reason,
        "actor_id": actor.id if actor else None,
        "actor_role": actor.role if actor else None,
        "remote": remote,
    }
    jobs.enqueue_sync(db, REFUND_JOB, payload, key=key, now=now)
    return key


def enqueue_visit_refunds_sync(
    db: sqlite_utils.Database, visit_id: int, *, reason: str, now: float, actor: User | None = None
) -> list[str]:
    """Queue the refund of every paid payment of a visit; their job keys."""
    rows = db.execute(
        "SELECT id FROM payments WHERE visit_id = ? AND status = 'paid' ORDER BY id", [visit_id]
    ).fetchall()
    return [enqueue_refund_sync(db, r["id"], reason=reason, now=now, actor=actor) for r in rows]


def sweep_refunds_sync(db: sqlite_utils.Database, now: float) -> int:
    """Belt and braces: paid payments that must be refunded but have no refund job get one.

    A visit that lost its slot or was cancelled keeps no payment, nor does a visit paid twice keep
    the later one. Data written before refunds were jobs (or by a process killed in between) is
    found here; a payment that already has its job, whatever its state, is left alone.
    """
    rows = db.execute(
        "SELECT p.id, v.status AS visit_status,"
        " EXISTS (SELECT 1 FROM payments q WHERE q.visit_id = p.visit_id AND q.status = 'paid'"
        "         AND q.id < p.id) AS duplicate"
        " FROM payments p JOIN visits v ON v.id = p.visit_id"
        " WHERE p.status = 'paid' AND p.refund_minor < p.amount_minor"
        " AND (v.status IN ('expired', 'cancelled') OR EXISTS (SELECT 1 FROM payments q"
        "      WHERE q.visit_id = p.visit_id AND q.status = 'paid' AND q.id < p.id))"
    ).fetchall()
    queued = 0
    for r in rows:
        if r["duplicate"]:
            reason = "duplicate_payment"
        else:
            reason = "visit_cancelled" if r["visit_status"] == "cancelled" else "slot_lost"
        if jobs.status_sync(db, REFUND_JOB, refund_key(r["id"])) is None:
            enqueue_refund_sync(db, r["id"], reason=reason, now=now)
            record_event_sync(db, r["id"], "refund_queued_by_sweep", now=now, detail={"reason": reason})
            queued += 1
    if queued:
        log.warning("queued %d refunds that had no job (written before jobs, or cut off by a crash)", queued)
    return queued


class _Actor:
    """Who asked for a refund, as the audit trail needs it (id and role), from a job's payload."""

    def __init__(self, id: int, role: str | None) -> None:
        self.id = id
        self.role = role


async def perform_refund(app: web.Application, job: jobs.Job) -> bool:
    """The ``refund`` job: refund what is left of one paid payment; whether this run refunded it.

    Money never moves twice: when an earlier attempt asked the provider (``refund_requested``)
    and no outcome was recorded, the provider is asked what became of it before anything else.
    A failure raises, and the worker retries with backoff.
    """
    db = app[keys.DB]
    payload = job.payload
    payment_id = int(payload["payment_id"])
    row = await db.query_one(
        f"SELECT {PAYMENT_COLUMNS} FROM payments WHERE id = ?",  # noqa: S608
        [payment_id],
    )
    if row is None:
        return False
    payment = Payment.from_row(row)
    amount = payment.amount_minor - payment.refund_minor
    if payment.status != "paid" or amount <= 0:
        return False  # refunded already (by an earlier run, or staff): nothing to do
    provider = provider_for(app, payment.provider)
    refund_id = refund_id_for(payment)
    actor = _Actor(payload["actor_id"], payload.get("actor_role")) if payload.get("actor_id") else None
    remote = payload.get("remote")
    detail = {
        "reason": payload["reason"],
        "amount_minor": amount,
        "actor": payload.get("actor_id"),
        "refund_id": refund_id,
        "attempt": job.attempts,
    }
    asked_before = await db.query_one(
        "SELECT 1 FROM payment_events WHERE payment_id = ? AND kind = 'refund_requested' LIMIT 1",
        [payment.id],
    )
    if asked_before is not None:
        status = await provider.refund_status(app, payment, refund_id)
        if status.state == "refunded":
            detail["resolved_by"] = "status_query"
            return await _record_refunded(app, payment, amount, status.ref, detail, actor, remote)
        if status.state == "pending":
            raise jobs.Retry("the provider is still processing the refund")
        # "none": the earlier attempt never reached the provider's books; ask again.
    now = time.time()
    await db.execute_write_fn(
        lambda d: record_event_sync(d, payment.id, "refund_requested", now=now, detail=detail)
    )
    try:
        ref = await provider.refund(app, payment, amount, refund_id)
    except Exception as exc:
        failed = {**detail, "error": f"{type(exc).__name__}: {exc}"[:200]}
        await db.execute_write_fn(
            lambda d: record_event_sync(d, payment.id, "refund_failed", now=time.time(), detail=failed)
        )
        raise
    return await _record_refunded(app, payment, amount, ref, detail, actor, remote)


async def _record_refunded(
    app: web.Application,
    payment: Payment,
    amount: int,
    ref: str | None,
    detail: dict[str, Any],
    actor: Any,
    remote: str | None,
) -> bool:
    done = time.time()

    def write(d: sqlite_utils.Database) -> bool:
        cur = d.execute(
            "UPDATE payments SET status = 'refunded', refunded_at = ?, refund_minor = refund_minor + ?"
            " WHERE id = ? AND status = 'paid'",
            [done, amount, payment.id],
        )
        if cur.rowcount != 1:
            return False
        record_event_sync(d, payment.id, "refunded", now=done, detail={**detail, "ref": ref})
        patient = d.execute("SELECT patient_id FROM visits WHERE id = ?", [payment.visit_id]).fetchone()
        audit.record(
            d,
            "payment.refund",
            "payment",
            payment.order_id,
            actor=actor,
            subject_user_id=patient[0] if patient else None,
            remote=remote,
            detail={"reason": detail["reason"], "amount_minor": amount},
            created=done,
        )
        return True

    return await app[keys.DB].execute_write_fn(write)


async def settle_refunds(app: web.Application, job_keys: list[str], *, wait: float) -> str | None:
    """Give queued refunds their first attempt now: "refunded" when all are done, else "pending"."""
    if not job_keys:
        return None
    outcomes = [await jobs.run_now(app, REFUND_JOB, key, wait=wait) for key in job_keys]
    return "refunded" if all(o.status == jobs.DONE for o in outcomes) else "pending"


async def request_refund(
    app: web.Application,
    payment_id: int,
    *,
    reason: str,
    actor: User | None,
    remote: str | None = None,
    wait: float = REFUND_WAIT_S,
) -> str:
    """Someone asks for a payment's refund: queue it (again, if it had died) and try it now.

    "refunded" when this call refunded it, "queued" when the job carries on (retrying, or run by
    someone else right now), "nothing" when there is nothing left to refund.
    """
    now = time.time()

    def write(d: sqlite_utils.Database) -> str | None:
        payment = _payment_sync(d, payment_id)
        if payment.status != "paid" or payment.amount_minor - payment.refund_minor <= 0:
            return None
        key = enqueue_refund_sync(d, payment.id, reason=reason, now=now, actor=actor, remote=remote)
        jobs.retry_sync(d, REFUND_JOB, key, now)  # a dead refund starts over when a person asks
        return key

    try:
        key = await app[keys.DB].execute_write_fn(write)
    except NotFound:
        return "nothing"
    if key is None:
        return "nothing"
    outcome = await jobs.run_now(app, REFUND_JOB, key, wait=wait)
    if outcome.ran and outcome.status == jobs.DONE:
        return "refunded" if outcome.result else "nothing"
    return "nothing" if outcome.status == jobs.DONE else "queued"


async def refund_payment(
    app: web.Application, payment_id: int, *, reason: str, actor: User | None, remote: str | None = None
) -> bool:
    """Refund one paid payment now if possible; True only for the call that refunded it."""
    return await request_refund(app, payment_id, reason=reason, actor=actor, remote=remote) == "refunded"


async def refund_visit(app: web.Application, visit_id: int, *, reason: str, actor: User | None) -> bool:
    """Fully refund every paid payment of a visit; whether this call refunded any money."""
    rows = await app[keys.DB].query(
        "SELECT id FROM payments WHERE visit_id = ? AND status = 'paid' ORDER BY id", [visit_id]
    )
    refunded = False
    for row in rows:
        refunded = await refund_payment(app, row["id"], reason=reason, actor=actor) or refunded
    return refunded


def register_jobs(runner: jobs.Runner) -> None:
    """Called by the app factory: payments' job kinds and sweep."""
    runner.register(REFUND_JOB, perform_refund)
    runner.add_sweep("refunds", sweep_refunds_sync)
