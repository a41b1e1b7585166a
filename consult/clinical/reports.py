"""Test reports attached to a visit: who may add, read and remove them, and the rows themselves.

Files are handled by ``consult.uploads``; this module decides access and keeps the database and
the disk in step (a row never exists without its file, and a refused upload leaves neither).
What a crash leaves between the two steps is converged by the ``files_ctx`` job.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlite_utils
from aiohttp import web

from consult.accounts.users import User
from consult.audit import chain as audit
from consult.clinical import pages, uploads
from consult.core import keys, metrics
from consult.core.db import Database
from consult.core.errors import Conflict, Forbidden, NotFound, PayloadTooLarge
from consult.core.i18n import _

log = logging.getLogger(__name__)

EDITABLE_STATUSES = ("held", "confirmed")
MAX_REPORTS_PER_VISIT = 30
MB = 1024 * 1024
# Files not written to for this long and held by no request are garbage (temp files) or
# orphans (stored files without a row). Also covers a request of another process.
FILES_GRACE_S = 120.0

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


# The visits listed as "earlier" in a consult room's sidebar (consult.calls.sidebar), and the
# visits whose doctor that makes a treating doctor.
EARLIER_STATUSES = ("confirmed", "completed", "no_show")


async def may_read(db: Database, user: User | None, visit: dict[str, Any]) -> bool:
    """``can_read``, and a doctor treating the patient in a later visit: the consult room shows
    that doctor the patient's earlier visits (notes, prescriptions), and their reports with them."""
    if can_read(user, visit):
        return True
    if user is None or user.role != "doctor" or visit["status"] not in EARLIER_STATUSES:
        return False
    row = await db.query_one(
        "SELECT 1 FROM visits WHERE doctor_id = ? AND patient_id = ? AND id != ? AND starts_at > ?"
        " AND status IN ('confirmed', 'completed') LIMIT 1",
        [user.id, visit["patient_id"], visit["id"], visit["starts_at"]],
    )
    return row is not None


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
    in_flight: uploads.InFlight | None = None,
) -> Report:
    """Receive one file for ``visit`` from ``source``; nothing remains on disk if this raises.

    While it runs, its temp files' token and its stored name are held in ``in_flight``, so the
    sweep never takes a file of a live upload."""
    token, stored_name = uploads.new_token(), uploads.new_stored_name()
    with (uploads.InFlight() if in_flight is None else in_flight).hold(token, stored_name):
        return await _add_report(
            db,
            data_dir,
            visit=visit,
            user=user,
            source=source,
            filename=filename,
            max_bytes=max_bytes,
            visit_max_bytes=visit_max_bytes,
            remote=remote,
            token=token,
            stored_name=stored_name,
        )


async def _add_report(
    db: Database,
    data_dir: Path,
    *,
    visit: dict[str, Any],
    user: User,
    source: uploads.ChunkSource,
    filename: str | None,
    max_bytes: int,
    visit_max_bytes: int,
    remote: str | None,
    token: str,
    stored_name: str,
) -> Report:
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
        token=token,
    )
    # Parsing and re-encoding can take a moment: a thread, shielded so that a disconnect cannot
    # leave the thread running with nobody to clean up after it.
    stored: uploads.Stored | None = None
    write_task: asyncio.Future[int] | None = None
    store_task = asyncio.ensure_future(asyncio.to_thread(uploads.store_sync, received, data_dir, stored_name))
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
                " size, sha256, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
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
            report_id = int(cur.fetchone()[0])
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
    db: Database,
    data_dir: Path,
    report: Report,
    visit: dict[str, Any],
    user: User,
    remote: str | None,
    in_flight: uploads.InFlight | None = None,
) -> None:
    # Held while the row is gone and the file not yet: not an orphan for the sweep.
    with (uploads.InFlight() if in_flight is None else in_flight).hold(report.stored_name):
        await _delete_report(db, data_dir, report, visit, user, remote)


async def _delete_report(
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
    await asyncio.to_thread(pages.remove_cached, data_dir, report.stored_name)


async def record_view(
    db: Database,
    report: Report,
    visit: dict[str, Any],
    user: User,
    remote: str | None,
    download: bool,
    page: int | None = None,
    thumbnail: bool = False,
) -> None:
    """One audit entry per reading: the file, one rendered page of a PDF (``page``), or the
    viewer's small picture of it (``thumbnail``)."""
    detail: dict[str, Any] = {"visit": visit["public_id"], "download": download}
    if page is not None:
        detail["page"] = page
    if thumbnail:
        detail["thumbnail"] = True
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
            detail=detail,
            created=created,
        )
    )


# -- files and rows converge -----------------------------------------------------------------


@dataclass
class Convergence:
    """What one sweep found and did."""

    temp_removed: int = 0
    quarantined: list[str] = field(default_factory=list)  # stored names moved to quarantine
    missing: list[tuple[int, str]] = field(default_factory=list)  # (report id, stored name)
    cache_removed: int = 0  # rendered pages of reports that are gone


async def converge_files(
    db: Database,
    data_dir: Path,
    in_flight: uploads.InFlight,
    *,
    grace_s: float = FILES_GRACE_S,
    now: float | None = None,
) -> Convergence:
    """Bring the uploads directory back in step with the ``reports`` rows after crashes.

    Temp files no upload holds are removed; a stored file without a row (the server died between
    storing the file and writing its row, or between deleting a row and its file) is moved to
    ``<data_dir>/quarantine/uploads/``, never deleted; rows whose file is missing are returned.
    Files are listed before rows are read, and a request's files are skipped while it holds
    them, so a live upload or deletion is never mistaken for an orphan.
    """
    now = time.time() if now is None else now
    result = Convergence()
    result.temp_removed = await asyncio.to_thread(uploads.sweep_tmp, data_dir, grace_s, in_flight)
    on_disk = await asyncio.to_thread(uploads.stored_files, data_dir)
    rows = await db.execute_fn(
        lambda d: {r[0]: r[1] for r in d.execute("SELECT stored_name, id FROM reports").fetchall()}
    )
    orphans = [name for name, mtime in sorted(on_disk.items()) if name not in rows and mtime < now - grace_s]
    for name in orphans:
        if name in in_flight:
            continue
        try:
            moved = await asyncio.to_thread(uploads.quarantine, data_dir, name)
        except OSError as exc:
            log.error("report file %s has no row and could not be quarantined: %s", name, exc)
            continue
        if moved is not None:
            result.quarantined.append(name)
            log.warning("report file %s has no row: moved to %s", name, moved)
    result.cache_removed = await asyncio.to_thread(pages.sweep_cache, data_dir, set(rows), now - grace_s)
    unseen = [(rid, name) for name, rid in rows.items() if name not in on_disk]
    if unseen:  # stored after the listing, or really missing: look again
        exists = await asyncio.to_thread(
            lambda: {name: uploads.stored_path(data_dir, name).is_file() for _rid, name in unseen}
        )
        result.missing = sorted((rid, name) for rid, name in unseen if not exists[name])
    return result


async def files_ctx(app: web.Application) -> AsyncIterator[None]:
    """``cleanup_ctx``: converge upload files and report rows at start-up, then every
    ``files_sweep_interval_seconds`` (0: at start-up only). Each orphan quarantined is logged
    and counted (``consult_report_files_quarantined_total``); each row without its file is
    logged once per process and shown by the ``consult_report_files_missing`` gauge."""
    settings = app[keys.SETTINGS]
    db, data_dir, in_flight = app[keys.DB], settings.files_dir, app[uploads.IN_FLIGHT]
    interval = settings.files_sweep_interval_seconds
    missing: dict[int, str] = {}
    if metrics.METRICS in app:
        metrics.provide(app, "report_files_missing", lambda: len(missing))

    async def sweep_once() -> None:
        result = await converge_files(db, data_dir, in_flight)
        if result.temp_removed:
            log.warning("removed %d abandoned upload temp files", result.temp_removed)
        if result.quarantined:
            metrics.count(app, "report_files_quarantined", len(result.quarantined))
        for rid, name in result.missing:
            if rid not in missing:
                log.error("report %d: its file %s is missing", rid, name)
        missing.clear()
        missing.update(result.missing)

    async def loop() -> None:
        while True:
            try:
                await sweep_once()
            except Exception:
                log.exception("upload files sweep failed")
            if interval <= 0:
                return
            await asyncio.sleep(interval)

    task = asyncio.get_running_loop().create_task(loop())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


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


def mark_looked_sync(db: sqlite_utils.Database, visit_id: int, doctor_id: int, now: float) -> None:
    """The visit's doctor has its reports in front of them (visit page, consult room): the clinic
    board counts only reports uploaded after this as new. Writer thread."""
    db.execute(
        "INSERT INTO report_looks (visit_id, doctor_id, looked_at) VALUES (?, ?, ?)"
        " ON CONFLICT(visit_id) DO UPDATE SET doctor_id = excluded.doctor_id,"
        " looked_at = max(report_looks.looked_at, excluded.looked_at)",
        [visit_id, doctor_id, now],
    )
