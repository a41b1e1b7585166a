"""Demo data for `make run`: departments, doctors with schedules, one admin, one patient.

Idempotent: a second run changes nothing and prints no passwords (they are shown once). Every
run also marks the database as a demo (core/mode.py), in the same write, so `consult serve`
runs it in demo mode; a server without that mark refuses to start while these accounts exist.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import sqlite_utils

from consult.accounts import users as accounts
from consult.accounts.passwords import Passwords
from consult.audit import chain as audit
from consult.core import mode
from consult.core.db import Database


@dataclass(frozen=True)
class DemoAccount:
    role: str
    login: str
    password: str
    name: str


STAFF = [
    ("admin", "admin", "Admin 管理员"),
    ("doctor", "dr.wang", "王玉燕 Wang Yuyan"),
    ("doctor", "dr.li", "李明 Li Ming"),
    ("doctor", "dr.zhao", "赵晴 Zhao Qing"),
]
PATIENT = ("13800000000", "张伟 Zhang Wei")


def seed(database: Database, passwords: Passwords) -> list[DemoAccount]:
    if database.read_sync(lambda db: db.execute("SELECT 1 FROM users WHERE username = 'admin'").fetchone()):
        # Accounts exist already; hooks are idempotent and fill in what a newer version adds.
        database.write_sync(lambda db: [hook(db) for hook in (mark_demo, *SEED_HOOKS)])
        return []
    created: list[DemoAccount] = []
    hashes: dict[str, tuple[str, str]] = {}
    for _role, username, _name in STAFF:
        pw = secrets.token_urlsafe(9)
        hashes[username] = (pw, passwords.hash(pw))
    patient_pw = secrets.token_urlsafe(9)
    patient_hash = passwords.hash(patient_pw)

    def write(db: sqlite_utils.Database) -> None:
        for role, username, name in STAFF:
            accounts.create_user_sync(
                db, role=role, display_name=name, password_hash=hashes[username][1], username=username
            )
            created.append(DemoAccount(role, username, hashes[username][0], name))
        accounts.create_user_sync(
            db, role="patient", display_name=PATIENT[1], password_hash=patient_hash, phone=PATIENT[0]
        )
        created.append(DemoAccount("patient", PATIENT[0], patient_pw, PATIENT[1]))
        for hook in (mark_demo, *SEED_HOOKS):
            hook(db)

    database.write_sync(write)
    return created


def mark_demo(db: sqlite_utils.Database) -> None:
    if mode.mark_demo_sync(db):
        audit.record(db, "instance.demo", "instance", mode.DEMO, role="cli")


def demo_accounts_sync(db: sqlite_utils.Database) -> list[str]:
    """Logins of the accounts `consult demo` creates that exist here (same login and name)."""
    wanted = [("username", u, n) for _r, u, n in STAFF] + [("phone", PATIENT[0], PATIENT[1])]
    found = []
    for column, login, name in wanted:
        row = db.execute(
            f"SELECT 1 FROM users WHERE {column} = ? AND display_name = ?",  # noqa: S608
            [login, name],
        ).fetchone()
        if row is not None:
            found.append(login)
    return found


DEPARTMENTS = [
    # code, Chinese, English, description zh, description en
    ("internal", "内科", "Internal medicine", "慢性病复诊、检查结果解读", "Chronic conditions, test results"),
    (
        "cardiology",
        "心血管内科",
        "Cardiology",
        "高血压、心律失常等复诊",
        "Blood pressure, heart rhythm follow-up",
    ),
    (
        "endocrinology",
        "内分泌科",
        "Endocrinology",
        "糖尿病、甲状腺疾病复诊",
        "Diabetes and thyroid follow-up",
    ),
]
# username → (departments, title zh, title en, bio zh, bio en, fee in fen, minutes, weekly sessions)
WEEKDAYS = range(5)
DOCTORS = {
    "dr.wang": (
        ["cardiology", "internal"],
        "主任医师",
        "Chief physician",
        "心血管内科主任医师，擅长高血压与心律失常的长期管理。",
        "Cardiologist; long-term care of hypertension and arrhythmia.",
        8000,
        15,
        [(d, "09:00", "11:30") for d in WEEKDAYS] + [(d, "14:00", "16:30") for d in (1, 3)],
    ),
    "dr.li": (
        ["internal", "endocrinology"],
        "副主任医师",
        "Associate chief physician",
        "内科副主任医师，擅长糖尿病与慢性病复诊。",
        "Internist; diabetes and chronic disease follow-up.",
        5000,
        15,
        [(d, "14:00", "17:00") for d in WEEKDAYS] + [(5, "09:00", "11:00")],
    ),
    "dr.zhao": (
        ["endocrinology"],
        "主治医师",
        "Attending physician",
        "内分泌科主治医师，擅长甲状腺疾病。",
        "Endocrinologist; thyroid disorders.",
        5000,
        20,
        [(d, "08:30", "11:50") for d in (0, 2, 4)] + [(d, "13:30", "16:30") for d in (1, 3)],
    ),
}


def seed_catalogue(db: sqlite_utils.Database) -> None:
    """Departments, the demo doctors' profiles and weekly schedules (so every coming week has slots)."""
    for sort, (code, zh, en, dzh, den) in enumerate(DEPARTMENTS):
        db.execute(
            "INSERT INTO departments (code, name_zh, name_en, description_zh, description_en, sort)"
            " VALUES (?,?,?,?,?,?) ON CONFLICT(code) DO NOTHING",
            [code, zh, en, dzh, den, sort],
        )
    dep_ids = {r[0]: r[1] for r in db.execute("SELECT code, id FROM departments")}
    for username, (deps, tzh, ten, bzh, ben, fee, minutes, sessions) in DOCTORS.items():
        user = db.execute(
            "SELECT id FROM users WHERE username = ? AND role = 'doctor'", [username]
        ).fetchone()
        if user is None:
            continue
        uid = user[0]
        if db.execute("SELECT 1 FROM doctors WHERE user_id = ?", [uid]).fetchone():
            continue  # the admin may have changed the profile since; leave it alone
        db.execute(
            "INSERT INTO doctors (user_id, title_zh, title_en, bio_zh, bio_en, fee_minor, visit_minutes)"
            " VALUES (?,?,?,?,?,?,?)",
            [uid, tzh, ten, bzh, ben, fee, minutes],
        )
        for code in deps:
            db.execute(
                "INSERT INTO doctor_departments (doctor_id, department_id) VALUES (?, ?)"
                " ON CONFLICT DO NOTHING",
                [uid, dep_ids[code]],
            )
        for weekday, start, end in sessions:
            db.execute(
                "INSERT INTO schedule_templates (doctor_id, weekday, start_local, end_local)"
                " VALUES (?,?,?,?)",
                [uid, weekday, start, end],
            )


# Other domains add their demo rows here; each hook must be idempotent (it runs on every seed).
SEED_HOOKS: list = [seed_catalogue]
