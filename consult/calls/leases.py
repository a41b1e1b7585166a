"""Which node runs a visit's room: a lease in the shared database.

HAProxy sends both participants of a visit to one node (it hashes the room's path); the lease
makes that a fact the nodes agree on. A node admitting someone to a room first claims the room
(``rooms.node``, ``rooms.lease_until``); while it holds rooms it renews their leases every
`RENEW_S`; a node that stops gracefully gives its leases up at once. When a node dies its
leases lapse within `LEASE_S`, and the node that HAProxy now sends the reconnecting pages to
claims the room and restores it from the same row (its clock, ``started_at``): the visit goes on.

A node never takes a room whose lease another node holds and renews: it waits (at most a lease's
length) for the lease to lapse, then refuses. The room sweeper leaves rooms with a live lease to
their node, whatever its clock says: that node's own timer ends them.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Iterable

import sqlite_utils

LEASE_S = 3.0
RENEW_S = 1.0


def new_node_id() -> str:
    """This process's name in the leases: host, pid and a random part (pids repeat)."""
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{secrets.token_hex(3)}"


def claim_sync(
    db: sqlite_utils.Database, visit_id: int, node: str, now: float, lease_s: float = LEASE_S
) -> str:
    """Claim the room for `node` unless another node's lease is live; returns the holder."""
    row = db.execute(
        "INSERT INTO rooms (visit_id, node, lease_until, updated) VALUES (?, ?, ?, ?)"
        " ON CONFLICT(visit_id) DO UPDATE SET node = excluded.node, lease_until = excluded.lease_until,"
        " updated = excluded.updated"
        " WHERE rooms.node IS NULL OR rooms.node = excluded.node OR rooms.lease_until IS NULL"
        " OR rooms.lease_until <= ? RETURNING node",
        [visit_id, node, now + lease_s, now, now],
    ).fetchone()
    if row is not None:
        return row[0]
    holder = db.execute("SELECT node FROM rooms WHERE visit_id = ?", [visit_id]).fetchone()
    return holder[0] if holder is not None and holder[0] else node


def renew_sync(db: sqlite_utils.Database, node: str, visit_ids: Iterable[int], until: float) -> int:
    """Extend `node`'s leases of these rooms (those still open); how many."""
    ids = sorted(set(visit_ids))
    renewed = 0
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        marks = ", ".join("?" * len(chunk))
        cur = db.execute(
            f"UPDATE rooms SET lease_until = ? WHERE node = ? AND ended_at IS NULL AND visit_id IN ({marks})",  # noqa: S608
            [until, node, *chunk],
        )
        renewed += max(cur.rowcount, 0)
    return renewed


def release_sync(db: sqlite_utils.Database, node: str) -> int:
    """Give up every lease `node` holds (a graceful stop): another node may take them at once."""
    cur = db.execute("UPDATE rooms SET lease_until = NULL WHERE node = ? AND lease_until IS NOT NULL", [node])
    return max(cur.rowcount, 0)
