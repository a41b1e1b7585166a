"""What booking's pages show: each page's data read in one function, on one reader thread.

The views call these through ``Database.execute_fn`` and only shape the result for the template.
Reads that reach into other packages' tables (a visit's report count, its receipt, its
prescriptions) are kept here, next to the visit lists they annotate.
"""

from __future__ import annotations

import json
from typing import Any

import sqlite_utils

from consult.booking import catalogue, schedules, visits
from consult.clinical.prescriptions import sex_label
from consult.core.errors import NotFound
from consult.core.i18n import _

# -- choosing a doctor and a time -----------------------------------------------------------


def department_doctors(
    db: sqlite_utils.Database,
    department_id: int,
    *,
    now: float,
    horizon: float,
    tz: str,
    lead_s: float,
) -> tuple[dict, list[tuple[dict, list[schedules.Slot]]]]:
    """A department and its doctors, each with their free slots from ``now`` until ``horizon``."""
    dep = catalogue.department(db, department_id)
    doctors = [
        (d, schedules.slots(db, d["user_id"], now, horizon, tz, now=now, lead_s=lead_s, free_only=True))
        for d in catalogue.doctors_in_department(db, department_id)
    ]
    return dep, doctors


def department_doctor(db: sqlite_utils.Database, department_id: int, doctor_id: int) -> tuple[dict, dict]:
    """A department and one of its doctors; ``NotFound`` if the doctor does not work there."""
    dep = catalogue.department(db, department_id)
    doc = catalogue.doctor(db, doctor_id)
    if department_id not in doc["department_ids"]:
        raise NotFound(_("No such doctor."))
    return dep, doc


def doctor_slots(
    db: sqlite_utils.Database,
    department_id: int,
    doctor_id: int,
    *,
    now: float,
    horizon: float,
    tz: str,
    lead_s: float,
    since: float | None = None,
) -> dict:
    """A doctor of a department with every slot (free or taken) from ``since`` (default ``now``)
    until ``horizon``, by local day."""
    dep, doc = department_doctor(db, department_id, doctor_id)
    by_day = schedules.slots_by_day(
        db, doctor_id, now if since is None else since, horizon, tz, now=now, lead_s=lead_s
    )
    return {"dep": dep, "doc": doc, "by_day": by_day}


# -- a visit --------------------------------------------------------------------------------


def earlier_visits(db: sqlite_utils.Database, visit: dict[str, Any]) -> list[Any]:
    """The patient's earlier visits (any doctor) with their report counts, for the doctor's view."""
    return db.execute(
        "SELECT v.public_id, v.starts_at, v.status, u.display_name AS doctor_name,"
        " (SELECT count(*) FROM reports r WHERE r.visit_id = v.id) AS reports"
        " FROM visits v JOIN users u ON u.id = v.doctor_id WHERE v.patient_id = ? AND v.id != ?"
        " AND v.status IN ('confirmed', 'completed', 'no_show') AND v.starts_at < ?"
        " ORDER BY v.starts_at DESC LIMIT 20",
        [visit["patient_id"], visit["id"], visit["starts_at"]],
    ).fetchall()


def refund_preview(db: sqlite_utils.Database, visit_id: int) -> dict | None:
    """What cancelling would refund: the paid payments of the visit, not yet refunded, as
    ``{"minor": ..., "currency": ...}``; None when nothing was paid."""
    row = db.execute(
        "SELECT coalesce(sum(amount_minor - refund_minor), 0), min(currency) FROM payments"
        " WHERE visit_id = ? AND status = 'paid'",
        [visit_id],
    ).fetchone()
    if not row[0]:
        return None
    return {"minor": int(row[0]), "currency": row[1]}


def refund_amounts(db: sqlite_utils.Database, visit_id: int) -> dict:
    """After a cancellation: how much of the visit's payments is back (``refunded``) and how much
    a refund still has to return (``due``), in minor units, with the currency."""
    row = db.execute(
        "SELECT coalesce(sum(refund_minor), 0),"
        " coalesce(sum(CASE WHEN status = 'paid' THEN amount_minor - refund_minor ELSE 0 END), 0),"
        " min(currency) FROM payments WHERE visit_id = ?",
        [visit_id],
    ).fetchone()
    return {"refunded": int(row[0]), "due": int(row[1]), "currency": row[2]}


def patient_facts(db: sqlite_utils.Database, patient_id: int) -> dict[str, Any]:
    """What is known of the patient beyond their name: sex and age as written on their latest
    prescription (the accounts hold neither), else nothing."""
    row = db.execute(
        "SELECT document FROM prescriptions WHERE patient_id = ? ORDER BY id DESC LIMIT 1", [patient_id]
    ).fetchone()
    facts: dict[str, Any] = {"sex": None, "age": None}
    if row is None:
        return facts
    try:
        patient = json.loads(row[0]).get("patient") or {}
    except (ValueError, AttributeError):
        return facts
    if isinstance(patient, dict):
        for name in ("sex", "age"):
            value = patient.get(name)
            if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value).strip():
                facts[name] = str(value)[:20]
        if facts["sex"]:  # stored as a code ("female"): shown in the reader's words
            facts["sex"] = sex_label(facts["sex"])
    return facts


def doctor_visit(db: sqlite_utils.Database, visit: dict[str, Any]) -> dict[str, Any]:
    """The doctor's view of a visit: the patient's known facts and earlier visits."""
    return {"facts": patient_facts(db, visit["patient_id"]), "earlier_visits": earlier_visits(db, visit)}


# -- home pages -----------------------------------------------------------------------------


def patient_visits(db: sqlite_utils.Database, patient_id: int) -> tuple[list[dict], dict[int, dict]]:
    """The patient's visits (latest first) and, per visit id, what ``patient_extras`` found."""
    return visits.for_patient_sync(db, patient_id), patient_extras(db, patient_id)


def no_extras() -> dict:
    return {"reports": 0, "receipt": None, "prescriptions": []}


def patient_extras(db: sqlite_utils.Database, patient_id: int) -> dict[int, dict]:
    """Per visit: how many reports, the paid order (for its receipt), the prescriptions."""
    out: dict[int, dict] = {}

    def slot(visit_id: int) -> dict:
        return out.setdefault(visit_id, no_extras())

    for r in db.execute(
        "SELECT r.visit_id, count(*) FROM reports r JOIN visits v ON v.id = r.visit_id"
        " WHERE v.patient_id = ? GROUP BY r.visit_id",
        [patient_id],
    ):
        slot(r[0])["reports"] = r[1]
    for r in db.execute(
        "SELECT p.visit_id, p.order_id, p.status FROM payments p JOIN visits v ON v.id = p.visit_id"
        " WHERE v.patient_id = ? AND p.status IN ('paid', 'refunded') ORDER BY p.id",
        [patient_id],
    ):
        slot(r[0])["receipt"] = {"order_id": r[1], "status": r[2]}
    for r in db.execute(
        # Only issued ones: one waiting for (or returned by) the pharmacist is not the patient's yet.
        "SELECT visit_id, number FROM prescriptions WHERE patient_id = ? AND status = 'issued' ORDER BY id",
        [patient_id],
    ):
        slot(r[0])["prescriptions"].append(r[1])
    return out


def doctor_agenda(db: sqlite_utils.Database, doctor_id: int, since: float, until: float) -> list[dict]:
    """A doctor's confirmed and completed visits ending after ``since`` and starting before
    ``until``, with the patient's name, the report count and the latest payment's status."""
    rows = db.execute(
        "SELECT v.id, v.public_id, v.starts_at, v.ends_at, v.status, v.needs_reschedule,"
        " u.display_name AS patient_name,"
        " (SELECT count(*) FROM reports r WHERE r.visit_id = v.id) AS reports,"
        " (SELECT p.status FROM payments p WHERE p.visit_id = v.id ORDER BY p.id DESC LIMIT 1) AS payment"
        " FROM visits v JOIN users u ON u.id = v.patient_id"
        " WHERE v.doctor_id = ? AND v.status IN ('confirmed', 'completed') AND v.ends_at > ?"
        " AND v.starts_at < ? ORDER BY v.starts_at LIMIT 300",
        [doctor_id, since, until],
    ).fetchall()
    return [dict(r) for r in rows]


# -- the admin's catalogue ------------------------------------------------------------------


def catalogue_overview(db: sqlite_utils.Database) -> dict:
    """Every department and doctor account, and how many visits wait for a new time."""
    return {
        "departments": catalogue.departments(db, active_only=False),
        "doctors": catalogue.doctor_users(db),
        "to_reschedule": visits.count_needing_reschedule_sync(db),
    }


def doctor_admin(db: sqlite_utils.Database, doctor_id: int, today: str) -> dict:
    """A doctor account for the admin: profile (if any), departments, sessions, exceptions from
    ``today`` (a local ISO date)."""
    user = db.execute(
        "SELECT id, display_name, username FROM users WHERE id = ? AND role = 'doctor'", [doctor_id]
    ).fetchone()
    if user is None:
        raise NotFound(_("No such doctor."))
    profile = db.execute("SELECT * FROM doctors WHERE user_id = ?", [doctor_id]).fetchone()
    deps = {
        r[0]
        for r in db.execute("SELECT department_id FROM doctor_departments WHERE doctor_id = ?", [doctor_id])
    }
    return {
        "doctor_user": dict(user),
        "profile": dict(profile) if profile else None,
        "member_of": deps,
        "departments": catalogue.departments(db, active_only=False),
        "templates": schedules.templates(db, doctor_id) if profile else [],
        "exceptions": schedules.exceptions(db, doctor_id, today) if profile else [],
    }
