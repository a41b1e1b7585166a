"""Reading a visit, completing it when its call ends, and who may see, cancel or move it."""

from __future__ import annotations

from typing import Any

import sqlite_utils

OPEN_STATUSES = ("held", "confirmed")


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


def for_patient_sync(db: sqlite_utils.Database, patient_id: int) -> list[dict]:
    """A patient's visits, latest first (their home page)."""
    rows = db.execute(
        VISIT_SELECT + " WHERE v.patient_id = ? ORDER BY v.starts_at DESC LIMIT 200", [patient_id]
    ).fetchall()
    return [dict(r) for r in rows]


def complete_sync(db: sqlite_utils.Database, visit_id: int, at: float) -> bool:
    """The visit's call is over: a confirmed visit becomes completed. Writer thread only.

    Called in the transaction that ends the visit's room (``consult.calls.closing``), so the
    status and the room's end are one fact. Idempotent; True when it changed the status.
    """
    cur = db.execute(
        "UPDATE visits SET status = 'completed', updated = ? WHERE id = ? AND status = 'confirmed'",
        [at, visit_id],
    )
    return cur.rowcount > 0


def needing_reschedule_sync(db: sqlite_utils.Database) -> list[dict]:
    """Open visits flagged because their time left the doctor's schedule, soonest first."""
    rows = db.execute(
        VISIT_SELECT + " WHERE v.needs_reschedule = 1 AND v.status IN ('held', 'confirmed')"
        " ORDER BY v.starts_at"
    ).fetchall()
    return [dict(r) for r in rows]


def count_needing_reschedule_sync(db: sqlite_utils.Database) -> int:
    """How many visits ``needing_reschedule_sync`` lists."""
    return db.execute(
        "SELECT count(*) FROM visits WHERE needs_reschedule = 1 AND status IN ('held', 'confirmed')"
    ).fetchone()[0]


def shown_status(visit: Any, now: float) -> str:
    """A hold past its time shows as expired even before the reaper has marked it so."""
    if visit["status"] == "held" and visit["hold_expires"] is not None and visit["hold_expires"] < now:
        return "expired"
    return visit["status"]


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


def may_change(user: Any, visit: Any, now: float, free_s: float) -> bool:
    """Who may cancel or move an open visit: staff who can see it always; its patient while it is
    an unpaid hold or until ``free_s`` before it starts."""
    if not visit_access(user, visit) or visit["status"] not in OPEN_STATUSES:
        return False
    if user.role == "patient":
        return visit["status"] == "held" or visit["starts_at"] - now >= free_s
    return True


def can_cancel(user: Any, visit: Any, now: float, free_s: float) -> bool:
    return may_change(user, visit, now, free_s)


def can_reschedule(user: Any, visit: Any, now: float, free_s: float) -> bool:
    return may_change(user, visit, now, free_s)
