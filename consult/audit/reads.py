"""Recording reads of patient data, and the queries behind the audit pages.

``consult.audit`` owns the chain (append, verify); this module is what views use: one call per
read of patient data, and keyset-paginated searches for admins and for a patient's own log.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any

import sqlite_utils
from aiohttp import web

from consult.audit import chain as audit
from consult.core import keys, security
from consult.core.dates import DEFAULT_TZ, day_start, filter_day

# Actions that only read. A patient's access log shows these; changes have their own pages.
READ_SUFFIXES = (".view", ".list", ".export", ".play", ".download", ".search")
PAGE_SIZE = 50


async def audit_read(
    request: web.Request,
    action: str,
    object_type: str,
    object_id: str | int | None,
    subject_user_id: int | None,
    **detail: Any,
) -> None:
    """Append exactly one audit entry for a read of patient data by the signed-in user.

    Call it once per request that returns patient data, after the authorization check and
    before the response is sent: ``await audit_read(request, "visit.view", "visit", v["id"],
    v["patient_id"])``. ``action`` ends with one of ``READ_SUFFIXES``.
    """
    if not action.endswith(READ_SUFFIXES):
        raise ValueError(f"read action {action!r} must end with one of {READ_SUFFIXES}")
    user = request.get(keys.USER)
    # Built by hand, not with audit.record: an anonymous reader is stored with actor_role NULL,
    # where audit.record would store "system" (the server itself), which it is not.
    entry = audit.AuditEntry(
        action=action,
        object_type=object_type,
        object_id=None if object_id is None else str(object_id),
        actor_id=getattr(user, "id", None),
        actor_role=getattr(user, "role", None),
        remote=security.client_address(request),
        subject_user_id=subject_user_id,
        detail=detail,
    )
    await request.app[keys.DB].execute_write_fn(lambda db: audit.append(db, entry))


def _is_read_sql(column: str = "a.action") -> str:
    return "(" + " OR ".join(f"{column} LIKE '%{s}'" for s in READ_SUFFIXES) + ")"


@dataclass(frozen=True)
class AuditFilters:
    actor: str = ""  # id, username, phone or name
    subject: str = ""  # patient id, phone or name
    action: str = ""  # exact, or a prefix ending in "." ("report.")
    object_type: str = ""
    object_id: str = ""
    date_from: date | None = None
    date_to: date | None = None
    errors: tuple[str, ...] = field(default=(), compare=False)

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> AuditFilters:
        errors: list[str] = []

        def day(name: str) -> date | None:
            return filter_day(query, name, errors)

        def text(name: str) -> str:
            return (query.get(name) or "").strip()[:100]

        return cls(
            actor=text("actor"),
            subject=text("subject"),
            action=text("action"),
            object_type=text("object_type"),
            object_id=text("object_id"),
            date_from=day("from"),
            date_to=day("to"),
            errors=tuple(errors),
        )

    def to_query(self) -> dict[str, str]:
        values = {
            "actor": self.actor,
            "subject": self.subject,
            "action": self.action,
            "object_type": self.object_type,
            "object_id": self.object_id,
            "from": self.date_from.isoformat() if self.date_from else "",
            "to": self.date_to.isoformat() if self.date_to else "",
        }
        return {k: v for k, v in values.items() if v}


def _users_matching(db: sqlite_utils.Database, text: str, patients_only: bool) -> list[int]:
    if text.isascii() and text.isdigit() and len(text) < 7:
        return [int(text)]
    like = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    role = " AND role = 'patient'" if patients_only else ""
    return [
        r[0]
        for r in db.execute(
            "SELECT id FROM users WHERE (display_name LIKE ? ESCAPE '\\' OR username = ? OR phone LIKE ?)"  # noqa: S608
            + role
            + " LIMIT 200",
            [like, text.lower(), f"%{re.sub(r'[^0-9]', '', text) or '-'}%"],
        ).fetchall()
    ]


SELECT = (
    "SELECT a.id, a.created, a.actor_id, a.actor_role, a.remote, a.action, a.object_type,"
    " a.object_id, a.subject_user_id, a.detail, au.display_name AS actor_name,"
    " su.display_name AS subject_name FROM audit_log a"
    " LEFT JOIN users au ON au.id = a.actor_id LEFT JOIN users su ON su.id = a.subject_user_id"
)


def search_sync(
    db: sqlite_utils.Database,
    f: AuditFilters,
    before_id: int | None = None,
    *,
    limit: int = PAGE_SIZE,
    tz: str = DEFAULT_TZ,
) -> tuple[list[dict[str, Any]], int | None]:
    """Newest first; returns the rows and the id to pass as ``before_id`` for the next page."""
    where: list[str] = []
    params: list[Any] = []
    for text, patients_only, column in ((f.actor, False, "actor_id"), (f.subject, True, "subject_user_id")):
        if text:
            ids = _users_matching(db, text, patients_only)
            if not ids:
                return [], None
            where.append(f"a.{column} IN ({', '.join('?' for _ in ids)})")
            params.extend(ids)
    if f.action:
        if f.action.endswith("."):
            where.append("a.action >= ? AND a.action < ?")
            params.extend([f.action, f.action[:-1] + "/"])  # '/' sorts right after '.'
        else:
            where.append("a.action = ?")
            params.append(f.action)
    if f.object_type:
        where.append("a.object_type = ?")
        params.append(f.object_type)
    if f.object_id:
        where.append("a.object_id = ?")
        params.append(f.object_id)
    if f.date_from:
        where.append("a.created >= ?")
        params.append(day_start(f.date_from, tz))
    if f.date_to:
        where.append("a.created < ?")
        params.append(day_start(f.date_to + timedelta(days=1), tz))
    if before_id is not None:
        where.append("a.id < ?")
        params.append(before_id)
    sql = SELECT + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY a.id DESC LIMIT ?"
    rows = [dict(r) for r in db.execute(sql, [*params, limit + 1]).fetchall()]
    if len(rows) > limit:
        rows = rows[:limit]
        return rows, rows[-1]["id"]
    return rows, None


def access_log_sync(
    db: sqlite_utils.Database, patient_id: int, before_id: int | None = None, *, limit: int = PAGE_SIZE
) -> tuple[list[dict[str, Any]], int | None]:
    """Who else read this patient's records: reads only, the patient's own reads left out."""
    params: list[Any] = [patient_id, patient_id]
    extra = ""
    if before_id is not None:
        extra = " AND a.id < ?"
        params.append(before_id)
    rows = [
        dict(r)
        for r in db.execute(
            SELECT
            + " WHERE a.subject_user_id = ? AND (a.actor_id IS NULL OR a.actor_id != ?) AND "
            + _is_read_sql()
            + extra
            + " ORDER BY a.id DESC LIMIT ?",
            [*params, limit + 1],
        ).fetchall()
    ]
    if len(rows) > limit:
        rows = rows[:limit]
        return rows, rows[-1]["id"]
    return rows, None


def parse_before(raw: str | None) -> int | None:
    return int(raw) if raw and raw.isascii() and raw.isdigit() and len(raw) < 16 else None
