"""Booking a visit: hold a slot, confirm it once paid, cancel, reschedule, remind.

Every change runs inside the one writer's ``BEGIN IMMEDIATE`` transaction (the ``*_sync``
functions take the writer's handle). The partial UNIQUE index ``visits_one_per_slot`` is what
guarantees a slot is never booked twice: an insert or move onto a taken slot raises
``IntegrityError``, which becomes a ``Conflict`` with a message a patient understands.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import sqlite_utils
from aiohttp import web

from consult import audit, catalogue, i18n, keys, schedules
from consult.errors import BadRequest, Conflict, Forbidden, NotFound
from consult.formatting import to_local
from consult.i18n import _
from consult.notify import Message

log = logging.getLogger(__name__)

OPEN_STATUSES = ("held", "confirmed")
REMINDER_DAY, REMINDER_HOUR = 1, 2  # values of visits.reminder_sent


def taken_message() -> str:
    return _("This time was just taken; please pick another.")


def lost_slot_message() -> str:
    return _(
        "This time was taken by someone else while the payment was pending; the payment will be refunded."
    )


# -- reading --------------------------------------------------------------------------

VISIT_SELECT = (
    "SELECT v.*, du.display_name AS doctor_name, pu.display_name AS patient_name,"
    " pu.phone AS patient_phone, pu.locale AS patient_locale,"
    " dep.name_zh AS department_name_zh, dep.name_en AS department_name_en,"
    " d.title_zh AS doctor_title_zh, d.title_en AS doctor_title_en"
    " FROM visits v JOIN users du ON du.id = v.doctor_id JOIN users pu ON pu.id = v.patient_id"
    " JOIN departments dep ON dep.id = v.department_id JOIN doctors d ON d.user_id = v.doctor_id"
)


def get_visit_sync(
    db: sqlite_utils.Database, *, public_id: str | None = None, visit_id: int | None = None
) -> dict | None:
    if public_id is not None:
        row = db.execute(VISIT_SELECT + " WHERE v.public_id = ?", [public_id]).fetchone()
    else:
        row = db.execute(VISIT_SELECT + " WHERE v.id = ?", [visit_id]).fetchone()
    return None if row is None else dict(row)


def visit_view(visit: dict, locale: str) -> dict:
    """The visit with its department and doctor title in the reader's language."""
    out = dict(visit)
    if "department_name_zh" in visit:
        zh, en = visit["department_name_zh"], visit["department_name_en"]
        out["department_name"] = (zh or en) if locale == "zh_CN" else (en or zh)
    if "doctor_title_zh" in visit:
        zh, en = visit["doctor_title_zh"] or "", visit["doctor_title_en"] or ""
        out["doctor_title"] = (zh or en) if locale == "zh_CN" else (en or zh)
    return out


def visit_access(user: Any, visit_row: Any) -> bool:
    """Who may see a visit: its patient, its doctor, and admins."""
    if user is None:
        return False
    if user.role == "admin":
        return True
    if user.role == "patient":
        return visit_row["patient_id"] == user.id
    if user.role == "doctor":
        return visit_row["doctor_id"] == user.id
    return False


def can_cancel(user: Any, visit: Any, now: float, free_s: float) -> bool:
    if not visit_access(user, visit) or visit["status"] not in OPEN_STATUSES:
        return False
    if user.role == "patient":
        return visit["status"] == "held" or visit["starts_at"] - now >= free_s
    return True


def can_reschedule(user: Any, visit: Any, now: float, free_s: float) -> bool:
    if not visit_access(user, visit) or visit["status"] not in OPEN_STATUSES:
        return False
    if user.role == "patient":
        return visit["status"] == "held" or visit["starts_at"] - now >= free_s
    return True


# -- writing --------------------------------------------------------------------------


def expire_holds_sync(db: sqlite_utils.Database, now: float) -> int:
    """Unpaid holds past their time become ``expired``, which frees their slots."""
    cur = db.execute(
        "UPDATE visits SET status = 'expired', updated = ? WHERE status = 'held' AND hold_expires < ?",
        [now, now],
    )
    return cur.rowcount


def _patient_busy(db: sqlite_utils.Database, patient_id: int, starts: int, ends: int, exclude: int) -> bool:
    return (
        db.execute(
            "SELECT 1 FROM visits WHERE patient_id = ? AND status IN ('held', 'confirmed')"
            " AND starts_at < ? AND starts_at > ? AND ends_at > ? AND id != ? LIMIT 1",
            [patient_id, ends, starts - schedules.MAX_VISIT_S, starts, exclude],
        ).fetchone()
        is not None
    )


def _doctor_busy(db: sqlite_utils.Database, doctor_id: int, starts: int, ends: int, exclude: int) -> bool:
    """An active visit overlapping [starts, ends) with another start (left from an older schedule)."""
    return (
        db.execute(
            "SELECT 1 FROM visits WHERE doctor_id = ? AND status IN ('held', 'confirmed', 'completed')"
            " AND starts_at < ? AND starts_at > ? AND ends_at > ? AND id != ? LIMIT 1",
            [doctor_id, ends, starts - schedules.MAX_VISIT_S, starts, exclude],
        ).fetchone()
        is not None
    )


def _check_slot(
    db: sqlite_utils.Database, doctor_id: int, starts_at: int, tz: str, now: float, lead_s: float
) -> schedules.Slot:
    if starts_at < now + lead_s:
        raise BadRequest(_("This time has already passed or starts too soon; please pick a later time."))
    slot = schedules.find_slot(db, doctor_id, starts_at, tz)
    if slot is None:
        raise BadRequest(
            _("This is not one of the doctor's bookable times; please pick a time from the list.")
        )
    return slot


def _audit(
    db: sqlite_utils.Database, actor: Any, action: str, visit: Any, remote: str | None, **detail
) -> None:
    audit.append(
        db,
        audit.AuditEntry(
            action=action,
            object_type="visit",
            object_id=str(visit["id"]),
            actor_id=getattr(actor, "id", None),
            actor_role=getattr(actor, "role", None) or "system",
            remote=remote,
            subject_user_id=visit["patient_id"],
            detail=detail,
        ),
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
    """Hold one slot for a patient while they upload reports and pay; returns the new visit."""
    doc = db.execute(
        "SELECT d.fee_minor, d.currency, d.active, u.active AS user_active FROM doctors d"
        " JOIN users u ON u.id = d.user_id WHERE d.user_id = ?",
        [doctor_id],
    ).fetchone()
    if doc is None or not (doc["active"] and doc["user_active"]):
        raise NotFound(_("This doctor is not taking bookings."))
    deps = [
        r[0]
        for r in db.execute(
            "SELECT dd.department_id FROM doctor_departments dd JOIN departments dep"
            " ON dep.id = dd.department_id WHERE dd.doctor_id = ? AND dep.active = 1"
            " ORDER BY dep.sort, dep.id",
            [doctor_id],
        )
    ]
    if department_id is None and deps:
        department_id = deps[0]
    if department_id not in deps:
        raise BadRequest(_("This doctor does not work in that department."))
    slot = _check_slot(db, doctor_id, starts_at, tz, now, lead_s)
    expire_holds_sync(db, now)
    if _patient_busy(db, patient.id, slot.starts_at, slot.ends_at, exclude=0):
        raise Conflict(
            _("You already have a visit at this time. Pick another time or cancel that visit first.")
        )
    visit = {
        "public_id": secrets.token_urlsafe(16),
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
        cur = db.execute(
            "INSERT INTO visits (public_id, patient_id, doctor_id, department_id, starts_at, ends_at, status,"
            " hold_expires, fee_minor, currency, created, updated, call_nonce) VALUES (:public_id,"
            " :patient_id, :doctor_id, :department_id, :starts_at, :ends_at, :status, :hold_expires,"
            " :fee_minor, :currency, :created, :updated, :call_nonce)",
            visit,
        )
    except sqlite3.IntegrityError:
        raise Conflict(taken_message(), code="slot_taken") from None
    visit["id"] = cur.lastrowid
    if _doctor_busy(db, doctor_id, slot.starts_at, slot.ends_at, exclude=visit["id"]):
        raise Conflict(taken_message(), code="slot_taken")  # rolls the insert back
    _audit(db, patient, "visit.hold", visit, remote, starts_at=slot.starts_at, doctor_id=doctor_id)
    return visit


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
    """Cancel a visit; returns ``{"visit": ..., "refund": bool}`` (refund when anything was paid).

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
    _audit(db, actor, "visit.cancel", v, remote, was=v["status"], reason=reason[:500], refund=refund)
    return {"visit": {**dict(v), "status": "cancelled"}, "refund": refund}


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
    slot = _check_slot(db, v["doctor_id"], new_starts_at, tz, now, lead_s)
    expire_holds_sync(db, now)
    if _patient_busy(db, v["patient_id"], slot.starts_at, slot.ends_at, exclude=visit_id):
        raise Conflict(
            _("You already have a visit at this time. Pick another time or cancel that visit first.")
        )
    try:
        db.execute(
            "UPDATE visits SET starts_at = ?, ends_at = ?, call_nonce = ?, reminder_sent = 0,"
            " needs_reschedule = 0, updated = ? WHERE id = ?",
            [slot.starts_at, slot.ends_at, secrets.token_urlsafe(16), now, visit_id],
        )
    except sqlite3.IntegrityError:
        raise Conflict(taken_message(), code="slot_taken") from None
    if _doctor_busy(db, v["doctor_id"], slot.starts_at, slot.ends_at, exclude=visit_id):
        raise Conflict(taken_message(), code="slot_taken")
    _audit(db, actor, "visit.reschedule", v, remote, old=v["starts_at"], new=slot.starts_at)
    row = db.execute("SELECT * FROM visits WHERE id = ?", [visit_id]).fetchone()
    return dict(row)


def confirm_paid_sync(db: sqlite_utils.Database, visit_id: int, now: float) -> None:
    """Called inside the payment's write transaction once the money is in: held → confirmed.

    A hold that expired still confirms while its slot is free (the UNIQUE index re-checks); if
    someone else has taken the slot meanwhile, or the visit was cancelled, raises ``Conflict`` and
    the caller refunds. Confirming a confirmed visit again changes nothing.
    """
    expire_holds_sync(db, now)
    v = db.execute("SELECT * FROM visits WHERE id = ?", [visit_id]).fetchone()
    if v is None:
        raise NotFound(_("No such visit."))
    if v["status"] in ("confirmed", "completed"):
        return
    if v["status"] not in ("held", "expired"):
        raise Conflict(_("This visit was cancelled and cannot be confirmed."), code="visit_cancelled")
    if _patient_busy(db, v["patient_id"], v["starts_at"], v["ends_at"], exclude=visit_id):
        raise Conflict(_("You already have another visit at this time."), code="patient_busy")
    try:
        db.execute(
            "UPDATE visits SET status = 'confirmed', hold_expires = NULL, updated = ?,"
            " reminder_sent = CASE WHEN starts_at - ? <= 86400 THEN ? ELSE 0 END WHERE id = ?",
            [now, now, REMINDER_DAY, visit_id],
        )
    except sqlite3.IntegrityError:
        raise Conflict(lost_slot_message(), code="slot_taken") from None
    if _doctor_busy(db, v["doctor_id"], v["starts_at"], v["ends_at"], exclude=visit_id):
        raise Conflict(lost_slot_message(), code="slot_taken")
    _audit(db, None, "visit.confirm", v, None, was=v["status"])


def reminders_due_sync(db: sqlite_utils.Database, now: float) -> list[dict]:
    """Mark and return confirmed visits due a reminder (a day before, then an hour before)."""
    due: list[dict] = []
    rows = db.execute(
        VISIT_SELECT + " WHERE v.status = 'confirmed' AND v.starts_at > ? AND v.starts_at <= ?"
        " AND v.reminder_sent < ?",
        [now, now + 86400, REMINDER_HOUR],
    ).fetchall()
    for r in rows:
        level = REMINDER_HOUR if r["starts_at"] - now <= 3600 else REMINDER_DAY
        if r["reminder_sent"] >= level:
            continue
        db.execute("UPDATE visits SET reminder_sent = ? WHERE id = ?", [level, r["id"]])
        due.append({**dict(r), "level": level})
    return due


# -- async entry points ---------------------------------------------------------------


def base_url(settings: Any, request: web.Request | None = None) -> str:
    """Absolute origin for links sent to people: the configured one, else the request's own."""
    if settings.public_url:
        return settings.public_url.rstrip("/")
    if request is not None:
        return str(request.url.origin())
    return f"{'https' if settings.tls else 'http'}://localhost:{settings.port}"


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
    return await app[keys.DB].execute_write_fn(
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
        )
    )


async def _refund(app: web.Application, visit_id: int, reason: str, actor: Any) -> bool:
    try:
        from consult import payments  # written by the payments work; may not exist yet
    except ImportError:
        payments = None
    refund_visit = getattr(payments, "refund_visit", None)
    if refund_visit is None:
        log.warning("visit %s needs a refund but no refund function is available", visit_id)
        return False
    await refund_visit(app, visit_id, reason=reason, actor=actor)
    return True


async def cancel(
    app: web.Application,
    visit_id: int,
    actor: Any,
    *,
    reason: str = "",
    remote: str | None = None,
    now: float | None = None,
) -> dict:
    """Cancel, then refund (outside the booking transaction) and tell the patient."""
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
    result["refunded"] = False
    if result["refund"]:
        result["refunded"] = await _refund(app, visit_id, reason or f"cancelled by {actor.role}", actor)
    await _notify_visit(app, visit_id, "cancelled")
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
    if visit["status"] == "confirmed":
        await _notify_visit(app, visit_id, "moved")
    return visit


@contextlib.contextmanager
def speaking(locale: str | None) -> Iterator[None]:
    token = i18n.set_locale(locale or "en")
    try:
        yield
    finally:
        i18n._current.reset(token)


def _message(settings: Any, visit: dict, kind: str, origin: str) -> Message:
    locale = visit.get("patient_locale") or settings.default_locale
    with speaking(locale):
        when = to_local(visit["starts_at"], settings.timezone).strftime("%Y-%m-%d %H:%M")
        dep = catalogue.localized(
            {"name_zh": visit["department_name_zh"], "name_en": visit["department_name_en"]}, "name", locale
        )
        params = {
            "hospital": settings.hospital_name,
            "when": when,
            "doctor": visit["doctor_name"],
            "department": dep,
            "url": f"{origin}/visits/{visit['public_id']}",
        }
        if kind == "confirmed":
            subject = _("Visit confirmed")
            body = _(
                "%(hospital)s: your online visit with %(doctor)s (%(department)s) is confirmed for"
                " %(when)s. Details and the call link: %(url)s"
            )
        elif kind == "cancelled":
            subject = _("Visit cancelled")
            body = _(
                "%(hospital)s: your online visit with %(doctor)s on %(when)s was cancelled."
                " Any payment is refunded. Details: %(url)s"
            )
        elif kind == "moved":
            subject = _("Visit moved")
            body = _(
                "%(hospital)s: your online visit with %(doctor)s now starts at %(when)s. Details: %(url)s"
            )
        else:
            subject = _("Visit reminder")
            body = _(
                "%(hospital)s: reminder, your online visit with %(doctor)s starts at %(when)s."
                " Open the call link from: %(url)s"
            )
        return Message("sms", visit["patient_phone"] or "", subject, body % params)


async def _notify_visit(app: web.Application, visit_id: int, kind: str, origin: str | None = None) -> None:
    settings = app[keys.SETTINGS]
    visit = await app[keys.DB].execute_fn(lambda db: get_visit_sync(db, visit_id=visit_id))
    if visit is None or not visit["patient_phone"]:
        return
    await app[keys.NOTIFIER].send(_message(settings, visit, kind, origin or base_url(settings)))


async def after_confirmed(app: web.Application, visit_id: int, base_url: str | None = None) -> None:
    """After the payment's transaction committed: tell the patient (SMS with time and page link)."""
    await _notify_visit(app, visit_id, "confirmed", base_url)


async def housekeeping(app: web.Application, now: float | None = None) -> dict[str, int]:
    """Release expired holds and send due reminders; the background loop calls this."""
    now = time.time() if now is None else now
    db = app[keys.DB]
    expired = await db.execute_write_fn(lambda d: expire_holds_sync(d, now))
    due = await db.execute_write_fn(lambda d: reminders_due_sync(d, now))
    settings = app[keys.SETTINGS]
    for visit in due:
        if visit["patient_phone"]:
            await app[keys.NOTIFIER].send(_message(settings, visit, "reminder", base_url(settings)))
    return {"expired": expired, "reminders": len(due)}


async def hold_reaper(app: web.Application) -> AsyncIterator[None]:
    """``cleanup_ctx``: a background loop that expires holds and sends reminders; cancelled on exit."""

    async def loop() -> None:
        interval = max(0.05, float(app[keys.SETTINGS].reaper_interval_seconds))
        while True:
            await asyncio.sleep(interval)
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
