"""Changing a booked visit: cancelling it (with the refund) and moving it to another slot.

The ``*_sync`` writes run in the one writer's transaction and share the slot checks of
``consult.booking.holds``. In that same transaction they queue what must follow as durable jobs:
the refund of every paid payment (``consult.payments``) and the message to the patient
(``consult.booking.notices``). After the commit, ``cancel`` gives the refunds a first attempt and
says honestly whether the money is back yet.
"""

from __future__ import annotations

import secrets
import sqlite3
import time
from typing import Any

import sqlite_utils
from aiohttp import web

from consult import payments
from consult.booking import slotcache
from consult.booking.holds import (
    audit_visit,
    check_slot,
    doctor_busy,
    expire_holds_sync,
    patient_busy,
    taken_message,
)
from consult.booking.notices import enqueue_notice_sync
from consult.booking.visits import OPEN_STATUSES, visit_access
from consult.core import jobs, keys
from consult.core.db import IntegrityError, lock_keys
from consult.core.errors import BadRequest, Conflict, Forbidden, NotFound
from consult.core.i18n import _


def _load_for_change(db: sqlite_utils.Database, visit_id: int, actor: Any) -> sqlite3.Row:
    row = db.execute("SELECT * FROM visits WHERE id = ?", [visit_id]).fetchone()
    if row is None or not visit_access(actor, row):
        raise NotFound(_("No such visit."))
    return row


def cancel_sync(
    db: sqlite_utils.Database,
    *,
    visit_id: int,
    actor: Any,
    now: float,
    free_s: float,
    reason: str = "",
    remote: str | None = None,
) -> dict:
    """Cancel a visit; returns ``{"visit": ..., "refund": bool, "refund_jobs": [job keys]}``.

    ``refund`` says the cancellation is one that refunds (the visit was confirmed or paid); the
    refund of every paid payment is queued here, with the patient's message, in this transaction.
    A patient may cancel an unpaid hold at any time and a confirmed visit until ``free_s`` before it
    starts; the visit's doctor and admins may always cancel, and their cancellations always refund.
    """
    v = _load_for_change(db, visit_id, actor)
    if v["status"] not in OPEN_STATUSES:
        raise Conflict(_("This visit can no longer be cancelled."), code="not_cancellable")
    if actor.role == "patient" and v["status"] == "confirmed" and v["starts_at"] - now < free_s:
        raise Forbidden(
            _(
                "Visits can be cancelled only until %(hours)d hours before they start."
                " Please contact the clinic."
            )
            % {"hours": round(free_s / 3600)},
            code="too_late_to_cancel",
        )
    db.execute(
        "UPDATE visits SET status = 'cancelled', cancelled_by = ?, cancel_reason = ?, updated = ?,"
        " needs_reschedule = 0, hold_expires = NULL WHERE id = ?",
        [actor.role, reason[:500], now, visit_id],
    )
    paid = db.execute(
        "SELECT 1 FROM payments WHERE visit_id = ? AND status = 'paid' LIMIT 1", [visit_id]
    ).fetchone()
    refund = v["status"] == "confirmed" or paid is not None
    audit_visit(db, actor, "visit.cancel", v, remote, was=v["status"], reason=reason[:500], refund=refund)
    refund_jobs = payments.enqueue_visit_refunds_sync(
        db, visit_id, reason=reason or f"cancelled by {actor.role}", now=now, actor=actor
    )
    enqueue_notice_sync(db, v, "cancelled", now=now)
    return {"visit": {**dict(v), "status": "cancelled"}, "refund": refund, "refund_jobs": refund_jobs}


def reschedule_sync(
    db: sqlite_utils.Database,
    *,
    visit_id: int,
    actor: Any,
    new_starts_at: int,
    tz: str,
    now: float,
    free_s: float,
    lead_s: float,
    remote: str | None = None,
) -> dict:
    """Move a visit to another free slot of the same doctor, atomically; old call links stop working."""
    v = _load_for_change(db, visit_id, actor)
    # The busy checks read what concurrent holds (which skip the cluster lock) write: take their keys.
    lock_keys(db, ("doctor", v["doctor_id"]), ("patient", v["patient_id"]))
    if v["status"] not in OPEN_STATUSES:
        raise Conflict(_("This visit can no longer be moved."), code="not_movable")
    if actor.role == "patient" and v["status"] == "confirmed" and v["starts_at"] - now < free_s:
        raise Forbidden(
            _("Visits can be moved only until %(hours)d hours before they start. Please contact the clinic.")
            % {"hours": round(free_s / 3600)},
            code="too_late_to_move",
        )
    if new_starts_at == v["starts_at"]:
        raise BadRequest(_("That is already the time of this visit."))
    slot = check_slot(db, v["doctor_id"], new_starts_at, tz, now, lead_s)
    expire_holds_sync(db, now)
    if patient_busy(db, v["patient_id"], slot.starts_at, slot.ends_at, exclude=visit_id):
        raise Conflict(
            _("You already have a visit at this time. Pick another time or cancel that visit first.")
        )
    try:
        db.execute(
            "UPDATE visits SET starts_at = ?, ends_at = ?, call_nonce = ?, reminder_sent = 0,"
            " needs_reschedule = 0, updated = ? WHERE id = ?",
            [slot.starts_at, slot.ends_at, secrets.token_urlsafe(16), now, visit_id],
        )
    except IntegrityError:
        raise Conflict(taken_message(), code="slot_taken") from None
    if doctor_busy(db, v["doctor_id"], slot.starts_at, slot.ends_at, exclude=visit_id):
        raise Conflict(taken_message(), code="slot_taken")
    audit_visit(db, actor, "visit.reschedule", v, remote, old=v["starts_at"], new=slot.starts_at)
    row = db.execute("SELECT * FROM visits WHERE id = ?", [visit_id]).fetchone()
    if row["status"] == "confirmed":
        enqueue_notice_sync(db, row, "moved", now=now)
    return dict(row)


async def cancel(
    app: web.Application,
    visit_id: int,
    actor: Any,
    *,
    reason: str = "",
    remote: str | None = None,
    now: float | None = None,
) -> dict:
    """Cancel; then give the queued refunds a first attempt and say where the money is.

    ``refund_state``: None (nothing was paid), "refunded" (every payment is back), or "pending"
    (the refund job carries on: the provider failed or is slow, and it will be retried).
    """
    settings = app[keys.SETTINGS]
    now = time.time() if now is None else now
    result = await app[keys.DB].execute_write_fn(
        lambda db: cancel_sync(
            db,
            visit_id=visit_id,
            actor=actor,
            now=now,
            free_s=settings.cancel_free_hours * 3600,
            reason=reason,
            remote=remote,
        )
    )
    slotcache.changed(app)
    jobs.wake(app)  # the patient's message
    result["refund_state"] = await payments.settle_refunds(
        app, result["refund_jobs"], wait=payments.REFUND_WAIT_S
    )
    result["refunded"] = result["refund_state"] == "refunded"
    return result


async def reschedule(
    app: web.Application,
    visit_id: int,
    actor: Any,
    new_starts_at: int,
    *,
    remote: str | None = None,
    now: float | None = None,
) -> dict:
    settings = app[keys.SETTINGS]
    now = time.time() if now is None else now
    visit = await app[keys.DB].execute_write_fn(
        lambda db: reschedule_sync(
            db,
            visit_id=visit_id,
            actor=actor,
            new_starts_at=new_starts_at,
            tz=settings.timezone,
            now=now,
            free_s=settings.cancel_free_hours * 3600,
            lead_s=settings.booking_lead_minutes * 60,
            remote=remote,
        )
    )
    slotcache.changed(app)
    if visit["status"] == "confirmed":
        jobs.wake(app)  # the patient's message, queued with the move
    return visit
