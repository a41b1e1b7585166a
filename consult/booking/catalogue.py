"""Departments and doctors' profiles: what a patient chooses from.

Names and texts are kept in Chinese and English; ``localized`` picks the request's language and
falls back to the other one when a translation is missing.
"""

from __future__ import annotations

import re
import time
from typing import Any

import sqlite_utils

from consult.audit import chain as audit
from consult.booking import schedules
from consult.core.db import IntegrityError
from consult.core.errors import BadRequest, Conflict, NotFound
from consult.core.i18n import _

CODE_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")


def localized(row: Any, field: str, locale: str) -> str:
    zh, en = row[f"{field}_zh"] or "", row[f"{field}_en"] or ""
    return (zh or en) if locale == "zh_CN" else (en or zh)


def department_view(row: Any, locale: str) -> dict:
    d = dict(row)
    d["name"] = localized(row, "name", locale)
    d["description"] = localized(row, "description", locale)
    return d


def doctor_view(row: Any, locale: str) -> dict:
    d = dict(row)
    d["title"] = localized(row, "title", locale)
    d["bio"] = localized(row, "bio", locale)
    return d


# -- departments ----------------------------------------------------------------------


def departments(db: sqlite_utils.Database, *, active_only: bool = True) -> list[dict]:
    where = "WHERE active = 1" if active_only else ""
    return [dict(r) for r in db.execute(f"SELECT * FROM departments {where} ORDER BY sort, id")]  # noqa: S608


def department(db: sqlite_utils.Database, department_id: int, *, active_only: bool = True) -> dict:
    row = db.execute("SELECT * FROM departments WHERE id = ?", [department_id]).fetchone()
    if row is None or (active_only and not row["active"]):
        raise NotFound(_("No such department."))
    return dict(row)


def save_department_sync(
    db: sqlite_utils.Database,
    *,
    department_id: int | None,
    code: str,
    name_zh: str,
    name_en: str,
    description_zh: str = "",
    description_en: str = "",
    active: bool = True,
    sort: int = 0,
    actor: Any = None,
) -> int:
    code = (code or "").strip().lower()
    if not CODE_RE.match(code):
        raise BadRequest(_("A department code has lowercase letters, digits, '-' or '_' (up to 32)."))
    name_zh, name_en = name_zh.strip(), name_en.strip()
    if not name_zh or not name_en or len(name_zh) > 100 or len(name_en) > 100:
        raise BadRequest(_("Give the department a Chinese and an English name (up to 100 characters)."))
    values = [code, name_zh, name_en, description_zh.strip()[:1000], description_en.strip()[:1000]]
    values += [1 if active else 0, int(sort)]
    try:
        if department_id is None:
            cur = db.execute(
                "INSERT INTO departments (code, name_zh, name_en, description_zh, description_en, active,"
                " sort) VALUES (?,?,?,?,?,?,?) RETURNING id",
                values,
            )
            department_id = int(cur.fetchone()[0])
        else:
            cur = db.execute(
                "UPDATE departments SET code = ?, name_zh = ?, name_en = ?, description_zh = ?,"
                " description_en = ?, active = ?, sort = ? WHERE id = ?",
                [*values, department_id],
            )
            if cur.rowcount == 0:
                raise NotFound(_("No such department."))
    except IntegrityError:
        raise Conflict(_("Another department already uses this code.")) from None
    audit.record(
        db, "catalogue.department_save", "department", department_id, actor=actor, detail={"code": code}
    )
    return department_id


# -- doctors --------------------------------------------------------------------------

DOCTOR_SELECT = (
    "SELECT d.*, u.display_name, u.username, u.active AS user_active FROM doctors d"
    " JOIN users u ON u.id = d.user_id"
)


def doctors_in_department(db: sqlite_utils.Database, department_id: int) -> list[dict]:
    return [
        dict(r)
        for r in db.execute(
            DOCTOR_SELECT + " JOIN doctor_departments dd ON dd.doctor_id = d.user_id"
            " WHERE dd.department_id = ? AND d.active = 1 AND u.active = 1 ORDER BY u.display_name",
            [department_id],
        )
    ]


def doctor(db: sqlite_utils.Database, user_id: int, *, active_only: bool = True) -> dict:
    row = db.execute(DOCTOR_SELECT + " WHERE d.user_id = ?", [user_id]).fetchone()
    if row is None or (active_only and not (row["active"] and row["user_active"])):
        raise NotFound(_("No such doctor."))
    out = dict(row)
    out["department_ids"] = [
        r[0]
        for r in db.execute(
            "SELECT department_id FROM doctor_departments WHERE doctor_id = ? ORDER BY department_id",
            [user_id],
        )
    ]
    return out


def doctor_users(db: sqlite_utils.Database) -> list[dict]:
    """Every doctor account, with its profile when one exists (for the admin list)."""
    return [
        dict(r)
        for r in db.execute(
            "SELECT u.id, u.display_name, u.username, u.active AS user_active, d.user_id AS profile,"
            " d.title_zh, d.title_en, d.fee_minor, d.currency, d.visit_minutes, d.active,"
            " (SELECT group_concat(dep.name_en || ' / ' || dep.name_zh, ', ') FROM doctor_departments dd"
            "  JOIN departments dep ON dep.id = dd.department_id WHERE dd.doctor_id = u.id) AS departments,"
            " (SELECT group_concat(dep.name_zh, '、') FROM doctor_departments dd"
            "  JOIN departments dep ON dep.id = dd.department_id WHERE dd.doctor_id = u.id) AS departments_zh"
            " FROM users u LEFT JOIN doctors d ON d.user_id = u.id WHERE u.role = 'doctor'"
            " ORDER BY u.display_name"
        )
    ]


def save_doctor_sync(
    db: sqlite_utils.Database,
    user_id: int,
    *,
    title_zh: str = "",
    title_en: str = "",
    bio_zh: str = "",
    bio_en: str = "",
    fee_minor: int,
    currency: str,
    visit_minutes: int,
    active: bool = True,
    department_ids: list[int],
    tz: str,
    actor: Any = None,
    now: float | None = None,
) -> list[int]:
    """Create or update a doctor's profile; returns visits flagged because their length changed."""
    user = db.execute("SELECT role FROM users WHERE id = ?", [user_id]).fetchone()
    if user is None or user["role"] != "doctor":
        raise NotFound(_("No such doctor."))
    if not 0 <= fee_minor <= 10_000_000:
        raise BadRequest(_("Enter a fee between 0 and 100000."))
    if not 5 <= visit_minutes <= 120:
        raise BadRequest(_("A visit lasts between 5 and 120 minutes."))
    if not department_ids:
        raise BadRequest(_("Choose at least one department."))
    known = {r[0] for r in db.execute("SELECT id FROM departments")}
    if not set(department_ids) <= known:
        raise BadRequest(_("No such department."))
    values = {
        "user_id": user_id,
        "title_zh": title_zh.strip()[:100],
        "title_en": title_en.strip()[:100],
        "bio_zh": bio_zh.strip()[:2000],
        "bio_en": bio_en.strip()[:2000],
        "fee_minor": int(fee_minor),
        "currency": currency,
        "visit_minutes": int(visit_minutes),
        "active": 1 if active else 0,
    }
    db.execute(
        "INSERT INTO doctors (user_id, title_zh, title_en, bio_zh, bio_en, fee_minor, currency,"
        " visit_minutes, active) VALUES (:user_id, :title_zh, :title_en, :bio_zh, :bio_en, :fee_minor,"
        " :currency, :visit_minutes, :active) ON CONFLICT(user_id) DO UPDATE SET title_zh = :title_zh,"
        " title_en = :title_en, bio_zh = :bio_zh, bio_en = :bio_en, fee_minor = :fee_minor,"
        " currency = :currency, visit_minutes = :visit_minutes, active = :active",
        values,
    )
    db.execute("DELETE FROM doctor_departments WHERE doctor_id = ?", [user_id])
    for dep in sorted(set(department_ids)):
        db.execute("INSERT INTO doctor_departments (doctor_id, department_id) VALUES (?, ?)", [user_id, dep])
    audit.record(
        db,
        "catalogue.doctor_save",
        "doctor",
        user_id,
        actor=actor,
        detail={"fee_minor": fee_minor, "visit_minutes": visit_minutes, "departments": department_ids},
    )
    return schedules.reflag_visits(db, user_id, tz, time.time() if now is None else now)
