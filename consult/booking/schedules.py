"""Doctors' weekly schedules and exceptions, and the bookable slots derived from them.

Templates and exceptions are written in the hospital's local time ("09:00" on a weekday); slots are
UTC unix seconds. A slot is one visit length on a grid that starts at each session's start, so the
same inputs always give the same slots and a booking can be checked against them exactly.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from datetime import time as dtime
from functools import cache, lru_cache
from zoneinfo import ZoneInfo

import sqlite_utils

from consult.audit import chain as audit
from consult.core.errors import BadRequest, NotFound
from consult.core.i18n import _

ACTIVE_STATUSES = ("held", "confirmed", "completed")
# The longest visit (doctors.visit_minutes CHECK): bounds "does anything overlap?" index range scans.
MAX_VISIT_S = 120 * 60
HHMM = re.compile(r"^([01][0-9]|2[0-3]):[0-5][0-9]$")


@dataclass(frozen=True)
class Slot:
    starts_at: int
    ends_at: int
    taken: bool = False


@cache
def zone(tz: str) -> ZoneInfo:
    return ZoneInfo(tz)


def local_date(ts: float, tz: str) -> date:
    return datetime.fromtimestamp(ts, zone(tz)).date()


@lru_cache(maxsize=8192)
def local_ts(day: date, hhmm: str, tz: str) -> int:
    """The UTC second of ``hhmm`` on a local ``day``; remembered, since every hold and slot page
    asks again for the same few days and session times."""
    h, m = (int(x) for x in hhmm.split(":"))
    return int(datetime.combine(day, dtime(h, m), tzinfo=zone(tz)).timestamp())


def check_hhmm(value: str) -> str:
    value = (value or "").strip()
    if len(value) == 4 and value[1] == ":":
        value = "0" + value
    if not HHMM.match(value):
        raise BadRequest(_("Enter times as HH:MM, for example 09:00."))
    return value


def check_day(value: str) -> str:
    try:
        return date.fromisoformat((value or "").strip()).isoformat()
    except ValueError:
        raise BadRequest(_("Enter dates as YYYY-MM-DD.")) from None


# -- slot derivation ------------------------------------------------------------------


def _visit_minutes(db: sqlite_utils.Database, doctor_id: int) -> int | None:
    row = db.execute("SELECT visit_minutes FROM doctors WHERE user_id = ?", [doctor_id]).fetchone()
    return None if row is None else int(row[0])


def day_slots(db: sqlite_utils.Database, doctor_id: int, day: date, tz: str, minutes: int) -> list[Slot]:
    """Every slot of one local day, before bookings and the clock are considered."""
    iso = day.isoformat()
    sessions = [
        (r[0], r[1])
        for r in db.execute(
            "SELECT start_local, end_local FROM schedule_templates WHERE doctor_id = ? AND weekday = ?"
            " AND (valid_from IS NULL OR valid_from <= ?) AND (valid_until IS NULL OR valid_until >= ?)",
            [doctor_id, day.weekday(), iso, iso],
        )
    ]
    leaves: list[tuple[int, int]] = []
    day_start = local_ts(day, "00:00", tz)
    day_end = int(datetime.combine(day + timedelta(days=1), dtime(0, 0), tzinfo=zone(tz)).timestamp())
    for kind, start, end in db.execute(
        "SELECT kind, start_local, end_local FROM schedule_exceptions WHERE doctor_id = ? AND day = ?",
        [doctor_id, iso],
    ):
        if kind == "extra" and start and end:
            sessions.append((start, end))
        elif kind == "leave":
            if not start or not end:
                return []
            leaves.append((local_ts(day, start, tz), local_ts(day, end, tz)))
    step = minutes * 60
    found: dict[int, Slot] = {}
    for start, end in sessions:
        s, e = local_ts(day, start, tz), local_ts(day, end, tz)
        while s + step <= e:
            if day_start <= s < day_end and not any(s < le and s + step > ls for ls, le in leaves):
                found.setdefault(s, Slot(s, s + step))
            s += step
    return [found[k] for k in sorted(found)]


def _busy(db: sqlite_utils.Database, doctor_id: int, lo: int, hi: int, now: float) -> list[tuple[int, int]]:
    return [
        (r[0], r[1])
        for r in db.execute(
            "SELECT starts_at, ends_at FROM visits WHERE doctor_id = ? AND starts_at < ? AND starts_at > ?"
            " AND ends_at > ? AND status IN ('held', 'confirmed', 'completed')"
            " AND NOT (status = 'held' AND hold_expires < ?)",
            [doctor_id, hi, lo - MAX_VISIT_S, lo, now],
        )
    ]


def slots(
    db: sqlite_utils.Database,
    doctor_id: int,
    from_utc: float,
    to_utc: float,
    tz: str,
    *,
    now: float | None = None,
    lead_s: float = 0.0,
    free_only: bool = False,
) -> list[Slot]:
    """Slots starting in [from_utc, to_utc), none before ``now + lead_s``, each marked taken or not.

    A slot is taken while a visit that is held (and not past its hold), confirmed or completed
    overlaps it; an expired hold frees the slot even before the reaper has marked it expired.
    """
    now = time.time() if now is None else now
    minutes = _visit_minutes(db, doctor_id)
    if minutes is None:
        return []
    earliest = max(from_utc, now + lead_s)
    out: list[Slot] = []
    day = local_date(earliest, tz)
    last = local_date(to_utc, tz)
    while day <= last:
        out.extend(s for s in day_slots(db, doctor_id, day, tz, minutes) if earliest <= s.starts_at < to_utc)
        day += timedelta(days=1)
    if not out:
        return out
    busy = _busy(db, doctor_id, out[0].starts_at, out[-1].ends_at, now)
    taken = _overlapped(out, busy)
    marked = [Slot(s.starts_at, s.ends_at, t) for s, t in zip(out, taken, strict=True)]
    return [s for s in marked if not s.taken] if free_only else marked


def slots_by_day(
    db: sqlite_utils.Database,
    doctor_id: int,
    from_utc: float,
    to_utc: float,
    tz: str,
    *,
    now: float,
    lead_s: float = 0.0,
) -> dict[date, list[Slot]]:
    """``slots`` grouped by local day, every slot marked taken or not, with one query for the
    bookings of the whole range: the slot page counts each day's free times from this and labels
    only the day it shows (labelling every slot of two weeks was most of that page's cost)."""
    minutes = _visit_minutes(db, doctor_id)
    if minutes is None:
        return {}
    earliest = max(from_utc, now + lead_s)
    days: dict[date, list[Slot]] = {}
    day = local_date(earliest, tz)
    last = local_date(to_utc, tz)
    while day <= last:
        found = day_slots(db, doctor_id, day, tz, minutes)
        days[day] = [s for s in found if earliest <= s.starts_at < to_utc]
        day += timedelta(days=1)
    flat = [s for found in days.values() for s in found]
    if not flat:
        return days
    taken = iter(_overlapped(flat, _busy(db, doctor_id, flat[0].starts_at, flat[-1].ends_at, now)))
    return {d: [Slot(s.starts_at, s.ends_at, next(taken)) for s in found] for d, found in days.items()}


def _overlapped(slots: list[Slot], busy: list[tuple[int, int]]) -> list[bool]:
    """For slots sorted by start, whether any busy interval overlaps each: one sweep, not slots x busy.

    A booking rush re-renders the slot page after every refused hold; comparing every slot with
    every visit made that page cost ~18 ms at 1,200 slots and 300 visits.
    """
    if not busy:
        return [False] * len(slots)
    busy = sorted(busy)
    result = []
    first = 0  # busy[:first] end at or before the current slot's start (slots only move later)
    for s in slots:
        while first < len(busy) and busy[first][1] <= s.starts_at:
            first += 1
        hit = False
        for b, e in busy[first:]:
            if b >= s.ends_at:
                break
            if e > s.starts_at:
                hit = True
                break
        result.append(hit)
    return result


def find_slot(
    db: sqlite_utils.Database, doctor_id: int, starts_at: int, tz: str, minutes: int | None = None
) -> Slot | None:
    """The schedule's slot starting exactly at ``starts_at``, ignoring bookings and the clock:
    the same answer as looking it up in ``day_slots``, with one query and no list of the day's
    slots (every hold checks its time here, inside the one writer's transaction)."""
    if minutes is None:
        minutes = _visit_minutes(db, doctor_id)
        if minutes is None:
            return None
    day = local_date(starts_at, tz)
    iso = day.isoformat()
    rows = db.execute(
        "SELECT 'template', start_local, end_local FROM schedule_templates WHERE doctor_id = ?"
        " AND weekday = ? AND (valid_from IS NULL OR valid_from <= ?)"
        " AND (valid_until IS NULL OR valid_until >= ?)"
        " UNION ALL SELECT kind, start_local, end_local FROM schedule_exceptions"
        " WHERE doctor_id = ? AND day = ?",
        [doctor_id, day.weekday(), iso, iso, doctor_id, iso],
    ).fetchall()
    step = minutes * 60
    ends_at = starts_at + step
    on_grid = False
    for kind, start, end in rows:
        if kind == "leave":
            if not start or not end:
                return None
            if starts_at < local_ts(day, end, tz) and ends_at > local_ts(day, start, tz):
                return None
        elif kind == "template" or (kind == "extra" and start and end):
            first, last = local_ts(day, start, tz), local_ts(day, end, tz)
            on_grid = on_grid or (first <= starts_at and ends_at <= last and (starts_at - first) % step == 0)
    return Slot(starts_at, ends_at) if on_grid else None


# -- editing schedules ----------------------------------------------------------------


def templates(db: sqlite_utils.Database, doctor_id: int) -> list[dict]:
    return [
        dict(r)
        for r in db.execute(
            "SELECT * FROM schedule_templates WHERE doctor_id = ? ORDER BY weekday, start_local", [doctor_id]
        )
    ]


def exceptions(db: sqlite_utils.Database, doctor_id: int, since_day: str) -> list[dict]:
    return [
        dict(r)
        for r in db.execute(
            "SELECT * FROM schedule_exceptions WHERE doctor_id = ? AND day >= ? ORDER BY day, start_local",
            [doctor_id, since_day],
        )
    ]


def reflag_visits(db: sqlite_utils.Database, doctor_id: int, tz: str, now: float) -> list[int]:
    """After a schedule change: flag each upcoming visit that no longer fits (never drop it).

    A visit fits when its start and end are exactly one slot of the new schedule. A visit that
    fits again (the change was undone) loses its flag. Returns the ids flagged now.
    """
    flagged: list[int] = []
    row = db.execute("SELECT visit_minutes, active FROM doctors WHERE user_id = ?", [doctor_id]).fetchone()
    # A doctor taken off online visits keeps no slots: every upcoming visit needs a new time.
    minutes = int(row[0]) if row is not None and row[1] else None
    cache_days: dict[date, set[tuple[int, int]]] = {}
    for vid, starts, ends, was in db.execute(
        "SELECT id, starts_at, ends_at, needs_reschedule FROM visits WHERE doctor_id = ? AND ends_at > ?"
        " AND status IN ('held', 'confirmed')",
        [doctor_id, now],
    ).fetchall():
        day = local_date(starts, tz)
        if day not in cache_days:
            cache_days[day] = (
                {(s.starts_at, s.ends_at) for s in day_slots(db, doctor_id, day, tz, minutes)}
                if minutes
                else set()
            )
        fits = (starts, ends) in cache_days[day]
        if fits and was:
            db.execute("UPDATE visits SET needs_reschedule = 0, updated = ? WHERE id = ?", [now, vid])
        elif not fits and not was:
            db.execute("UPDATE visits SET needs_reschedule = 1, updated = ? WHERE id = ?", [now, vid])
            flagged.append(vid)
    return flagged


def _audit(db: sqlite_utils.Database, actor, action: str, doctor_id: int, detail: dict) -> None:
    audit.record(db, action, "doctor_schedule", doctor_id, actor=actor, detail=detail)


def _require_doctor(db: sqlite_utils.Database, doctor_id: int) -> None:
    if db.execute("SELECT 1 FROM doctors WHERE user_id = ?", [doctor_id]).fetchone() is None:
        raise NotFound(_("No such doctor."))


def add_template_sync(
    db: sqlite_utils.Database,
    doctor_id: int,
    weekday: int,
    start_local: str,
    end_local: str,
    *,
    tz: str,
    actor=None,
    valid_from: str | None = None,
    valid_until: str | None = None,
    now: float | None = None,
) -> list[int]:
    """Add a weekly session; returns the visits flagged for rescheduling (none, for an addition)."""
    _require_doctor(db, doctor_id)
    if not 0 <= weekday <= 6:
        raise BadRequest(_("Choose a day of the week."))
    start_local, end_local = check_hhmm(start_local), check_hhmm(end_local)
    if start_local >= end_local:
        raise BadRequest(_("A session must end after it starts."))
    valid_from = check_day(valid_from) if valid_from else None
    valid_until = check_day(valid_until) if valid_until else None
    db.execute(
        "INSERT INTO schedule_templates (doctor_id, weekday, start_local, end_local, valid_from, valid_until)"
        " VALUES (?,?,?,?,?,?)",
        [doctor_id, weekday, start_local, end_local, valid_from, valid_until],
    )
    _audit(db, actor, "schedule.template_add", doctor_id, {"weekday": weekday, "start": start_local})
    return reflag_visits(db, doctor_id, tz, time.time() if now is None else now)


def delete_template_sync(
    db: sqlite_utils.Database,
    doctor_id: int,
    template_id: int,
    *,
    tz: str,
    actor=None,
    now: float | None = None,
) -> list[int]:
    cur = db.execute(
        "DELETE FROM schedule_templates WHERE id = ? AND doctor_id = ?", [template_id, doctor_id]
    )
    if cur.rowcount == 0:
        raise NotFound(_("No such session."))
    _audit(db, actor, "schedule.template_delete", doctor_id, {"template_id": template_id})
    return reflag_visits(db, doctor_id, tz, time.time() if now is None else now)


def add_exception_sync(
    db: sqlite_utils.Database,
    doctor_id: int,
    day: str,
    kind: str,
    start_local: str | None = None,
    end_local: str | None = None,
    *,
    tz: str,
    note: str = "",
    actor=None,
    now: float | None = None,
) -> list[int]:
    """Leave (whole day when no times are given) or an extra session; returns visits flagged now."""
    _require_doctor(db, doctor_id)
    if kind not in ("leave", "extra"):
        raise BadRequest(_("Choose leave or an extra session."))
    day = check_day(day)
    start_local = check_hhmm(start_local) if start_local else None
    end_local = check_hhmm(end_local) if end_local else None
    if kind == "extra" and not (start_local and end_local):
        raise BadRequest(_("An extra session needs a start and an end time."))
    if (start_local is None) != (end_local is None):
        raise BadRequest(_("Give both a start and an end time, or neither for the whole day."))
    if start_local and end_local and start_local >= end_local:
        raise BadRequest(_("A session must end after it starts."))
    db.execute(
        "INSERT INTO schedule_exceptions (doctor_id, day, kind, start_local, end_local, note)"
        " VALUES (?,?,?,?,?,?)",
        [doctor_id, day, kind, start_local, end_local, note[:200]],
    )
    _audit(db, actor, "schedule.exception_add", doctor_id, {"day": day, "kind": kind})
    return reflag_visits(db, doctor_id, tz, time.time() if now is None else now)


def delete_exception_sync(
    db: sqlite_utils.Database,
    doctor_id: int,
    exception_id: int,
    *,
    tz: str,
    actor=None,
    now: float | None = None,
) -> list[int]:
    cur = db.execute(
        "DELETE FROM schedule_exceptions WHERE id = ? AND doctor_id = ?", [exception_id, doctor_id]
    )
    if cur.rowcount == 0:
        raise NotFound(_("No such exception."))
    _audit(db, actor, "schedule.exception_delete", doctor_id, {"exception_id": exception_id})
    return reflag_visits(db, doctor_id, tz, time.time() if now is None else now)
