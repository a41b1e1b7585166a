"""What the admin pages read and change about accounts: staff lists, counts, activation."""

from __future__ import annotations

import sqlite3
from typing import Any

import sqlite_utils

from consult.audit import chain as audit
from consult.core.errors import NotFound
from consult.core.i18n import _


def count_by_role(db: sqlite_utils.Database) -> dict[str, int]:
    return {r["role"]: r["n"] for r in db.execute("SELECT role, count(*) AS n FROM users GROUP BY role")}


def list_staff(db: sqlite_utils.Database) -> list[sqlite3.Row]:
    return db.execute(
        "SELECT id, role, username, phone, display_name, active, created FROM users"
        " WHERE role IN ('doctor', 'admin', 'pharmacist') ORDER BY role, display_name"
    ).fetchall()


def get_account(db: sqlite_utils.Database, user_id: int) -> sqlite3.Row | None:
    return db.execute("SELECT id, role, display_name FROM users WHERE id = ?", [user_id]).fetchone()


def set_active_sync(
    db: sqlite_utils.Database, user_id: int, active: bool, *, actor: Any, remote: str | None
) -> None:
    """Activate or deactivate an account; deactivating also ends its sessions. Audited."""
    value = 1 if active else 0
    cur = db.execute("UPDATE users SET active = ? WHERE id = ?", [value, user_id])
    if cur.rowcount == 0:
        raise NotFound(_("No such account."))
    if not value:
        db.execute("DELETE FROM sessions WHERE user_id = ?", [user_id])
    audit.record(
        db,
        "account.activate" if value else "account.deactivate",
        "user",
        user_id,
        actor=actor,
        remote=remote,
        subject_user_id=user_id,
    )
