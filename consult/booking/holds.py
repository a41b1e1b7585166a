"""Holding a slot and confirming it once paid; holds expiring; the background reaper.

Every change runs inside the one writer's write transaction (the ``*_sync`` functions take the
writer's handle); a hold's skips the cluster's write lock on PostgreSQL and takes keyed locks
instead (see `hold_sync`). The partial UNIQUE index ``visits_one_per_slot`` is what
guarantees a slot is never booked twice, on both engines: an insert or move onto a taken slot raises
``IntegrityError``, which becomes a ``Conflict`` with a message a patient understands. The slot
checks here are shared with ``consult.booking.changes`` (cancel, reschedule).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import sqlite_utils
from aiohttp import web

from consult.audit import chain as audit
from consult.booking import schedules, slotcache
from consult.booking.notices import REMINDER_DAY, REMINDER_STEP, enqueue_notice_sync, reminders_due_sync
from consult.core import jobs, keys, leader
from consult.core.db import IntegrityError, lock_keys
from consult.core.errors import BadRequest, Conflict, NotFound
from consult.core.formatting import to_local
from consult.core.i18n import _
from consult.core.ids import new_public_id

log = logging.getLogger("consult.booking")  # the JSON logs' "logger" field, as before the split


def taken_message() -> str:
    return _("This time was just taken; please pick another.")


def lost_slot_message() -> str:
    return _(
        "This time was taken by someone else while the payment was pending; the payment will be refunded."
    )


def expire_holds_sync(db: sqlite_utils.Database, now: float) -> int:
    """Unpaid holds past their time become ``expired``, which frees their slots."""
    cur = db.execute(
        "UPDATE visits SET status = 'expired', updated = ? WHERE status = 'held' AND hold_expires < ?",
        [now, now],
    )
    return cur.rowcount


def patient_busy(db: sqlite_utils.Database, patient_id: int, starts: int, ends: int, exclude: int) -> bool:
    return (
        db.execute(
            "SELECT 1 FROM visits WHERE patient_id = ? AND status IN ('held', 'confirmed')"
            " AND starts_at < ? AND starts_at > ? AND ends_at > ? AND id != ? LIMIT 1",
            [patient_id, ends, starts - schedules.MAX_VISIT_S, starts, exclude],
        ).fetchone()
        is not None
    )


def doctor_busy(db: sqlite_utils.Database, doctor_id: int, starts: int, ends: int, exclude: int) -> bool:
    """An active visit overlapping [starts, ends) with another start (left from an older schedule)."""
    return (
        db.execute(
            "SELECT 1 FROM visits WHERE doctor_id = ? AND status IN ('held', 'confirmed', 'completed')"
            " AND starts_at < ? AND starts_at > ? AND ends_at > ? AND id != ? LIMIT 1",
            [doctor_id, ends, starts - schedules.MAX_VISIT_S, starts, exclude],
        ).fetchone()
        is not None
    )


def check_slot(
    db: sqlite_utils.Database,
    doctor_id: int,
    starts_at: int,
    tz: str,
    now: float,
    lead_s: float,
    *,
    minutes: int | None = None,
) -> schedules.Slot:
    if starts_at < now + lead_s:
        raise BadRequest(_("This time has already passed or starts too soon; please pick a later time."))
    slot = schedules.find_slot(db, doctor_id, starts_at, tz, minutes)
    if slot is None:
        raise BadRequest(
            _("This is not one of the doctor's bookable times; please pick a time from the list.")
        )
    return slot


def audit_visit(
    db: sqlite_utils.Database, actor: Any, action: str, visit: Any, remote: str | None, **detail
) -> None:
    audit.record(
        db,
        action,
        "visit",
        visit["id"],
        actor=actor,
        subject_user_id=visit["patient_id"],
        remote=remote,
        detail=detail,
    )


def hold_sync(
    db: sqlite_utils.Database,
    *,
    patient: Any,
    doctor_id: int,
    department_id: int | None,
    starts_at: int,
    tz: str,
    hold_s: float,
    lead_s: float,
    now: float,
    remote: str | None = None,
) -> dict:
    """Hold one slot for a patient while they upload reports and pay; returns the new visit.

    Every hold of a rush runs here, one after another in the writer's transaction, so it asks
    the database as little as it can: the doctor with their department, the schedule's slot,
    whether the patient or the doctor is busy then (a hold past its time counts as free, as on the
    slot page), the insert and its audit entry. The UNIQUE index stays the guarantee.

    On PostgreSQL `hold` runs this without the cluster's write lock (``exclusive=False``): holds
    of different doctors go ahead side by side on every node. What the global lock gave it is
    replaced thus:

    - the doctor's and the patient's keyed locks (`lock_keys`, doctor then patient, first thing):
      two holds of one doctor, or of one patient, run one after the other, so the busy checks
      (another visit of the doctor overlapping at another start, left from an older schedule's
      length; the patient's other visit then) see each other's inserts (READ COMMITTED: each
      statement reads what was committed before it, and the lock is released only at commit);
    - the UNIQUE index, checked by PostgreSQL across every transaction (an insert onto a slot
      another transaction just inserted waits for it, then fails): one of two holds of a slot
      wins, the other gets the "taken" ``Conflict`` (pg.py runs the insert under a savepoint);
    - `_expire_slot` marks only a hold of this very slot whose time is past; whoever changes it
      concurrently (the reaper, a payment confirming it) holds its row lock, the UPDATE waits and
      re-reads the row, and if it was confirmed meanwhile nothing is expired and the hold is refused;
    - the audit entry appends under the audit chain's own lock (audit/chain.append);
    - writes that still take the cluster lock do not wait for these keys: a payment's
      `confirm_paid_sync` (it takes the same keys after the cluster lock, then re-checks with the
      UNIQUE index), a reschedule (likewise), a cancellation (frees a slot only); a doctor
      deactivated at the same moment may still get a hold committed just after, as one committed
      just before would have been;
    - the slot cache (`slotcache`) is per process and only a hint: `hold` tells it after commit.

    On SQLite the one writer serialises everything and the keyed locks are nothing."""
    lock_keys(db, ("doctor", doctor_id), ("patient", patient.id))
    doc = db.execute(
        "SELECT d.fee_minor, d.currency, d.active, d.visit_minutes, u.active AS user_active,"
        " (SELECT dd.department_id FROM doctor_departments dd JOIN departments dep"
        " ON dep.id = dd.department_id WHERE dd.doctor_id = d.user_id AND dep.active = 1"
        " AND (CAST(?1 AS INTEGER) IS NULL OR dd.department_id = ?1) ORDER BY dep.sort, dep.id LIMIT 1)"
        " AS department_id"
        " FROM doctors d JOIN users u ON u.id = d.user_id WHERE d.user_id = ?2",
        [department_id, doctor_id],
    ).fetchone()
    if doc is None or not (doc["active"] and doc["user_active"]):
        raise NotFound(_("This doctor is not taking bookings."))
    if doc["department_id"] is None:
        raise BadRequest(_("This doctor does not work in that department."))
    department_id = doc["department_id"]
    slot = check_slot(db, doctor_id, starts_at, tz, now, lead_s, minutes=int(doc["visit_minutes"]))
    busy = db.execute(
        _BUSY_BOTH,
        {
            "patient": patient.id,
            "doctor": doctor_id,
            "starts": slot.starts_at,
            "ends": slot.ends_at,
            "earliest": slot.starts_at - schedules.MAX_VISIT_S,
            "now": now,
        },
    ).fetchone()
    if busy[0]:
        raise Conflict(
            _("You already have a visit at this time. Pick another time or cancel that visit first.")
        )
    if busy[1]:
        raise Conflict(taken_message(), code="slot_taken")
    visit = {
        "public_id": new_public_id(),
        "patient_id": patient.id,
        "doctor_id": doctor_id,
        "department_id": department_id,
        "starts_at": slot.starts_at,
        "ends_at": slot.ends_at,
        "status": "held",
        "hold_expires": now + hold_s,
        "fee_minor": doc["fee_minor"],
        "currency": doc["currency"],
        "created": now,
        "updated": now,
        "call_nonce": secrets.token_urlsafe(16),
    }
    try:
        cur = _insert_visit(db, visit)
    except IntegrityError:
        # A hold on this very slot that ran out but is not marked expired yet: mark it, try once more.
        if not _expire_slot(db, doctor_id, slot.starts_at, now):
            raise Conflict(taken_message(), code="slot_taken") from None
        try:
            cur = _insert_visit(db, visit)
        except IntegrityError:
            raise Conflict(taken_message(), code="slot_taken") from None
    visit["id"] = cur.fetchone()[0]
    audit_visit(db, patient, "visit.hold", visit, remote, starts_at=slot.starts_at, doctor_id=doctor_id)
    return visit


# An active visit of one patient (or doctor) overlapping [starts, ends); a hold past its time is
# not active (hold_sync no longer marks every expired hold first; the reaper does that).
_BUSY = (
    "SELECT 1 FROM visits WHERE {who} = :{param} AND status IN {active}"
    " AND starts_at < :ends AND starts_at > :earliest AND ends_at > :starts"
    " AND NOT (status = 'held' AND hold_expires < :now) LIMIT 1"
)
_BUSY_BOTH = "SELECT ({}), ({})".format(
    _BUSY.format(who="patient_id", param="patient", active="('held', 'confirmed')"),
    _BUSY.format(who="doctor_id", param="doctor", active="('held', 'confirmed', 'completed')"),
)


def _insert_visit(db: sqlite_utils.Database, visit: dict) -> Any:
    return db.execute(
        "INSERT INTO visits (public_id, patient_id, doctor_id, department_id, starts_at, ends_at, status,"
        " hold_expires, fee_minor, currency, created, updated, call_nonce) VALUES (:public_id,"
        " :patient_id, :doctor_id, :department_id, :starts_at, :ends_at, :status, :hold_expires,"
        " :fee_minor, :currency, :created, :updated, :call_nonce) RETURNING id",
        visit,
    )


def _expire_slot(db: sqlite_utils.Database, doctor_id: int, starts_at: int, now: float) -> bool:
    cur = db.execute(
        "UPDATE visits SET status = 'expired', updated = ? WHERE doctor_id = ? AND starts_at = ?"
        " AND status = 'held' AND hold_expires < ?",
        [now, doctor_id, starts_at, now],
    )
    return cur.rowcount > 0


def confirm_paid_sync(db: sqlite_utils.Database, visit_id: int, now: float) -> None:
    """Called inside the payment's write transaction once the money is in: held → confirmed.

    A hold that expired still confirms while its slot is free (the UNIQUE index re-checks); if
    someone else has taken the slot meanwhile, or the visit was cancelled, raises ``Conflict`` and
    the caller refunds. Confirming a confirmed visit again changes nothing.
    """
    v = db.execute("SELECT doctor_id, patient_id FROM visits WHERE id = ?", [visit_id]).fetchone()
    if v is None:
        raise NotFound(_("No such visit."))
    # The checks below read what concurrent holds (which skip the cluster lock) write: take their keys.
    lock_keys(db, ("doctor", v["doctor_id"]), ("patient", v["patient_id"]))
    expire_holds_sync(db, now)
    v = db.execute("SELECT * FROM visits WHERE id = ?", [visit_id]).fetchone()
    if v["status"] in ("confirmed", "completed"):
        return
    if v["status"] not in ("held", "expired"):
        raise Conflict(_("This visit was cancelled and cannot be confirmed."), code="visit_cancelled")
    if patient_busy(db, v["patient_id"], v["starts_at"], v["ends_at"], exclude=visit_id):
        raise Conflict(_("You already have another visit at this time."), code="patient_busy")
    try:
        db.execute(
            "UPDATE visits SET status = 'confirmed', hold_expires = NULL, updated = ?,"
            " reminder_sent = CASE WHEN starts_at - ? <= 86400 THEN ? ELSE 0 END WHERE id = ?",
            [now, now, REMINDER_DAY, visit_id],
        )
    except IntegrityError:
        raise Conflict(lost_slot_message(), code="slot_taken") from None
    if doctor_busy(db, v["doctor_id"], v["starts_at"], v["ends_at"], exclude=visit_id):
        raise Conflict(lost_slot_message(), code="slot_taken")
    audit_visit(db, None, "visit.confirm", v, None, was=v["status"])


def confirm_and_notify_sync(db: sqlite_utils.Database, visit_id: int, now: float) -> None:
    """The payment's fulfilment: confirm, and queue the confirmation message in the same transaction."""
    confirm_paid_sync(db, visit_id, now)
    enqueue_notice_sync(db, {"id": visit_id}, "confirmed", now=now)


async def hold(
    app: web.Application,
    patient: Any,
    *,
    doctor_id: int,
    department_id: int | None,
    starts_at: int,
    remote: str | None = None,
    now: float | None = None,
) -> dict:
    settings = app[keys.SETTINGS]
    now = time.time() if now is None else now
    visit = await app[keys.DB].execute_write_fn(
        lambda db: hold_sync(
            db,
            patient=patient,
            doctor_id=doctor_id,
            department_id=department_id,
            starts_at=starts_at,
            tz=settings.timezone,
            hold_s=settings.hold_minutes * 60,
            lead_s=settings.booking_lead_minutes * 60,
            now=now,
            remote=remote,
        ),
        exclusive=False,  # hold_sync takes its keyed locks (see there); the UNIQUE index decides
    )
    day = to_local(visit["starts_at"], settings.timezone).date()  # the day whose panels change
    slotcache.took(app, doctor_id, visit["starts_at"], visit["hold_expires"], day)
    return visit


async def housekeeping(app: web.Application, now: float | None = None) -> dict[str, int]:
    """Release expired holds and queue due reminders (the job worker sends them); the loop calls this."""
    now = time.time() if now is None else now
    db = app[keys.DB]
    expired = await db.execute_write_fn(lambda d: expire_holds_sync(d, now))
    if expired:
        slotcache.changed(app)
    reminders = 0
    while True:  # in steps: the loop runs between them
        queued = await db.execute_write_fn(lambda d: reminders_due_sync(d, now))
        reminders += queued
        if queued:
            jobs.wake(app)  # the first are sent while the rest are queued
        if queued < REMINDER_STEP:  # none left (every step that goes on queued that many more)
            return {"expired": expired, "reminders": reminders}


async def hold_reaper(app: web.Application) -> AsyncIterator[None]:
    """``cleanup_ctx``: a background loop that expires holds and queues reminders; cancelled on exit."""

    async def loop() -> None:
        interval = max(0.05, float(app[keys.SETTINGS].reaper_interval_seconds))
        while True:
            await asyncio.sleep(interval)
            if not leader.leads(app):
                continue  # another node runs it
            try:
                await housekeeping(app)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("booking housekeeping failed")

    task = asyncio.create_task(loop(), name="booking-housekeeping")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
