"""The test's database, whichever engine it runs on: open it, write to it, read from it.

A target is the test's ``Settings`` (SQLite file in ``data_dir``, or ``database_url`` when the
suite runs on PostgreSQL), anything with ``settings``, a running `ConsultServer` (its data dir,
or the ``CONSULT_DATABASE_URL`` the harness gave it), or the path of a SQLite file.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from consult.core.db import Database
from consult.core.engine import database_path, open_database
from consult.core.pg import PgDatabase

T = TypeVar("T")


def database_of(target: Any) -> Database:
    if isinstance(target, str | Path):
        # Never an empty file made by opening a missing one: a test on PostgreSQL that passed a
        # data dir's consult.db would then read "no such table" from a database nobody uses.
        if not Path(target).is_file():
            raise FileNotFoundError(f"no SQLite database at {target}: pass the server or the settings")
        return Database(Path(target))
    if callable(getattr(target, "env", None)) and hasattr(target, "data_dir"):  # a ConsultServer
        url = target.env().get("CONSULT_DATABASE_URL", "")
        return PgDatabase(url) if url else Database(database_path(target))
    settings = getattr(target, "settings", target)
    return open_database(settings)


def write(target: Any, fn: Callable[[Any], T]) -> T:
    """``fn(handle)`` in one write transaction, committed when it returns."""
    db = database_of(target)
    try:
        return db.write_sync(fn)
    finally:
        db.close()


def read(target: Any, fn: Callable[[Any], T]) -> T:
    db = database_of(target)
    try:
        return db.read_sync(fn)
    finally:
        db.close()


def rows(target: Any, sql: str, params: Any = ()) -> list[dict[str, Any]]:
    """The rows of one query, as dicts."""
    return read(target, lambda d: [dict(r) for r in d.execute(sql, list(params)).fetchall()])


def insert(handle: Any, sql: str, params: Any = ()) -> int:
    """Run an ``INSERT`` and return the new row's id (``RETURNING id``: both engines have it)."""
    return handle.execute(f"{sql} RETURNING id", params).fetchone()[0]
