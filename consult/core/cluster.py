"""Which secrets the cluster's nodes share, recorded in the database they share.

Each node computes a fingerprint of its secrets (`consult/ops/secrets_bundle.py`: a hash of
their hash, never a secret itself). The first node to start records it in `instance_marks`
as ``secrets:<fingerprint>``; every node checks its own against it at every start, so a node
that generated its own secrets instead of importing the cluster's (`consult secrets import`)
refuses to start instead of minting call links, sessions and prescriptions nobody else can
check. Two nodes starting for the very first time at the same moment may both write a mark:
the oldest (then the smallest) is the cluster's, on every node alike, and the other node
refuses to start.
"""

from __future__ import annotations

import time

import sqlite_utils

PREFIX = "secrets:"


def recorded_fingerprint_sync(db: sqlite_utils.Database) -> str | None:
    """The cluster's fingerprint, or None before any node recorded one."""
    row = db.execute(
        "SELECT name FROM instance_marks WHERE name LIKE ? ORDER BY created, name LIMIT 1", [PREFIX + "%"]
    ).fetchone()
    return row[0][len(PREFIX) :] if row else None


def record_fingerprint_sync(db: sqlite_utils.Database, fingerprint: str) -> str:
    """Record `fingerprint` unless one is recorded already; return the cluster's fingerprint."""
    db.execute(
        "INSERT INTO instance_marks (name, created) SELECT ?, ? "
        "WHERE NOT EXISTS (SELECT 1 FROM instance_marks WHERE name LIKE ?)",
        [PREFIX + fingerprint, time.time(), PREFIX + "%"],
    )
    recorded = recorded_fingerprint_sync(db)
    assert recorded is not None
    return recorded


def replace_fingerprint_sync(db: sqlite_utils.Database, fingerprint: str) -> None:
    """Make `fingerprint` the cluster's (after the secrets were changed on purpose, on every node)."""
    db.execute("DELETE FROM instance_marks WHERE name LIKE ?", [PREFIX + "%"])
    db.execute(
        "INSERT INTO instance_marks (name, created) VALUES (?, ?)", [PREFIX + fingerprint, time.time()]
    )
