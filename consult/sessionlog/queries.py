"""The admin list of sessions: filters from the query string, keyset pages, CSV-safe cells."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any, NamedTuple

import sqlite_utils

from consult.core.dates import filter_day
from consult.sessionlog.common import DEFAULT_TZ, END_REASONS, OUTCOMES, day_start

PAGE_SIZE = 50


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
            return filter_day(query, name, errors)

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


# The trigram index (migration 0021_user_search) knows substrings of at least this many characters.
TRIGRAM = 3


def _search_targets(db: sqlite_utils.Database, q: str) -> tuple[list[int], list[int]]:
    """(patient ids, visit ids) that a search box text can mean: name, phone, or visit id.

    A patient matches when the name holds ``q`` (LIKE: ASCII letters in either case, ``%`` and
    ``_`` as themselves) or, when ``q`` is 4 or more digits once spaces, brackets, ``+`` and ``-``
    are dropped, the number holds those digits; the first 500 by id. On SQLite a text of 3 or more
    characters first asks the trigram index (``user_search``) for the candidates, so the LIKE runs
    on those instead of on every account; the index folds case at least as widely as LIKE does, so
    it never drops a row the LIKE keeps. Shorter texts, and PostgreSQL (whose pg_trgm indexes the
    ILIKE uses by itself), run the LIKE alone.
    """
    visit_ids = [r[0] for r in db.execute("SELECT id FROM visits WHERE public_id = ?", [q]).fetchall()]
    digits = re.sub(r"[\s()+-]", "", q)
    if digits.isascii() and digits.isdigit() and len(digits) < 12:
        visit_ids.append(int(digits))
    like = "%" + q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    params: list[Any] = [like]
    phone_sql = ""
    phone = digits if digits.isdigit() and len(digits) >= 4 else ""
    if phone:
        phone_sql = " OR users.phone LIKE ?"
        params.append(f"%{phone}%")
    condition = "users.role = 'patient' AND (users.display_name LIKE ? ESCAPE '\\'" + phone_sql + ")"
    if len(q) >= TRIGRAM and getattr(db, "engine", "sqlite") == "sqlite":
        # The index's matches in id order, each looked up and checked, until 500 are kept: a
        # text that thousands of names hold stops early, as the scan did.
        match = "display_name : " + _phrase(q)
        if phone:
            match += " OR phone : " + _phrase(phone)
        sql = (
            "SELECT users.id FROM user_search CROSS JOIN users ON users.id = user_search.rowid"  # noqa: S608
            " WHERE user_search MATCH ? AND " + condition + " ORDER BY user_search.rowid LIMIT 500"
        )
        params.insert(0, match)
    else:
        sql = "SELECT users.id FROM users WHERE " + condition + " ORDER BY users.id LIMIT 500"  # noqa: S608
    patient_ids = [r[0] for r in db.execute(sql, params).fetchall()]
    return patient_ids, visit_ids


def _phrase(text: str) -> str:
    """``text`` as one FTS5 phrase: every character literal (a double quote doubled)."""
    return '"' + text.replace('"', '""') + '"'


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


def _page_sql(
    db: sqlite_utils.Database,
    f: Filters,
    cursor: tuple[int, int] | None,
    limit: int,
    tz: str,
    columns: str,
    joined: str,
) -> tuple[str, list[Any]] | None:
    """One keyset page: ``columns`` of the summaries, newest first, then ``joined`` from the
    visit, the patient (p), the doctor (d) and the department (dep); None if nothing can match.
    ``limit + 1`` rows are asked for: one more than a page says whether there is a next page,
    so no page ever counts the matches."""
    built = _where(db, f, tz)
    if built is None:
        return None
    where, params = built
    if cursor is not None:
        where.append("(s.scheduled_start, s.visit_id) < (?, ?)")
        params.extend(cursor)
    sql = (
        f"WITH page AS (SELECT {columns} FROM session_summaries s"  # noqa: S608 - fixed fragments
        + (" WHERE " + " AND ".join(where) if where else "")
        + " ORDER BY s.scheduled_start DESC, s.visit_id DESC LIMIT ?)"  # noqa: S608 - fixed fragments
        f" SELECT {joined}"
        " FROM page JOIN visits v ON v.id = page.visit_id JOIN users p ON p.id = page.patient_id"
        " JOIN users d ON d.id = page.doctor_id JOIN departments dep ON dep.id = page.department_id"
        " ORDER BY page.scheduled_start DESC, page.visit_id DESC"
    )
    return sql, [*params, limit + 1]


def list_sessions_sync(
    db: sqlite_utils.Database,
    f: Filters,
    cursor: tuple[int, int] | None = None,
    *,
    limit: int = PAGE_SIZE,
    tz: str = DEFAULT_TZ,
) -> tuple[list[dict[str, Any]], tuple[int, int] | None]:
    """One page, newest first, every column, and the cursor of the next page (None on the last one)."""
    built = _page_sql(
        db,
        f,
        cursor,
        limit,
        tz,
        LIST_COLUMNS,
        "page.*, v.public_id, p.display_name AS patient_name, p.phone AS patient_phone,"
        " d.display_name AS doctor_name, dep.name_en AS department_name_en,"
        " dep.name_zh AS department_name_zh",
    )
    if built is None:
        return [], None
    rows = [dict(r) for r in db.execute(*built).fetchall()]
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        next_cursor = (rows[-1]["scheduled_start"], rows[-1]["visit_id"])
    return rows, next_cursor


class PageRow(NamedTuple):
    """What one line of the admin list shows, in the order `list_page_sync` selects it."""

    visit_id: int
    scheduled_start: int
    outcome: str
    end_reason: str | None
    connected_seconds: float
    used_turn: int
    reconnects: int
    public_id: str
    patient_name: str
    doctor_name: str
    department_name_en: str
    department_name_zh: str


def list_page_sync(
    db: sqlite_utils.Database,
    f: Filters,
    cursor: tuple[int, int] | None = None,
    *,
    limit: int = PAGE_SIZE,
    tz: str = DEFAULT_TZ,
) -> tuple[list[PageRow], tuple[int, int] | None]:
    """`list_sessions_sync` narrowed to the columns the list page shows, as plain tuples.

    The page is read 8 admins at once: a dict per row of every column cost more than the query
    itself (the reader holds the GIL while it builds them).
    """
    built = _page_sql(
        db,
        f,
        cursor,
        limit,
        tz,
        "s.visit_id, s.scheduled_start, s.outcome, s.end_reason, s.connected_seconds, s.used_turn,"
        " s.reconnects, s.patient_id, s.doctor_id, s.department_id",
        "page.visit_id, page.scheduled_start, page.outcome, page.end_reason, page.connected_seconds,"
        " page.used_turn, page.reconnects, v.public_id, p.display_name, d.display_name, dep.name_en,"
        " dep.name_zh",
    )
    if built is None:
        return [], None
    rows = [PageRow._make(r) for r in db.execute(*built).fetchall()]
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        next_cursor = (rows[-1].scheduled_start, rows[-1].visit_id)
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


def filter_choices_sync(
    db: sqlite_utils.Database,
) -> tuple[tuple[tuple[int, str, str], ...], tuple[tuple[int, str], ...]]:
    """The filter form's choices: departments as (id, name_en, name_zh), doctors as (id, name).
    Plain tuples: every list page reads them, and the page caches its options by their value."""
    departments = db.execute("SELECT id, name_en, name_zh FROM departments ORDER BY sort, id").fetchall()
    doctors = db.execute(
        "SELECT u.id, u.display_name FROM doctors d JOIN users u ON u.id = d.user_id ORDER BY u.display_name"
    ).fetchall()
    return tuple(tuple(r) for r in departments), tuple(tuple(r) for r in doctors)


# -- CSV --------------------------------------------------------------------------------------

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_safe(value: Any) -> Any:
    """Spreadsheets run a cell that starts with = + - @ as a formula: make it text."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value
