"""Append-only, hash-chained audit trail of who read or changed patient data.

Each row carries the hash of the previous row, so editing or deleting a row directly in SQLite
breaks the chain at that row (``consult audit verify``). Entries are written inside the same
write transaction as the change they describe, or on their own for reads.

`append` is the only writer of ``audit_log``. On PostgreSQL writes from several nodes run side by
side when they skip the cluster's write lock (holds), so before reading the last row it takes the
audit chain's own keyed lock (``core.db.lock_keys(db, ("audit", 0))``, the last lock of any
transaction, held until it commits): the next append, on any node, reads this row as the last one
and the chain stays one line. On SQLite (one writer) the lock is nothing.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

import sqlite_utils

from consult.core.db import lock_keys
from consult.core.i18n import _, ngettext

GENESIS = "0" * 64


@dataclass(frozen=True)
class AuditEntry:
    action: str
    object_type: str
    object_id: str | None = None
    actor_id: int | None = None
    actor_role: str | None = None
    remote: str | None = None
    subject_user_id: int | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    created: float = field(default_factory=time.time)


def _row_hash(prev: str, row: dict[str, Any]) -> str:
    payload = json.dumps(
        [
            prev,
            row["id"],
            round(row["created"], 6),
            row["actor_id"],
            row["actor_role"],
            row["remote"],
            row["action"],
            row["object_type"],
            row["object_id"],
            row["subject_user_id"],
            row["detail"],
        ],
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def append(db: sqlite_utils.Database, entry: AuditEntry) -> int:
    """Append inside the caller's write transaction (the writer thread), under the audit lock."""
    lock_keys(db, ("audit", 0))  # before reading the last row: no other append between read and insert
    last = db.execute("SELECT id, hash FROM audit_log ORDER BY id DESC LIMIT 1").fetchone()
    prev = last[1] if last else GENESIS
    row = {
        "id": (last[0] + 1) if last else 1,
        "created": round(entry.created, 6),
        "actor_id": entry.actor_id,
        "actor_role": entry.actor_role,
        "remote": entry.remote,
        "action": entry.action,
        "object_type": entry.object_type,
        "object_id": None if entry.object_id is None else str(entry.object_id),
        "subject_user_id": entry.subject_user_id,
        "detail": json.dumps(entry.detail, sort_keys=True, ensure_ascii=False),
    }
    row["prev_hash"] = prev
    row["hash"] = _row_hash(prev, row)
    db.execute(
        "INSERT INTO audit_log (id, created, actor_id, actor_role, remote, action, object_type,"
        " object_id, subject_user_id, detail, prev_hash, hash) VALUES"
        " (:id, :created, :actor_id, :actor_role, :remote, :action, :object_type, :object_id,"
        " :subject_user_id, :detail, :prev_hash, :hash)",
        row,
    )
    return row["id"]


def record(
    db: sqlite_utils.Database,
    action: str,
    object_type: str,
    object_id: str | int | None = None,
    *,
    actor: Any = None,
    role: str | None = None,
    subject_user_id: int | None = None,
    remote: str | None = None,
    detail: dict[str, Any] | None = None,
    created: float | None = None,
) -> int:
    """The one way to write an audit entry, inside the caller's write transaction.

    ``actor`` is whoever acted (anything with ``id`` and ``role``, e.g. a signed-in ``User``), or
    None for the system itself; ``role`` overrides the actor's role (``"cli"``, a call seat).
    """
    return append(
        db,
        AuditEntry(
            action=action,
            object_type=object_type,
            object_id=None if object_id is None else str(object_id),
            actor_id=getattr(actor, "id", None),
            actor_role=role or getattr(actor, "role", None) or "system",
            remote=remote,
            subject_user_id=subject_user_id,
            detail=detail or {},
            created=time.time() if created is None else created,
        ),
    )


def verify(db: sqlite_utils.Database) -> tuple[bool, str]:
    """Walk the chain; return (ok, message naming the first bad row)."""
    prev = GENESIS
    expected_id = 1
    count = 0
    for r in db.execute(
        "SELECT id, created, actor_id, actor_role, remote, action, object_type, object_id,"
        " subject_user_id, detail, prev_hash, hash FROM audit_log ORDER BY id"
    ):
        row = dict(
            zip(
                [
                    "id",
                    "created",
                    "actor_id",
                    "actor_role",
                    "remote",
                    "action",
                    "object_type",
                    "object_id",
                    "subject_user_id",
                    "detail",
                    "prev_hash",
                    "hash",
                ],
                r,
                strict=True,
            )
        )
        if row["id"] != expected_id:
            return False, _("row %(n)d is missing (next row is %(next)d)") % {
                "n": expected_id,
                "next": row["id"],
            }
        if row["prev_hash"] != prev:
            return False, _("row %(n)d does not follow row %(prev)d (chain broken)") % {
                "n": row["id"],
                "prev": row["id"] - 1,
            }
        if _row_hash(prev, row) != row["hash"]:
            return False, _("row %(n)d was altered (hash mismatch)") % {"n": row["id"]}
        prev = row["hash"]
        expected_id += 1
        count += 1
    intact = ngettext("%(num)d entry, chain intact", "%(num)d entries, chain intact", count)
    return True, intact % {"num": count}
