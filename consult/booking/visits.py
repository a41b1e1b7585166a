"""Reading a visit, and who may see, cancel or move it."""

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
