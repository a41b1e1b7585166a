"""`PgDatabase` has no SQLite file: it passed ``Path("postgresql")`` to `Database` once, and any
SQLite connection the base class opened from it made an empty database named ``postgresql`` in
the process's working directory. Its path is None now, and the SQLite connections refuse it."""

from __future__ import annotations

from pathlib import Path

import pytest

from consult.core.db import Database
from consult.core.pg import PgDatabase


async def test_a_postgresql_database_never_makes_a_sqlite_file(
    postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    db = PgDatabase(postgres_url)
    try:
        assert db.path is None
        assert db.write_sync(lambda d: d.execute("SELECT 1 + ?", [1]).fetchone()[0]) == 2
        assert db.read_sync(lambda d: d.execute("SELECT 2 + ?", [1]).fetchone()[0]) == 3
        assert (await db.query_one("SELECT 3 + ?", [1]))[0] == 4
        assert await db.execute_write_fn(lambda d: d.execute("SELECT 4 + ?", [1]).fetchone()[0]) == 5
        # The SQLite half of the class refuses, rather than create a file somewhere.
        for connect in (Database._connect_reader, Database._connect_writer):
            with pytest.raises(RuntimeError, match="no SQLite file"):
                connect(db)
    finally:
        db.close()
    assert not any(tmp_path.iterdir())  # noqa: ASYNC240 (a directory listing, once)
