"""Demo data for `make run`: departments, doctors with schedules, one admin, one patient.

Idempotent: a second run changes nothing and prints no passwords (they are shown once).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import sqlite_utils

from consult import accounts
from consult.db import Database
from consult.passwords import Passwords


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
        for hook in SEED_HOOKS:
            hook(db)

    database.write_sync(write)
    return created


# Other domains (booking: departments, doctors' profiles and schedules) add their demo rows here.
SEED_HOOKS: list = []
