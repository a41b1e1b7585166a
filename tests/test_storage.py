from __future__ import annotations

import asyncio
import sqlite3
import threading

import pytest

from consult.audit import chain as audit
from consult.core.db import Database
from consult.core.migrations import MIGRATIONS, applied, migrate


def test_migrate_fresh_then_again(tmp_path):
    path = tmp_path / "c.db"
    names = migrate(path)
    assert names == [n for n, _ in MIGRATIONS]
    assert migrate(path) == []
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_migration_on_an_existing_database_keeps_its_rows(tmp_path):
    path = tmp_path / "c.db"
    first = MIGRATIONS[0]
    db = Database(path)

    def only_first(d):
        first[1](d)
        d.execute("CREATE TABLE _migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
        d.execute("INSERT INTO _migrations VALUES (?, 0)", [first[0]])
        d.execute(
            "INSERT INTO users (role, username, display_name, password_hash, created, password_changed)"
            " VALUES ('admin', 'old', 'Old Admin', 'x', 0, 0)"
        )

    db.write_sync(only_first)
    later = migrate(path)
    assert later == [n for n, _ in MIGRATIONS[1:]]
    assert db.read_sync(lambda d: d.execute("SELECT username FROM users").fetchone()[0]) == "old"
    assert db.read_sync(applied) == [n for n, _ in MIGRATIONS]


def test_failed_migration_leaves_database_unchanged(tmp_path, monkeypatch):
    path = tmp_path / "c.db"
    migrate(path)

    def broken(d):
        d.execute("CREATE TABLE half_done (x)")
        raise RuntimeError("boom")

    monkeypatch.setattr("consult.core.migrations.MIGRATIONS", [*MIGRATIONS, ("9999_broken", broken)])
    with pytest.raises(RuntimeError):
        migrate(path)
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'half_done'").fetchone()[0] == 0
    assert "9999_broken" not in [r[0] for r in conn.execute("SELECT name FROM _migrations")]


async def test_writes_are_serialised_on_one_thread_and_errors_travel_back(database: Database):
    threads: set[str] = set()

    def write(d, i):
        threads.add(threading.current_thread().name)
        d.execute(
            "INSERT INTO outbox (channel, recipient, subject, body, created) VALUES ('sms', ?, '', '', 0)",
            [str(i)],
        )

    await asyncio.gather(*(database.execute_write_fn(lambda d, i=i: write(d, i)) for i in range(100)))
    assert threads == {"db-writer"}
    rows = await database.query("SELECT count(*) AS n FROM outbox")
    assert rows[0]["n"] == 100

    def fails(d):
        d.execute(
            "INSERT INTO outbox (channel, recipient, subject, body, created) VALUES ('sms', 'x', '', '', 0)"
        )
        raise ValueError("nope")

    with pytest.raises(ValueError, match="nope"):
        await database.execute_write_fn(fails)
    # The failed write was rolled back as a whole.
    assert (await database.query_one("SELECT count(*) AS n FROM outbox"))["n"] == 100


async def test_reads_run_off_the_event_loop(database: Database):
    name = await database.execute_fn(lambda d: threading.current_thread().name)
    assert name.startswith("db-read")


def test_audit_chain_detects_edits_and_deletions(database: Database):
    for i in range(5):
        database.write_sync(
            lambda d, i=i: audit.append(
                d,
                audit.AuditEntry(
                    action="report.view",
                    object_type="report",
                    object_id=str(i),
                    actor_id=1,
                    actor_role="doctor",
                ),
            )
        )
    ok, message = database.read_sync(audit.verify)
    assert ok, message
    database.write_sync(lambda d: d.execute("UPDATE audit_log SET actor_id = 2 WHERE id = 3"))
    ok, message = database.read_sync(audit.verify)
    assert not ok and "row 3" in message
    database.write_sync(lambda d: d.execute("UPDATE audit_log SET actor_id = 1 WHERE id = 3"))
    assert database.read_sync(audit.verify)[0]
    database.write_sync(lambda d: d.execute("DELETE FROM audit_log WHERE id = 2"))
    ok, message = database.read_sync(audit.verify)
    assert not ok and "row 2" in message
