"""Test reports attached to a visit: who may add, read and remove them, and the rows themselves.

Files are handled by ``consult.uploads``; this module decides access and keeps the database and
the disk in step (a row never exists without its file, and a refused upload leaves neither).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlite_utils

from consult.accounts.users import User
from consult.audit import chain as audit
from consult.clinical import uploads
from consult.core.db import Database
from consult.core.errors import Conflict, Forbidden, NotFound, PayloadTooLarge
from consult.core.i18n import _

EDITABLE_STATUSES = ("held", "confirmed")
MAX_REPORTS_PER_VISIT = 30
MB = 1024 * 1024

REPORT_COLUMNS = "id, visit_id, owner_id, display_name, stored_name, content_type, size, sha256, created"


@dataclass(frozen=True)
class Report:
    id: int
    visit_id: int
    owner_id: int
    display_name: str
    stored_name: str
    content_type: str
    size: int
    sha256: str
    created: float

    @classmethod
    def from_row(cls, row: sqlite3.Row | dict[str, Any]) -> Report:
        return cls(**{k: row[k] for k in cls.__dataclass_fields__})

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.display_name,
            "content_type": self.content_type,
            "size": self.size,
            "sha256": self.sha256,
            "created": self.created,
        }


# -- access -----------------------------------------------------------------------------------


async def visit_by_public_id(db: Database, public_id: str) -> dict[str, Any] | None:
    row = await db.query_one("SELECT * FROM visits WHERE public_id = ?", [public_id])
    return dict(row) if row else None


def can_read(user: User | None, visit: dict[str, Any]) -> bool:
    if user is None:
        return False
    return (
        user.role == "admin"
        or (user.role == "patient" and user.id == visit["patient_id"])
        or (user.role == "doctor" and user.id == visit["doctor_id"])
    )


def editable(visit: dict[str, Any], now: float) -> bool:
    """Reports can be added or removed until the visit starts, while it is held or confirmed."""
    if visit["status"] not in EDITABLE_STATUSES or now >= visit["starts_at"]:
        return False
    return not (visit["status"] == "held" and visit["hold_expires"] and visit["hold_expires"] <= now)


def can_edit(user: User | None, visit: dict[str, Any], now: float) -> bool:
    return (
        user is not None
        and user.role == "patient"
        and user.id == visit["patient_id"]
        and editable(visit, now)
    )


def require_editable(user: User, visit: dict[str, Any], now: float) -> None:
    if not (user.role == "patient" and user.id == visit["patient_id"]):
        if can_read(user, visit):
            raise Forbidden(_("Only the patient can add or remove test reports."))
        raise NotFound(_("This visit does not exist."))
    if not editable(visit, now):
        raise Conflict(
            _("Reports can only be changed before the visit starts, while it is booked."),
            code="visit_locked",
        )


# -- reads ------------------------------------------------------------------------------------


async def list_for_visit(db: Database, visit_id: int) -> list[Report]:
    rows = await db.query(
        f"SELECT {REPORT_COLUMNS} FROM reports WHERE visit_id = ? ORDER BY created, id",  # noqa: S608
        [visit_id],
    )
    return [Report.from_row(r) for r in rows]


async def get_with_visit(db: Database, report_id: int) -> tuple[Report, dict[str, Any]] | None:
    row = await db.query_one(
        f"SELECT {REPORT_COLUMNS} FROM reports WHERE id = ?",  # noqa: S608
        [report_id],
    )
    if row is None:
        return None
    visit = await db.query_one("SELECT * FROM visits WHERE id = ?", [row["visit_id"]])
    if visit is None:
        return None
    return Report.from_row(row), dict(visit)


async def visit_usage(db: Database, visit_id: int) -> tuple[int, int]:
    row = await db.query_one(
        "SELECT count(*) AS n, coalesce(sum(size), 0) AS total FROM reports WHERE visit_id = ?", [visit_id]
    )
    return (row["n"], row["total"]) if row else (0, 0)


# -- writes -----------------------------------------------------------------------------------


async def add_report(
    db: Database,
    data_dir: Path,
    *,
    visit: dict[str, Any],
    user: User,
    source: uploads.ChunkSource,
    filename: str | None,
    max_bytes: int,
    visit_max_bytes: int,
    remote: str | None = None,
) -> Report:
    """Receive one file for ``visit`` from ``source``; nothing remains on disk if this raises."""
    count, used = await visit_usage(db, visit["id"])
    if count >= MAX_REPORTS_PER_VISIT:
        raise Conflict(
            _("A visit can have at most %(n)d reports. Remove one before adding another.")
            % {"n": MAX_REPORTS_PER_VISIT},
            code="too_many_reports",
        )
    too_large = _(
        "This file is larger than %(mb)s MB. Choose a smaller file or a lower-resolution photo."
    ) % {"mb": _mb(max_bytes)}
    over_budget = _(
        "The reports for this visit would exceed %(mb)s MB in total. "
        "Remove a report or upload a smaller file."
    ) % {"mb": _mb(visit_max_bytes)}
    received = await uploads.receive(
        source,
        data_dir,
        max_bytes=max_bytes,
        budget_bytes=max(0, visit_max_bytes - used),
        too_large=too_large,
        over_budget=over_budget,
    )
    # Parsing and re-encoding can take a moment: a thread, shielded so that a disconnect cannot
    # leave the thread running with nobody to clean up after it.
    stored: uploads.Stored | None = None
    write_task: asyncio.Future[int] | None = None
    store_task = asyncio.ensure_future(asyncio.to_thread(uploads.store_sync, received, data_dir))
    try:
        stored = await asyncio.shield(store_task)
        name = uploads.display_name_for(filename, stored.content_type)
        now = time.time()
        final = stored

        def write(d: sqlite_utils.Database) -> int:
            current = d.execute("SELECT * FROM visits WHERE id = ?", [visit["id"]]).fetchone()
            if current is None or not editable(dict(current), now):
                raise Conflict(
                    _("Reports can only be changed before the visit starts, while it is booked."),
                    code="visit_locked",
                )
            total = d.execute(
                "SELECT coalesce(sum(size), 0) FROM reports WHERE visit_id = ?", [visit["id"]]
            ).fetchone()[0]
            if total + final.size > visit_max_bytes:  # a concurrent upload took the room
                raise PayloadTooLarge(over_budget, code="visit_quota")
            cur = d.execute(
                "INSERT INTO reports (visit_id, owner_id, display_name, stored_name, content_type,"
                " size, sha256, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    visit["id"],
                    user.id,
                    name,
                    final.stored_name,
                    final.content_type,
                    final.size,
                    final.sha256,
                    now,
                ],
            )
            report_id = int(cur.lastrowid or 0)
            audit.record(
                d,
                "report.upload",
                "report",
                report_id,
                actor=user,
                remote=remote,
                subject_user_id=visit["patient_id"],
                detail={"visit": visit["public_id"], "size": final.size, "type": final.content_type},
                created=now,
            )
            return report_id

        write_task = asyncio.ensure_future(db.execute_write_fn(write))
        report_id = await asyncio.shield(write_task)
        return Report(
            report_id,
            visit["id"],
            user.id,
            name,
            stored.stored_name,
            stored.content_type,
            stored.size,
            stored.sha256,
            now,
        )
    except BaseException:
        if stored is None and not store_task.done():
            # Cancelled while the thread works: let it finish, then remove what it made.
            try:
                stored = await asyncio.shield(store_task)
            except BaseException:
                stored = None
        if write_task is not None and await _succeeded(write_task):
            raise  # the row was written: the file belongs to it now
        if stored is not None:
            uploads.remove_quietly(stored.path)
        raise


async def delete_report(
    db: Database, data_dir: Path, report: Report, visit: dict[str, Any], user: User, remote: str | None
) -> None:
    def write(d: sqlite_utils.Database) -> None:
        cur = d.execute("DELETE FROM reports WHERE id = ?", [report.id])
        if cur.rowcount != 1:
            raise NotFound(_("This report does not exist."))
        audit.record(
            d,
            "report.delete",
            "report",
            report.id,
            actor=user,
            remote=remote,
            subject_user_id=visit["patient_id"],
            detail={"visit": visit["public_id"], "sha256": report.sha256},
        )

    await db.execute_write_fn(write)
    # The row is gone first: a crash between the two leaves an orphan file, never a dangling row.
    await asyncio.to_thread(uploads.remove_quietly, uploads.stored_path(data_dir, report.stored_name))


async def record_view(
    db: Database, report: Report, visit: dict[str, Any], user: User, remote: str | None, download: bool
) -> None:
    created = time.time()  # when the report was viewed, not when the write queue got to it
    await db.execute_write_fn(
        lambda d: audit.record(
            d,
            "report.view",
            "report",
            report.id,
            actor=user,
            remote=remote,
            subject_user_id=visit["patient_id"],
            detail={"visit": visit["public_id"], "download": download},
            created=created,
        )
    )


async def _succeeded(task: asyncio.Future[Any]) -> bool:
    """Wait for work already handed to a thread; whether it completed without an error."""
    try:
        await asyncio.shield(task)
    except BaseException:
        return task.done() and not task.cancelled() and task.exception() is None
    return True


def _mb(n: int) -> str:
    value = n / MB
    if value >= 10:
        return f"{value:.0f}"
    return f"{value:.2f}".rstrip("0").rstrip(".")
