"""`consult migrate-to-postgres`: copy a SQLite deployment's database into PostgreSQL.

The SQLite file is first brought to the newest schema (what `consult init` does), the PostgreSQL
database is given the same schema, and every table is copied in one PostgreSQL transaction, in an
order that satisfies the foreign keys, with ``COPY``. Afterwards each table's row count is
compared, identities continue after the highest copied id, and the audit trail's hash chain is
verified on PostgreSQL: a copy that does not match is rolled back and nothing is left half-done.
The target must be empty (no accounts): a copy never merges two hospitals' data.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from consult.audit import chain as audit
from consult.core import pg
from consult.core.migrations import migrate


class CopyError(Exception):
    """The copy cannot be made or did not match; nothing was written to PostgreSQL."""


@dataclass
class CopyReport:
    tables: dict[str, int] = field(default_factory=dict)
    audit: str = ""


def _columns(conn: sqlite3.Connection, table: str) -> list[str]:
    return [r[1] for r in conn.execute(f'PRAGMA table_info("{table}")')]


def copy_sqlite_to_postgres(
    sqlite_path: Path, url: str, *, progress: Callable[[str, int], None] | None = None
) -> CopyReport:
    if not sqlite_path.exists():
        raise CopyError(f"no SQLite database at {sqlite_path}")
    migrate(sqlite_path)
    target = pg.PgDatabase(url)
    try:
        migrate(target)
    finally:
        target.close()

    source = sqlite3.connect(f"file:{sqlite_path}?mode=ro", uri=True)
    conn = pg.connect(url)
    try:
        # SQLite's own indexes that live in tables (the FTS5 search index of migration
        # 0021_user_search, its shadow tables) are not data: PostgreSQL has its own indexes.
        plain = {r[1] for r in source.execute("PRAGMA main.table_list") if r[2] == "table"}
        tables = [t for t in pg.table_order(source) if t != "_migrations" and t in plain]
        handle = pg.Handle(conn, writing=True)
        report = CopyReport()
        conn.execute("BEGIN")
        try:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", [pg.WRITE_LOCK_KEY])
            if conn.execute("SELECT count(*) FROM users").fetchone()[0]:
                raise CopyError("the PostgreSQL database has accounts already: copy only into an empty one")
            for table in tables:
                columns = _columns(source, table)
                names = ", ".join(f'"{c}"' for c in columns)
                rows = 0
                with conn.cursor().copy(f'COPY "{table}" ({names}) FROM STDIN') as copy:
                    for row in source.execute(f'SELECT {names} FROM "{table}"'):  # noqa: S608
                        copy.write_row(row)
                        rows += 1
                copied = conn.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0]  # noqa: S608
                if copied != rows:
                    raise CopyError(f"{table}: {rows} rows read, {copied} in PostgreSQL")
                report.tables[table] = rows
                if progress:
                    progress(table, rows)
            pg.reset_identities(handle)
            ok, message = audit.verify(handle)
            if not ok:
                raise CopyError(f"the audit trail does not verify after the copy: {message}")
            report.audit = message
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return report
    finally:
        source.close()
        conn.close()
