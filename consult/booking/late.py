"""A doctor running late: "about N minutes late" for today, told to the patients still to be seen.

The notice is one row per doctor and local day (``running_late``); setting it records an audit
entry and, in the same write, queues an SMS (a ``notify`` job of kind ``late``, see
``consult.booking.notices``) for each of the doctor's confirmed visits today whose call has not
started yet. Patients with their call page open see it there at once (``consult.core.live``).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import sqlite_utils

from consult.audit.chain import record
from consult.booking import schedules
from consult.booking.notices import enqueue_notice_sync
from consult.booking.visits import VISIT_SELECT
from consult.core.errors import BadRequest
from consult.core.i18n import _

# What the board offers; 0 takes the notice back.
CHOICES = (0, 10, 15, 20, 30, 45, 60, 90)


def day_bounds(now: float, tz: str) -> tuple[str, float, float]:
    """Today's local date (ISO) and the timestamps of its start and of the next day's start."""
    today = schedules.local_date(now, tz)
    zone = schedules.zone(tz)
    start = datetime(today.year, today.month, today.day, tzinfo=zone).timestamp()
    tomorrow = today + timedelta(days=1)
    end = datetime(tomorrow.year, tomorrow.month, tomorrow.day, tzinfo=zone).timestamp()
    return today.isoformat(), start, end


def parse_minutes(value: str | None) -> int:
    if value is None or not value.isdigit() or int(value) not in CHOICES:
        raise BadRequest(_("Choose how late you are running from the list."))
    return int(value)


def waiting_today_sync(db: sqlite_utils.Database, doctor_id: int, now: float, tz: str) -> list[dict]:
    """The doctor's confirmed visits today not over yet whose call has not started."""
    _day, _start, end = day_bounds(now, tz)
    rows = db.execute(
        VISIT_SELECT + " LEFT JOIN rooms r ON r.visit_id = v.id"
        " WHERE v.doctor_id = ? AND v.status = 'confirmed' AND v.ends_at > ? AND v.starts_at < ?"
        " AND r.started_at IS NULL ORDER BY v.starts_at",
        [doctor_id, now, end],
    ).fetchall()
    return [dict(r) for r in rows]


def set_running_late_sync(
    db: sqlite_utils.Database, doctor: Any, minutes: int, *, now: float, tz: str, remote: str | None
) -> int:
    """Record the notice (writer thread); returns how many patients are sent it."""
    if minutes not in CHOICES:
        raise BadRequest(_("Choose how late you are running from the list."))
    day, _start, _end = day_bounds(now, tz)
    db.execute(
        "INSERT INTO running_late (doctor_id, day, minutes, created) VALUES (?, ?, ?, ?)"
        " ON CONFLICT(doctor_id, day) DO UPDATE SET minutes = excluded.minutes, created = excluded.created",
        [doctor.id, day, minutes, now],
    )
    told = 0
    if minutes:
        for visit in waiting_today_sync(db, doctor.id, now, tz):
            if enqueue_notice_sync(db, visit, "late", now=now, level=int(now * 1000), minutes=minutes):
                told += 1
    record(
        db,
        "clinic.running_late",
        "doctor",
        doctor.id,
        actor=doctor,
        remote=remote,
        detail={"minutes": minutes, "day": day, "patients": told},
        created=now,
    )
    return told


def running_late_sync(db: sqlite_utils.Database, doctor_id: int, now: float, tz: str) -> int:
    """How late the doctor said they are running today (0: on time, or nothing said)."""
    day, _start, _end = day_bounds(now, tz)
    row = db.execute(
        "SELECT minutes FROM running_late WHERE doctor_id = ? AND day = ?", [doctor_id, day]
    ).fetchone()
    return int(row[0]) if row else 0


def late_for_visit_sync(db: sqlite_utils.Database, visit: Any, now: float, tz: str) -> int:
    """The notice a patient sees on their waiting page: their doctor's, if the visit is today,
    confirmed and its call not started."""
    _day, start, end = day_bounds(now, tz)
    if visit["status"] != "confirmed" or not (start <= visit["starts_at"] < end) or visit["ends_at"] <= now:
        return 0
    started = db.execute("SELECT started_at FROM rooms WHERE visit_id = ?", [visit["id"]]).fetchone()
    if started is not None and started[0] is not None:
        return 0
    return running_late_sync(db, visit["doctor_id"], now, tz)
