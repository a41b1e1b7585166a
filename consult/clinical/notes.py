"""Visit notes: one per visit, written by its doctor, saved as they type.

Saves carry the version the editor started from; a save based on an older version is refused
(409) instead of silently overwriting what another window wrote. ``text`` is the clinical note,
for doctors only; ``advice`` is what the doctor wants the patient to read on their visit page.
"""

from __future__ import annotations

import json
import time
import unicodedata
from dataclasses import asdict, dataclass
from typing import Any

import sqlite_utils

from consult.accounts.users import User
from consult.audit import chain as audit
from consult.core.db import Database
from consult.core.errors import BadRequest, Conflict, Forbidden, NotFound
from consult.core.i18n import _

MAX_TEXT = 20_000
MAX_ADVICE = 5_000
EDITABLE_STATUSES = ("confirmed", "completed", "no_show")
EARLIER_LIMIT = 20


@dataclass(frozen=True)
class Note:
    visit_id: int
    text: str
    advice: str
    version: int  # 0: nothing saved yet
    updated: float | None

    def public(self) -> dict[str, Any]:
        out = asdict(self)
        del out["visit_id"]
        return out


class StaleNote(Conflict):
    code = "stale_version"

    def __init__(self, current: Note) -> None:
        super().__init__(
            _("This note was changed in another window. Reload to see the latest text; yours is kept here.")
        )
        self.current = current


def require_author(user: User, visit: dict[str, Any]) -> None:
    if user.role == "doctor" and user.id == visit["doctor_id"]:
        return
    if user.role == "admin" or (user.role == "patient" and user.id == visit["patient_id"]):
        raise Forbidden(_("Only the visit's doctor can read or write its clinical notes."))
    raise NotFound(_("This visit does not exist."))


def _empty(visit_id: int) -> Note:
    return Note(visit_id, "", "", 0, None)


def _from_row(row: Any) -> Note:
    return Note(row["visit_id"], row["text"], row["advice"], row["version"], row["updated"])


def get_sync(db: sqlite_utils.Database, visit_id: int) -> Note:
    row = db.execute(
        "SELECT visit_id, text, advice, version, updated FROM visit_notes WHERE visit_id = ?", [visit_id]
    ).fetchone()
    return _from_row(row) if row else _empty(visit_id)


async def get(db: Database, visit_id: int) -> Note:
    return await db.execute_fn(lambda d: get_sync(d, visit_id))


async def advice_for_visit(db: Database, visit_id: int) -> str:
    row = await db.query_one("SELECT advice FROM visit_notes WHERE visit_id = ?", [visit_id])
    return row["advice"] if row else ""


def _clean(value: Any, limit: int, what: str) -> str:
    if not isinstance(value, str):
        raise BadRequest(_("The %(what)s must be text.") % {"what": what}, code="bad_note")
    value = unicodedata.normalize("NFC", value.replace("\r\n", "\n"))
    if len(value) > limit:
        raise BadRequest(
            _("The %(what)s is too long: at most %(max)d characters.") % {"what": what, "max": limit},
            code="note_too_long",
        )
    return value


def parse_update(body: Any) -> tuple[str, str | None, int]:
    if not isinstance(body, dict):
        raise BadRequest(_("Send the note as a JSON object."), code="bad_note")
    version = body.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise BadRequest(_("The note's version is missing. Reload the page."), code="bad_version")
    text = _clean(body.get("text", ""), MAX_TEXT, _("note"))
    advice = None if body.get("advice") is None else _clean(body["advice"], MAX_ADVICE, _("advice"))
    return text, advice, version


def save_sync(
    db: sqlite_utils.Database,
    *,
    visit_id: int,
    doctor: User,
    text: str,
    advice: str | None,
    version: int,
    remote: str | None = None,
) -> Note:
    visit = db.execute("SELECT doctor_id, patient_id, status FROM visits WHERE id = ?", [visit_id]).fetchone()
    if visit is None or visit["doctor_id"] != doctor.id:
        raise NotFound(_("This visit does not exist."))
    if visit["status"] not in EDITABLE_STATUSES:
        raise Conflict(
            _("Notes can only be written for a confirmed or completed visit."), code="visit_not_open"
        )
    current = get_sync(db, visit_id)
    if version != current.version:
        raise StaleNote(current)
    if advice is None:
        advice = current.advice
    if text == current.text and advice == current.advice and current.version:
        return current  # nothing changed: no new version, no audit noise
    now = time.time()
    new_version = current.version + 1
    db.execute(
        "INSERT INTO visit_notes (visit_id, doctor_id, text, advice, version, created, updated)"
        " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(visit_id) DO UPDATE SET"
        " text = excluded.text, advice = excluded.advice, version = excluded.version,"
        " updated = excluded.updated",
        [visit_id, doctor.id, text, advice, new_version, now, now],
    )
    audit.record(
        db,
        "note.update",
        "visit",
        visit_id,
        actor=doctor,
        remote=remote,
        subject_user_id=visit["patient_id"],
        # Lengths only: the audit trail must not become a second copy of clinical text.
        detail={"version": new_version, "chars": len(text), "advice_chars": len(advice)},
        created=now,
    )
    return Note(visit_id, text, advice, new_version, now)


async def save(
    db: Database,
    *,
    visit: dict[str, Any],
    doctor: User,
    body: Any,
    remote: str | None = None,
) -> Note:
    require_author(doctor, visit)
    text, advice, version = parse_update(body)
    return await db.execute_write_fn(
        lambda d: save_sync(
            d, visit_id=visit["id"], doctor=doctor, text=text, advice=advice, version=version, remote=remote
        )
    )


async def earlier_for_patient(db: Database, visit: dict[str, Any]) -> list[dict[str, Any]]:
    """The patient's earlier visits with their notes and prescriptions, newest first."""

    def read(d: sqlite_utils.Database) -> list[dict[str, Any]]:
        rows = d.execute(
            "SELECT v.id, v.public_id, v.starts_at, v.status, u.display_name AS doctor_name,"
            " n.text, n.advice, n.updated"
            " FROM visits v JOIN users u ON u.id = v.doctor_id"
            " LEFT JOIN visit_notes n ON n.visit_id = v.id"
            " WHERE v.patient_id = ? AND v.id != ? AND v.starts_at < ?"
            " AND v.status IN ('confirmed', 'completed', 'no_show')"
            " ORDER BY v.starts_at DESC LIMIT ?",
            [visit["patient_id"], visit["id"], visit["starts_at"], EARLIER_LIMIT],
        ).fetchall()
        out = []
        for r in rows:
            rx = d.execute(
                # What the patient was given: not one a pharmacist returned or has yet to approve.
                "SELECT number, document FROM prescriptions WHERE visit_id = ? AND status = 'issued'"
                " ORDER BY id",
                [r["id"]],
            ).fetchall()
            out.append(
                {
                    "public_id": r["public_id"],
                    "starts_at": r["starts_at"],
                    "status": r["status"],
                    "doctor_name": r["doctor_name"],
                    "text": r["text"] or "",
                    "advice": r["advice"] or "",
                    "updated": r["updated"],
                    "prescriptions": [
                        {"number": p["number"], "items": json.loads(p["document"]).get("items", [])}
                        for p in rx
                    ],
                }
            )
        return out

    return await db.execute_fn(read)


async def record_read(
    db: Database, visit: dict[str, Any], user: User, remote: str | None, earlier: int
) -> None:
    await db.execute_write_fn(
        lambda d: audit.record(
            d,
            "note.view",
            "visit",
            visit["id"],
            actor=user,
            remote=remote,
            subject_user_id=visit["patient_id"],
            detail={"earlier_visits": earlier},
        )
    )
