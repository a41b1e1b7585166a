"""Seeding for the call tests: a visit written straight into the database, and its call tokens."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from consult.booking import late
from consult.calls import links as calllinks
from consult.calls import policy as calls
from consult.core.config import Settings, ensure_secrets, load_settings
from tests.db_helpers import insert, write


@dataclass(frozen=True)
class SeededVisit:
    id: int
    public_id: str
    nonce: str
    doctor_id: int
    patient_id: int
    starts_at: int
    ends_at: int


def seed_visit(
    target: Any,
    *,
    doctor_id: int | None = None,
    patient_id: int | None = None,
    starts_in_s: float = -60,
    minutes: int = 15,
    status: str = "confirmed",
) -> SeededVisit:
    """A visit starting `starts_in_s` from now (default: a minute ago), written in one short write
    transaction to `target`: a running server or the test's settings (either engine; see
    tests/db_helpers), or the path of an existing SQLite file.

    Without ids: the first doctor with a profile, the first patient and a department of that
    doctor (what `consult demo` creates). Safe while a server runs.
    """

    def fn(db: Any) -> SeededVisit:
        nonlocal doctor_id, patient_id
        if doctor_id is None:
            doctor_id = db.execute("SELECT user_id FROM doctors ORDER BY user_id LIMIT 1").fetchone()[0]
        if patient_id is None:
            patient_id = db.execute(
                "SELECT id FROM users WHERE role = 'patient' ORDER BY id LIMIT 1"
            ).fetchone()[0]
        row = db.execute(
            "SELECT department_id FROM doctor_departments WHERE doctor_id = ? LIMIT 1", [doctor_id]
        ).fetchone()
        department_id = row[0] if row else db.execute("SELECT id FROM departments LIMIT 1").fetchone()[0]
        now = time.time()
        starts = int(now + starts_in_s)
        # A demo visit of the same doctor may start at this very second (a quarter-hour mark):
        # the one just before it, never the same (one visit per doctor and start).
        while db.execute(
            "SELECT 1 FROM visits WHERE doctor_id = ? AND starts_at = ?", [doctor_id, starts]
        ).fetchone():
            starts -= 1
        ends = starts + minutes * 60
        public_id = secrets.token_urlsafe(12)
        nonce = secrets.token_urlsafe(8)
        visit_id = insert(
            db,
            "INSERT INTO visits (public_id, patient_id, doctor_id, department_id, starts_at, ends_at, status,"
            " fee_minor, currency, created, updated, call_nonce) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            [
                public_id,
                patient_id,
                doctor_id,
                department_id,
                starts,
                ends,
                status,
                5000,
                "CNY",
                now,
                now,
                nonce,
            ],
        )
        return SeededVisit(visit_id, public_id, nonce, doctor_id, patient_id, starts, ends)

    return write(target, fn)


def within_today(tz: str, *offsets: float) -> list[float]:
    """`offsets` (seconds from now) moved together, when need be, so that each falls in today's
    local day: a doctor's board and the running-late notice cover today's visits only, and the tests
    run at any hour (at 23:58, a visit 5 minutes ahead is tomorrow's)."""
    now = time.time()
    _day, start, end = late.day_bounds(now, tz)
    shift = min(0.0, end - 2 - (now + max(offsets)))
    shift = max(shift, start + 2 - (now + min(offsets)))  # just after midnight
    return [offset + shift for offset in offsets]


def keyed_settings(data_dir: Path) -> Settings:
    """The settings a server on `data_dir` signs with (its generated secrets included)."""
    return ensure_secrets(load_settings(env={}, data_dir=data_dir, tls=False))


def patient_token(
    settings: Settings, visit: SeededVisit, *, nonce: str | None = None, shift_s: int = 0
) -> str:
    return calllinks.make_token(
        settings,
        visit.public_id,
        "patient",
        nonce or visit.nonce,
        visit.starts_at + shift_s,
        visit.ends_at + shift_s,
    )


def host_token(
    settings: Settings, visit: SeededVisit, *, user_id: int | None = None, now: float | None = None
) -> str:
    return calls.make_host_token(
        settings,
        visit.public_id,
        visit.doctor_id if user_id is None else user_id,
        time.time() if now is None else now,
    )
