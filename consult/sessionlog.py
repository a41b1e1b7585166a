"""Session logs: compact per-visit summaries and quality samples, and the admin queries over them.

The call engineer's ``session_events`` table keeps every signaling event verbatim (the
timeline). This module folds each event into one ``session_summaries`` row as it arrives, so
the admin list, its filters and the overview never scan events: ``apply_event_sync`` runs in
the writer transaction that stores the event, and is O(1) per event.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import sqlite_utils

from consult import useragent

DEFAULT_TZ = "Asia/Shanghai"  # Settings.timezone's default; callers pass the configured one
OUTCOMES = ("completed", "no_show", "failed", "cancelled", "in_progress")
END_REASONS = ("time_limit", "host_ended", "patient_left", "connection_failed", "no_show")
SAMPLE_FIELDS = ("bitrate_kbps", "loss_pct", "jitter_ms", "fps", "width", "height", "freezes", "rtt_ms")
# Upper bounds keep one hostile client from storing absurd numbers; all fit SQLite's small ints.
_SAMPLE_LIMITS = {
    "bitrate_kbps": 100_000,
    "loss_pct": 100,
    "jitter_ms": 60_000,
    "fps": 240,
    "width": 8192,
    "height": 8192,
    "freezes": 100_000,
    "rtt_ms": 60_000,
}
# camelCase names as they come out of getStats(), for clients that forward them unchanged.
_SAMPLE_ALIASES = {
    "framesPerSecond": "fps",
    "frameWidth": "width",
    "frameHeight": "height",
    "freezeCount": "freezes",
}
MAX_SAMPLES_PER_VISIT = 4000  # both sides, one every 2-5 s: hours of call
_INSERT_SAMPLE = (
    "INSERT INTO quality_samples (visit_id, role, t, "  # noqa: S608 - fixed column names
    + ", ".join(SAMPLE_FIELDS)
    + ") VALUES (?, ?, ?, "
    + ", ".join("?" for _ in SAMPLE_FIELDS)
    + ")"
)
_ROLES = {"host": "doctor", "doctor": "doctor", "guest": "patient", "patient": "patient"}
_STATE_COLUMNS = (
    "room_opened",
    "first_joined_patient",
    "first_joined_doctor",
    "started_at",
    "ended_at",
    "end_reason",
    "outcome",
    "connected_seconds",
    "used_turn",
    "reconnects",
    "ice_restarts",
    "patient_device",
    "doctor_device",
    "recording",
    "patient_present",
    "doctor_present",
    "patient_left_reason",
    "doctor_left_reason",
    "both_since",
    "ice_failed",
    "samples",
)


def local_day(ts: float, tz: str) -> str:
    return datetime.fromtimestamp(ts, UTC).astimezone(ZoneInfo(tz)).date().isoformat()


def day_start(day: date, tz: str) -> int:
    return int(datetime(day.year, day.month, day.day, tzinfo=ZoneInfo(tz)).timestamp())


def side(role: str | None) -> str | None:
    """Signaling seats (host/guest) and application roles (doctor/patient) name the same sides."""
    return _ROLES.get(role or "")


def mask_address(remote: str | None) -> str | None:
    """The network part only, as ``security.client_address`` stores it when masking is on."""
    if not remote:
        return remote
    if ":" in remote:
        return ":".join(remote.split(":")[:3]) + "::/48"
    return ".".join(remote.split(".")[:3]) + ".0/24"


# -- folding events into a summary ----------------------------------------------------------


def _ensure_summary(db: sqlite_utils.Database, visit_id: int, tz: str) -> dict[str, Any] | None:
    row = db.execute("SELECT * FROM session_summaries WHERE visit_id = ?", [visit_id]).fetchone()
    if row is not None:
        return dict(row)
    visit = db.execute(
        "SELECT id, department_id, doctor_id, patient_id, starts_at FROM visits WHERE id = ?", [visit_id]
    ).fetchone()
    if visit is None:
        return None
    db.execute(
        "INSERT INTO session_summaries (visit_id, department_id, doctor_id, patient_id, day,"
        " scheduled_start) VALUES (?, ?, ?, ?, ?, ?)",
        [visit[0], visit[1], visit[2], visit[3], local_day(visit[4], tz), visit[4]],
    )
    return dict(db.execute("SELECT * FROM session_summaries WHERE visit_id = ?", [visit_id]).fetchone())


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def normalize_sample(sample: Any) -> dict[str, int] | None:
    """A client's stats sample as bounded integers; None when it carries nothing we chart."""
    if not isinstance(sample, Mapping):
        return None
    out: dict[str, int] = {}
    for key, raw in sample.items():
        name = _SAMPLE_ALIASES.get(key, key)
        if name not in _SAMPLE_LIMITS or name in out:
            continue
        value = _number(raw)
        if value is None:
            continue
        out[name] = round(min(max(value, 0.0), _SAMPLE_LIMITS[name]))
    return out or None


def _close_connected(s: dict[str, Any], at: float) -> None:
    if s["both_since"] is not None:
        s["connected_seconds"] += max(0, round(at - s["both_since"]))
        s["both_since"] = None


def _finish(s: dict[str, Any], reason: str | None, at: float) -> None:
    _close_connected(s, at)
    s["ended_at"] = s["ended_at"] or at
    if s["first_joined_patient"] is None:
        end_reason = "no_show"
    elif reason == "time_limit" and not s["patient_present"] and s["patient_left_reason"] == "left":
        end_reason = "patient_left"
    elif reason == "time_limit" and (
        s["ice_failed"]
        or (not s["patient_present"] and s["patient_left_reason"] == "disconnected")
        or (not s["doctor_present"] and s["doctor_left_reason"] == "disconnected")
    ):
        end_reason = "connection_failed"
    else:
        end_reason = reason if reason in END_REASONS else None
    s["end_reason"] = end_reason
    if end_reason == "no_show":
        s["outcome"] = "no_show"
    elif end_reason == "connection_failed" or s["started_at"] is None:
        s["outcome"] = "failed"
    else:
        s["outcome"] = "completed"
    s["patient_present"] = s["doctor_present"] = 0


def apply_event_sync(
    db: sqlite_utils.Database,
    visit_id: int,
    name: str,
    role: str | None,
    created: float,
    data: dict[str, Any],
    *,
    tz: str = DEFAULT_TZ,
) -> None:
    """Fold one room event into the visit's summary (and quality samples). Writer thread only.

    ``role`` may be a signaling seat (host/guest) or an application role (doctor/patient).
    Events for unknown visits are ignored: a log must never make the call's write fail.
    """
    s = _ensure_summary(db, visit_id, tz)
    if s is None:
        return
    before = dict(s)
    who = side(role)
    data = data if isinstance(data, dict) else {}
    if name == "room_opened":
        s["room_opened"] = s["room_opened"] or created
        if s["outcome"] in ("in_progress", "no_show") and s["ended_at"] is None:
            s["outcome"] = "in_progress"
    elif name == "joined" and who:
        if s[f"first_joined_{who}"] is None:
            s[f"first_joined_{who}"] = created
        s[f"{who}_device"] = useragent.label(data.get("user_agent"))[:120]
        s[f"{who}_present"] = 1
        if who == "patient" and s["outcome"] == "no_show":
            s["outcome"], s["end_reason"] = "in_progress", None  # late, but came while it was open
        if s["started_at"] is not None and s["ended_at"] is None and s["patient_present"]:
            if s["doctor_present"] and s["both_since"] is None:
                s["both_since"] = created
    elif name == "left" and who:
        s[f"{who}_present"] = 0
        s[f"{who}_left_reason"] = str(data.get("reason") or "left")[:20]
        _close_connected(s, created)
    elif name == "clock_started":
        started = _number(data.get("started_at")) or created
        s["started_at"] = s["started_at"] or started
        s["patient_present"] = s["doctor_present"] = 1  # the clock starts only with both there
        s["both_since"] = s["both_since"] or started
    elif name == "ice_state":
        if data.get("pair_type") == "relay":
            s["used_turn"] = 1
        state = data.get("state")
        if state == "failed":
            s["ice_failed"] = 1
        elif state in ("connected", "completed"):
            s["ice_failed"] = 0
    elif name == "reconnect":
        s["reconnects"] += 1
    elif name == "ice_restart":
        s["ice_restarts"] += 1
    elif name in ("recording_started", "recording"):
        s["recording"] = 1
    elif name == "ended":
        _finish(s, data.get("reason"), created)
    elif name == "stats" and who and s["samples"] < MAX_SAMPLES_PER_VISIT:
        sample = normalize_sample(data.get("sample"))
        if sample is not None:
            base = s["started_at"] or s["room_opened"] or s["scheduled_start"]
            db.execute(
                _INSERT_SAMPLE,
                [visit_id, who, max(0, int(created - base)), *(sample.get(f) for f in SAMPLE_FIELDS)],
            )
            s["samples"] += 1
    changed = [c for c in _STATE_COLUMNS if s[c] != before[c]]
    if changed:
        db.execute(
            "UPDATE session_summaries SET "  # noqa: S608 - column names come from _STATE_COLUMNS
            + ", ".join(f"{c} = ?" for c in changed)
            + " WHERE visit_id = ?",
            [*(s[c] for c in changed), visit_id],
        )


def mark_no_shows_sync(
    db: sqlite_utils.Database, now: float, *, tz: str = DEFAULT_TZ, lookback_s: float = 7 * 86400
) -> int:
    """Close visits whose window passed without the patient joining; record cancelled ones.

    Idempotent, and bounded by ``lookback_s`` so that it can run every reaper interval.
    Returns how many summaries it wrote.
    """
    rows = db.execute(
        "SELECT v.id, v.status, v.ends_at, s.visit_id IS NOT NULL AS has_summary,"
        " s.first_joined_patient, s.outcome FROM visits v"
        " LEFT JOIN session_summaries s ON s.visit_id = v.id"
        " WHERE v.status IN ('confirmed', 'completed', 'no_show', 'cancelled')"
        " AND v.starts_at >= ? AND v.starts_at < ? AND v.ends_at <= ?",
        [int(now - lookback_s), int(now), now],
    ).fetchall()
    written = 0
    for visit_id, status, ends_at, has_summary, patient_joined, outcome in rows:
        if status == "cancelled":
            if not has_summary:
                _ensure_summary(db, visit_id, tz)
                db.execute(
                    "UPDATE session_summaries SET outcome = 'cancelled' WHERE visit_id = ?", [visit_id]
                )
                written += 1
            continue
        if patient_joined is not None or (has_summary and outcome != "in_progress"):
            continue
        s = _ensure_summary(db, visit_id, tz)
        if s is None:
            continue
        _finish(s, "no_show", min(now, float(ends_at)))
        db.execute(
            "UPDATE session_summaries SET ended_at = ?, end_reason = ?, outcome = ?, both_since = NULL,"
            " patient_present = 0, doctor_present = 0, connected_seconds = ? WHERE visit_id = ?",
            [s["ended_at"], s["end_reason"], s["outcome"], s["connected_seconds"], visit_id],
        )
        written += 1
    return written


# -- the admin list ---------------------------------------------------------------------------

PAGE_SIZE = 50
MIN_FILTER_DAY, MAX_FILTER_DAY = date(1900, 1, 1), date(9000, 12, 31)
_CURSOR = re.compile(r"^(-?\d{1,12})\.(\d{1,12})$")


@dataclass(frozen=True)
class Filters:
    date_from: date | None = None
    date_to: date | None = None
    department_id: int | None = None
    doctor_id: int | None = None
    outcome: str | None = None
    end_reason: str | None = None
    q: str = ""
    errors: tuple[str, ...] = field(default=(), compare=False)

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> Filters:
        """Lenient: a value that does not parse is dropped and named in ``errors``."""
        errors: list[str] = []

        def day(name: str) -> date | None:
            raw = (query.get(name) or "").strip()
            if not raw:
                return None
            try:
                found = date.fromisoformat(raw)
            except ValueError:
                found = None
            # Far-off years overflow the day arithmetic and timestamps further on.
            if found is None or not MIN_FILTER_DAY <= found <= MAX_FILTER_DAY:
                errors.append(name)
                return None
            return found

        def integer(name: str) -> int | None:
            raw = (query.get(name) or "").strip()
            if not raw:
                return None
            if raw.isascii() and raw.isdigit() and len(raw) < 12:
                return int(raw)
            errors.append(name)
            return None

        def choice(name: str, allowed: tuple[str, ...]) -> str | None:
            raw = (query.get(name) or "").strip()
            if raw and raw not in allowed:
                errors.append(name)
            return raw if raw in allowed else None

        return cls(
            date_from=day("from"),
            date_to=day("to"),
            department_id=integer("department"),
            doctor_id=integer("doctor"),
            outcome=choice("outcome", OUTCOMES),
            end_reason=choice("end_reason", END_REASONS),
            q=(query.get("q") or "").strip()[:100],
            errors=tuple(errors),
        )

    def to_query(self) -> dict[str, str]:
        values = {
            "from": self.date_from.isoformat() if self.date_from else "",
            "to": self.date_to.isoformat() if self.date_to else "",
            "department": str(self.department_id or ""),
            "doctor": str(self.doctor_id or ""),
            "outcome": self.outcome or "",
            "end_reason": self.end_reason or "",
            "q": self.q,
        }
        return {k: v for k, v in values.items() if v}


def encode_cursor(scheduled_start: int, visit_id: int) -> str:
    return f"{scheduled_start}.{visit_id}"


def decode_cursor(raw: str | None) -> tuple[int, int] | None:
    m = _CURSOR.match(raw or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def _search_targets(db: sqlite_utils.Database, q: str) -> tuple[list[int], list[int]]:
    """(patient ids, visit ids) that a search box text can mean: name, phone, or visit id."""
    visit_ids = [r[0] for r in db.execute("SELECT id FROM visits WHERE public_id = ?", [q]).fetchall()]
    digits = re.sub(r"[\s()+-]", "", q)
    if digits.isascii() and digits.isdigit() and len(digits) < 12:
        visit_ids.append(int(digits))
    like = "%" + q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    params: list[Any] = [like]
    phone_sql = ""
    if digits.isdigit() and len(digits) >= 4:
        phone_sql = " OR phone LIKE ?"
        params.append(f"%{digits}%")
    patient_ids = [
        r[0]
        for r in db.execute(
            "SELECT id FROM users WHERE role = 'patient' AND (display_name LIKE ? ESCAPE '\\'"  # noqa: S608
            + phone_sql
            + ") LIMIT 500",
            params,
        ).fetchall()
    ]
    return patient_ids, visit_ids


def _where(db: sqlite_utils.Database, f: Filters, tz: str) -> tuple[list[str], list[Any]] | None:
    where: list[str] = []
    params: list[Any] = []
    # Dates become scheduled_start bounds, so that one index serves the range and the order.
    if f.date_from:
        where.append("s.scheduled_start >= ?")
        params.append(day_start(f.date_from, tz))
    if f.date_to:
        where.append("s.scheduled_start < ?")
        params.append(day_start(f.date_to + timedelta(days=1), tz))
    for column, value in (
        ("department_id", f.department_id),
        ("doctor_id", f.doctor_id),
        ("outcome", f.outcome),
        ("end_reason", f.end_reason),
    ):
        if value is not None:
            where.append(f"s.{column} = ?")
            params.append(value)
    if f.q:
        patient_ids, visit_ids = _search_targets(db, f.q)
        if not patient_ids and not visit_ids:
            return None
        parts = []
        if patient_ids:
            parts.append(f"s.patient_id IN ({', '.join('?' for _ in patient_ids)})")
            params.extend(patient_ids)
        if visit_ids:
            parts.append(f"s.visit_id IN ({', '.join('?' for _ in visit_ids)})")
            params.extend(visit_ids)
        where.append("(" + " OR ".join(parts) + ")")
    return where, params


LIST_COLUMNS = (
    "s.visit_id, s.scheduled_start, s.day, s.outcome, s.end_reason, s.started_at, s.ended_at,"
    " s.connected_seconds, s.used_turn, s.reconnects, s.ice_restarts, s.patient_device,"
    " s.doctor_device, s.recording, s.room_opened, s.first_joined_patient, s.first_joined_doctor,"
    " s.patient_id, s.doctor_id, s.department_id"
)


def list_sessions_sync(
    db: sqlite_utils.Database,
    f: Filters,
    cursor: tuple[int, int] | None = None,
    *,
    limit: int = PAGE_SIZE,
    tz: str = DEFAULT_TZ,
) -> tuple[list[dict[str, Any]], tuple[int, int] | None]:
    """One page, newest first, and the cursor of the next page (None on the last one)."""
    built = _where(db, f, tz)
    if built is None:
        return [], None
    where, params = built
    if cursor is not None:
        where.append("(s.scheduled_start, s.visit_id) < (?, ?)")
        params.extend(cursor)
    sql = (
        f"WITH page AS (SELECT {LIST_COLUMNS} FROM session_summaries s"  # noqa: S608 - fixed fragments
        + (" WHERE " + " AND ".join(where) if where else "")
        + " ORDER BY s.scheduled_start DESC, s.visit_id DESC LIMIT ?)"
        " SELECT page.*, v.public_id, p.display_name AS patient_name, p.phone AS patient_phone,"
        " d.display_name AS doctor_name, dep.name_en AS department_name_en,"
        " dep.name_zh AS department_name_zh"
        " FROM page JOIN visits v ON v.id = page.visit_id JOIN users p ON p.id = page.patient_id"
        " JOIN users d ON d.id = page.doctor_id JOIN departments dep ON dep.id = page.department_id"
        " ORDER BY page.scheduled_start DESC, page.visit_id DESC"
    )
    rows = [dict(r) for r in db.execute(sql, [*params, limit + 1]).fetchall()]
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        next_cursor = (rows[-1]["scheduled_start"], rows[-1]["visit_id"])
    return rows, next_cursor


def iter_sessions_sync(
    db: sqlite_utils.Database, f: Filters, *, chunk: int = 1000, tz: str = DEFAULT_TZ
) -> Iterator[list[dict[str, Any]]]:
    """Every matching session in pages of ``chunk`` (for exports), each page one query."""
    cursor = None
    while True:
        rows, cursor = list_sessions_sync(db, f, cursor, limit=chunk, tz=tz)
        if rows:
            yield rows
        if cursor is None:
            return


def filter_choices_sync(db: sqlite_utils.Database) -> dict[str, list[dict[str, Any]]]:
    departments = db.execute("SELECT id, name_en, name_zh FROM departments ORDER BY sort, id").fetchall()
    doctors = db.execute(
        "SELECT u.id, u.display_name FROM doctors d JOIN users u ON u.id = d.user_id ORDER BY u.display_name"
    ).fetchall()
    return {"departments": [dict(r) for r in departments], "doctors": [dict(r) for r in doctors]}


# -- one session ------------------------------------------------------------------------------


def _has_table(db: sqlite_utils.Database, name: str) -> bool:
    return (
        db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", [name]).fetchone()
        is not None
    )


MAX_TIMELINE = 3000


def session_detail_sync(db: sqlite_utils.Database, public_id: str) -> dict[str, Any] | None:
    visit = db.execute(
        "SELECT v.id, v.public_id, v.patient_id, v.doctor_id, v.starts_at, v.ends_at, v.status,"
        " p.display_name AS patient_name, p.phone AS patient_phone, d.display_name AS doctor_name,"
        " dep.name_en AS department_name_en, dep.name_zh AS department_name_zh"
        " FROM visits v JOIN users p ON p.id = v.patient_id JOIN users d ON d.id = v.doctor_id"
        " JOIN departments dep ON dep.id = v.department_id WHERE v.public_id = ?",
        [public_id],
    ).fetchone()
    if visit is None:
        return None
    visit = dict(visit)
    summary = db.execute("SELECT * FROM session_summaries WHERE visit_id = ?", [visit["id"]]).fetchone()
    events: list[dict[str, Any]] = []
    stats_events = 0
    if _has_table(db, "session_events"):
        # Stats are charted below, not listed: a 15-minute call sends hundreds of them.
        stats_events = db.execute(
            "SELECT count(*) FROM session_events WHERE visit_id = ? AND name = 'stats'", [visit["id"]]
        ).fetchone()[0]
        for r in db.execute(
            "SELECT created, name, role, data FROM session_events WHERE visit_id = ? AND name != 'stats'"
            " ORDER BY created, rowid LIMIT ?",
            [visit["id"], MAX_TIMELINE],
        ):
            try:
                data = json.loads(r["data"] or "{}")
            except (TypeError, ValueError):
                data = {}
            events.append(
                {
                    "created": r["created"],
                    "name": r["name"],
                    "role": r["role"],
                    "side": side(r["role"]),
                    "data": data if isinstance(data, dict) else {},
                }
            )
    samples: dict[str, list[dict[str, Any]]] = {"patient": [], "doctor": []}
    for r in db.execute(
        "SELECT role, t, " + ", ".join(SAMPLE_FIELDS) + " FROM quality_samples"  # noqa: S608
        " WHERE visit_id = ? ORDER BY role, t",
        [visit["id"]],
    ):
        samples[r["role"]].append(dict(r))
    return {
        "visit": visit,
        "summary": dict(summary) if summary else None,
        "events": events,
        "stats_events": stats_events,
        "samples": samples,
    }


def describe_event(event: Mapping[str, Any], *, mask: bool) -> dict[str, str]:
    """What the timeline shows of an event's data: device and address for joins, etc.

    Chat text is patient data said in the call; the timeline records that a message was sent,
    not what it said.
    """
    data = event.get("data") or {}
    out: dict[str, str] = {}
    if event["name"] in ("joined", "replaced"):
        if data.get("user_agent"):
            out["device"] = useragent.label(str(data["user_agent"]))
        remote = data.get("remote")
        if remote:
            out["address"] = str(mask_address(str(remote)) if mask else remote)
    elif event["name"] == "ice_state":
        out["state"] = str(data.get("state") or "")
        if data.get("pair_type"):
            out["pair"] = str(data["pair_type"])
        if _number(data.get("rtt_ms")) is not None:
            out["rtt"] = f"{_number(data['rtt_ms']):.0f} ms"
    elif event["name"] in ("left", "ended"):
        out["reason"] = str(data.get("reason") or "")
    elif event["name"] == "warning":
        out["seconds_left"] = str(data.get("seconds_left") or "")
    elif (
        event["name"] == "clock_started" and _number(data.get("ends_at")) and _number(data.get("started_at"))
    ):
        out["minutes"] = f"{(data['ends_at'] - data['started_at']) / 60:.0f}"
    elif event["name"] == "error":
        out["code"] = str(data.get("code") or "")
    elif event["name"] == "chat":
        out["chars"] = str(len(str(data.get("text") or "")))
    return {k: v for k, v in out.items() if v}


# -- the overview -----------------------------------------------------------------------------


@dataclass(frozen=True)
class DayStats:
    day: str
    visits: int = 0
    completed: int = 0
    no_show: int = 0
    failed: int = 0
    cancelled: int = 0
    turn: int = 0
    connected_seconds: int = 0

    @property
    def concluded(self) -> int:
        """Visits that happened or should have: the base of the rates."""
        return self.completed + self.no_show + self.failed

    def rate(self, part: int, base: int) -> float | None:
        return part / base if base else None

    @property
    def completion_rate(self) -> float | None:
        return self.rate(self.completed, self.concluded)

    @property
    def no_show_rate(self) -> float | None:
        return self.rate(self.no_show, self.concluded)

    @property
    def turn_share(self) -> float | None:
        return self.rate(self.turn, self.completed + self.failed)

    @property
    def avg_connected_minutes(self) -> float | None:
        return self.connected_seconds / self.completed / 60 if self.completed else None


def overview_sync(db: sqlite_utils.Database, first: date, last: date) -> list[DayStats]:
    """One entry per day from ``first`` to ``last`` inclusive, days without visits included."""
    found = {
        r[0]: DayStats(
            day=r[0],
            visits=r[1],
            completed=r[2] or 0,
            no_show=r[3] or 0,
            failed=r[4] or 0,
            cancelled=r[5] or 0,
            turn=r[6] or 0,
            connected_seconds=r[7] or 0,
        )
        for r in db.execute(
            "SELECT day, count(*), sum(outcome = 'completed'), sum(outcome = 'no_show'),"
            " sum(outcome = 'failed'), sum(outcome = 'cancelled'),"
            " sum(used_turn AND outcome IN ('completed', 'failed')),"
            " sum(CASE WHEN outcome = 'completed' THEN connected_seconds END)"
            " FROM session_summaries WHERE day BETWEEN ? AND ? GROUP BY day",
            [first.isoformat(), last.isoformat()],
        )
    }
    out = []
    d = first
    while d <= last:
        out.append(found.get(d.isoformat(), DayStats(day=d.isoformat())))
        d += timedelta(days=1)
    return out


def totals(days: list[DayStats]) -> DayStats:
    total = DayStats(day="")
    for d in days:
        total = replace(
            total,
            visits=total.visits + d.visits,
            completed=total.completed + d.completed,
            no_show=total.no_show + d.no_show,
            failed=total.failed + d.failed,
            cancelled=total.cancelled + d.cancelled,
            turn=total.turn + d.turn,
            connected_seconds=total.connected_seconds + d.connected_seconds,
        )
    return total


# -- CSV --------------------------------------------------------------------------------------

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_safe(value: Any) -> Any:
    """Spreadsheets run a cell that starts with = + - @ as a formula: make it text."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value
