"""Which visit recording a user may play: only the visit's doctor and admins."""

from __future__ import annotations

from typing import Any

import sqlite_utils


def playable_sync(db: sqlite_utils.Database, recording_id: int, user: Any) -> dict[str, Any] | None:
    """The recording's row (with its visit's doctor and patient) when ``user`` may play it.

    Everyone else (the patient included) gets None: not even whether it exists.
    """
    row = db.execute(
        "SELECT r.id, r.visit_id, r.role, r.path, r.size, v.doctor_id, v.patient_id"
        " FROM recordings r JOIN visits v ON v.id = r.visit_id WHERE r.id = ?",
        [recording_id],
    ).fetchone()
    if row is None or not (user.role == "admin" or (user.role == "doctor" and row["doctor_id"] == user.id)):
        return None
    return dict(row)
