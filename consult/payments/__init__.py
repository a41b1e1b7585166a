"""Payments: the service around the provider interface a hospital's gateway plugs into.

The interface itself (``Payment``, ``Notice``, ``Outcome``, ``PaymentProvider``, ``Fulfilment``,
``CallbackRejected``, the app state) lives in ``consult.payments.gateway``, which the providers
import; it is re-exported here, so ``payments.Payment`` and friends keep working.

A payment belongs to one visit, in integer minor units. Every change to it is recorded in
``payment_events``; a gateway notification's id is UNIQUE there, so a replayed or duplicated
notification finds its own earlier row and changes nothing. Marking a payment paid and
confirming its visit happen in one write transaction; if the slot was lost meanwhile, the
payment stays paid and is refunded automatically, with an event saying why.
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
from consult.core import keys, metrics
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
)
from consult.payments.simulator import SimulatorProvider

log = logging.getLogger(__name__)

PROVIDER_NAMES = ("simulator", "cashier")
FRESHNESS_SECONDS = 300
ORDER_PREFIX = "C"


def make_state(fulfilment: Fulfilment, *, demo: bool = False) -> PaymentsState:
    providers: dict[str, PaymentProvider] = {"cashier": CashierProvider()}
    if demo:  # the simulator takes no money: it exists in demo mode only, callbacks included
        providers["simulator"] = SimulatorProvider()
    return PaymentsState(providers=providers, fulfilment=fulfilment)


async def payments_ctx(app: web.Application) -> AsyncIterator[None]:
    """``cleanup_ctx``: the providers, and the payment tasks cancelled and awaited at shutdown."""
    app[PAYMENTS] = make_state(app[FULFILMENT], demo=app[keys.SETTINGS].demo)
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
        " VALUES (?, ?, ?, ?, ?, 'pending', ?)",
        [visit_id, order_id, provider, amount, currency, now],
    )
    payment_id = int(cur.lastrowid or 0)
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
    """Mark paid and confirm the visit, in the caller's transaction. Idempotent per payment."""
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


async def record_rejection(
    app: web.Application, provider: str, exc: CallbackRejected, remote: str | None
) -> None:
    """A notification refused before it could be applied (bad signature, malformed body)."""
    now = time.time()
    order_id = exc.order_id if isinstance(exc.order_id, str) else None

    def write(db: sqlite_utils.Database) -> None:
        payment_id = None
        if order_id:
            row = db.execute("SELECT id FROM payments WHERE order_id = ?", [order_id[:64]]).fetchone()
            payment_id = row[0] if row else None
        detail = {"reason": exc.reason, "provider": provider, "remote": remote}
        detail.update({k: str(v)[:128] for k, v in exc.detail.items()})
        record_event_sync(db, payment_id, "rejected_callback", now=now, detail=detail)

    await app[keys.DB].execute_write_fn(write)


async def handle_notice(app: web.Application, provider: str, notice: Notice) -> Outcome:
    now = time.time()
    outcome = await app[keys.DB].execute_write_fn(
        lambda db: process_notice_sync(
            db, provider, notice, now=now, freshness=FRESHNESS_SECONDS, fulfilment=app[PAYMENTS].fulfilment
        )
    )
    await after_commit(app, outcome)
    return outcome


async def after_commit(app: web.Application, outcome: Outcome) -> None:
    """What follows a committed payment: the confirmation message, or an automatic refund."""
    if outcome.payment is None:
        return
    if outcome.result == "paid":  # paid in this transaction; "already" was counted the first time
        metrics.count(app, "payments")
    if outcome.confirmed:
        try:
            await app[PAYMENTS].fulfilment.after_confirmed(app, outcome.payment.visit_id)
        except Exception:  # the payment stands; a lost message must not turn it into an error
            log.exception("confirmation after payment %s failed", outcome.payment.order_id)
    if outcome.refund_reason:
        await refund_payment(app, outcome.payment.id, reason=outcome.refund_reason, actor=None)


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
    await after_commit(app, outcome)
    return outcome


# -- refunds ----------------------------------------------------------------------------------


async def refund_payment(
    app: web.Application, payment_id: int, *, reason: str, actor: User | None, remote: str | None = None
) -> bool:
    """Refund what is left of one paid payment. Idempotent: False when nothing was refunded."""
    db = app[keys.DB]
    state = app[PAYMENTS]
    async with state.refund_lock:  # one refund at a time: a second caller sees the first's result
        row = await db.query_one(
            f"SELECT {PAYMENT_COLUMNS} FROM payments WHERE id = ?",  # noqa: S608
            [payment_id],
        )
        if row is None:
            return False
        payment = Payment.from_row(row)
        amount = payment.amount_minor - payment.refund_minor
        if payment.status != "paid" or amount <= 0:
            return False
        actor_detail = {"reason": reason, "amount_minor": amount, "actor": actor.id if actor else None}
        now = time.time()
        await db.execute_write_fn(
            lambda d: record_event_sync(d, payment.id, "refund_requested", now=now, detail=actor_detail)
        )
        try:
            ref = await provider_for(app, payment.provider).refund(app, payment, amount)
        except Exception as exc:
            log.exception("refund of %s failed", payment.order_id)
            failed = {**actor_detail, "error": str(exc)[:200]}
            await db.execute_write_fn(
                lambda d: record_event_sync(d, payment.id, "refund_failed", now=time.time(), detail=failed)
            )
            return False
        done = time.time()

        def write(d: sqlite_utils.Database) -> bool:
            cur = d.execute(
                "UPDATE payments SET status = 'refunded', refunded_at = ?, refund_minor = refund_minor + ?"
                " WHERE id = ? AND status = 'paid'",
                [done, amount, payment.id],
            )
            if cur.rowcount != 1:
                return False
            record_event_sync(d, payment.id, "refunded", now=done, detail={**actor_detail, "ref": ref})
            patient = d.execute("SELECT patient_id FROM visits WHERE id = ?", [payment.visit_id]).fetchone()
            audit.record(
                d,
                "payment.refund",
                "payment",
                payment.order_id,
                actor=actor,
                subject_user_id=patient[0] if patient else None,
                remote=remote,
                detail={"reason": reason, "amount_minor": amount},
                created=done,
            )
            return True

        return await db.execute_write_fn(write)


async def refund_visit(app: web.Application, visit_id: int, *, reason: str, actor: User | None) -> bool:
    """Fully refund every paid payment of a visit; whether any money was refunded."""
    rows = await app[keys.DB].query(
        "SELECT id FROM payments WHERE visit_id = ? AND status = 'paid' ORDER BY id", [visit_id]
    )
    refunded = False
    for row in rows:
        refunded = await refund_payment(app, row["id"], reason=reason, actor=actor) or refunded
    return refunded
