"""Demo or production: which one a data directory is, recorded durably in its database.

`consult demo` marks the database in the same write that seeds the demo accounts; `consult
serve` reads the mark to choose the mode (or is told `--demo`). Production is what is left when
neither says demo, so a forgotten step can only make a server stricter, never laxer.
"""

from __future__ import annotations

import time

import sqlite_utils

DEMO = "demo"


def mark_demo_sync(db: sqlite_utils.Database) -> bool:
    """Record that this database holds demo data; True if it was not recorded before."""
    cur = db.execute(
        "INSERT INTO instance_marks (name, created) VALUES (?, ?) ON CONFLICT DO NOTHING", [DEMO, time.time()]
    )
    return cur.rowcount > 0


def is_demo_sync(db: sqlite_utils.Database) -> bool:
    return db.execute("SELECT 1 FROM instance_marks WHERE name = ?", [DEMO]).fetchone() is not None
