"""What the doctor's consult room shows besides the call: the patient's earlier visits."""

from __future__ import annotations

import logging
from typing import Any

import sqlite_utils

from consult.clinical import notes
from consult.core.db import Database, DatabaseError

log = logging.getLogger(__name__)


def earlier_visits_alone_sync(db: sqlite_utils.Database, visit: dict[str, Any]) -> list[dict[str, Any]]:
    """The patient's earlier visits without notes or prescriptions, newest first."""
    rows = db.execute(
        "SELECT v.public_id, v.starts_at, v.status, u.display_name AS doctor_name"
        " FROM visits v JOIN users u ON u.id = v.doctor_id"
        " WHERE v.patient_id = ? AND v.id != ? AND v.starts_at < ?"
        " AND v.status IN ('confirmed', 'completed', 'no_show') ORDER BY v.starts_at DESC LIMIT 20",
        [visit["patient_id"], visit["id"], visit["starts_at"]],
    ).fetchall()
    return [{**dict(r), "text": "", "advice": "", "prescriptions": []} for r in rows]


async def earlier_visits(db: Database, visit: dict[str, Any]) -> list[dict[str, Any]]:
    """The patient's earlier visits, with notes and prescriptions where those exist."""
    try:
        return await notes.earlier_for_patient(db, visit)
    except (AttributeError, DatabaseError):
        log.debug("visit notes unavailable; listing earlier visits alone", exc_info=True)
    return await db.execute_fn(lambda d: earlier_visits_alone_sync(d, visit))
