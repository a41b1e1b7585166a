from __future__ import annotations

import asyncio
import errno
import sqlite3
import threading
import time

import pytest
import sqlite_utils

from consult.audit import chain as audit
from consult.core.db import Database, DatabaseError, IntegrityError, run_in_transaction
from consult.core.engine import open_database
from consult.core.errors import DatabaseUnavailable, StorageFull, is_storage_full
from consult.core.migrations import MIGRATIONS, applied, migrate, migrate_settings


@pytest.mark.sqlite_only("a fresh SQLite file in WAL mode")
def test_migrate_fresh_then_again(tmp_path):
    path = tmp_path / "c.db"
    names = migrate(path)
    assert names == [n for n, _ in MIGRATIONS]
    assert migrate(path) == []
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.sqlite_only("a migration of an old SQLite file")
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


def test_failed_migration_leaves_database_unchanged(settings, monkeypatch):
    migrate_settings(settings)

    def broken(d):
        d.execute("CREATE TABLE half_done (x INTEGER)")
        raise RuntimeError("boom")

    monkeypatch.setattr("consult.core.migrations.MIGRATIONS", [*MIGRATIONS, ("9999_broken", broken)])
    with pytest.raises(RuntimeError):
        migrate_settings(settings)
    db = open_database(settings)
    try:
        with pytest.raises(DatabaseError, match="half_done"):
            db.read_sync(lambda d: d.execute("SELECT count(*) FROM half_done").fetchone())
        assert "9999_broken" not in db.read_sync(applied)
    finally:
        db.close()


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


# -- the writer survives --------------------------------------------------------------------


def _outbox_row(d, recipient="x"):
    d.execute(
        "INSERT INTO outbox (channel, recipient, subject, body, created) VALUES ('sms', ?, '', '', 0)",
        [recipient],
    )


async def test_writer_that_cannot_connect_fails_fast_and_recovers(tmp_path):
    path = tmp_path / "c.db"
    path.mkdir()  # SQLite cannot open a directory: the writer's connection fails
    db = Database(path, retry_initial_s=0.01, retry_max_s=0.1)
    try:
        started = time.monotonic()
        for _ in range(5):
            with pytest.raises(DatabaseUnavailable) as caught:
                await asyncio.wait_for(db.execute_write_fn(_outbox_row), 5)
            assert caught.value.status == 503
            assert caught.value.message == "The database is not available; please try again."
        assert time.monotonic() - started < 3  # failed fast, nobody waits forever
        assert db.status.state == "down" and db.status.failures >= 1
        assert "unable to open" in db.status.error
        assert db._writer is not None and db._writer.is_alive()

        path.rmdir()
        migrate(path)  # fixed: the next attempt (backoff at most 0.1 s) connects
        deadline = time.monotonic() + 5
        while True:
            try:
                await asyncio.wait_for(db.execute_write_fn(_outbox_row), 5)
                break
            except DatabaseUnavailable:
                assert time.monotonic() < deadline, "the writer never reconnected"
                await asyncio.sleep(0.05)
        assert db.status.state == "up" and db.status.error is None
        assert (await db.query_one("SELECT count(*) AS n FROM outbox"))["n"] == 1
    finally:
        db.close()
    assert db.status.state == "closed"


async def test_pending_writes_fail_when_the_writer_loses_its_database(tmp_path):
    """Writes queued while the connection fails are all answered, none is left waiting."""
    path = tmp_path / "c.db"
    path.mkdir()
    db = Database(path, retry_initial_s=5, retry_max_s=5)  # long backoff: the retry comes later
    try:
        results = await asyncio.wait_for(
            asyncio.gather(*(db.execute_write_fn(_outbox_row) for _ in range(20)), return_exceptions=True),
            5,
        )
        assert all(isinstance(r, DatabaseUnavailable) for r in results), results
    finally:
        db.close()


async def test_failed_commit_rolls_back_and_the_writer_goes_on(database: Database):
    """A COMMIT that fails leaves no open transaction behind (here a deferred foreign key).

    SQLite keeps the transaction open when COMMIT fails this way, as it does for SQLITE_BUSY;
    before, every later write then failed with "cannot start a transaction within a transaction".
    """
    await database.execute_write_fn(lambda d: d.execute("CREATE TABLE parent_t (id INTEGER PRIMARY KEY)"))
    await database.execute_write_fn(
        lambda d: d.execute(
            "CREATE TABLE child_t (id INTEGER PRIMARY KEY, parent_id INTEGER"
            " REFERENCES parent_t(id) DEFERRABLE INITIALLY DEFERRED)"
        )
    )

    def orphan(d):
        _outbox_row(d, "orphan")
        d.execute("INSERT INTO child_t (parent_id) VALUES (42)")  # checked only at COMMIT

    with pytest.raises(IntegrityError, match=r"(?i)foreign key"):
        await database.execute_write_fn(orphan)
    # The next write works, and nothing of the failed one was kept.
    await database.execute_write_fn(lambda d: _outbox_row(d, "after"))
    rows = await database.query("SELECT recipient FROM outbox ORDER BY id")
    assert [r["recipient"] for r in rows] == ["after"]
    assert (await database.query_one("SELECT count(*) AS n FROM child_t"))["n"] == 0
    assert database.status.state == "up"


def test_failed_commit_rolls_back_in_write_sync(tmp_path):
    conn = sqlite3.connect(tmp_path / "c.db", isolation_level=None)
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("CREATE TABLE p (id INTEGER PRIMARY KEY)")
    conn.execute("CREATE TABLE c (p INTEGER REFERENCES p(id) DEFERRABLE INITIALLY DEFERRED)")
    db = sqlite_utils.Database(conn)
    with pytest.raises(sqlite3.IntegrityError):
        run_in_transaction(db, lambda d: d.execute("INSERT INTO c VALUES (1)"))
    assert not conn.in_transaction
    run_in_transaction(db, lambda d: d.execute("INSERT INTO p VALUES (1)"))
    assert conn.execute("SELECT count(*) FROM c").fetchone()[0] == 0


def test_an_automatic_rollback_does_not_hide_the_error(tmp_path):
    """When SQLite has already rolled back (disk full, I/O error), the caller sees that error."""
    conn = sqlite3.connect(tmp_path / "c.db", isolation_level=None)
    db = sqlite_utils.Database(conn)

    def rolls_back_itself(d):
        d.execute("ROLLBACK")  # what SQLite does on its own after SQLITE_FULL
        raise sqlite3.OperationalError("database or disk is full")

    with pytest.raises(sqlite3.OperationalError, match="disk is full"):
        run_in_transaction(db, rolls_back_itself)
    assert not conn.in_transaction


def _disk_full_error(engine: str) -> Exception:
    """What each engine raises when its disk is full (SQLITE_FULL; PostgreSQL's SQLSTATE 53100)."""
    if engine == "postgresql":
        import psycopg

        return psycopg.errors.DiskFull("could not extend file: No space left on device")
    return sqlite3.OperationalError("database or disk is full")


async def test_a_full_disk_from_the_database_is_the_storage_full_error(database: Database):
    def full(d):
        _outbox_row(d)
        raise _disk_full_error(database.engine)

    with pytest.raises(StorageFull) as caught:
        await database.execute_write_fn(full)
    assert caught.value.status == 507
    assert "was not saved" in caught.value.message and "Nothing you entered" not in caught.value.message
    assert is_storage_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_storage_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert not is_storage_full(OSError(errno.EACCES, "Permission denied"))
    assert (await database.query_one("SELECT count(*) AS n FROM outbox"))["n"] == 0


@pytest.mark.sqlite_only("SQLite's planner statistics (sqlite_stat1); PostgreSQL's autovacuum keeps its own")
async def test_a_running_app_keeps_planner_statistics(aiohttp_client, settings, make_user):
    """At start-up the app refreshes SQLite's planner statistics (bounded ANALYZE / PRAGMA optimize):
    the session list's indexes are chosen from real row counts, not guesses, as tables grow."""
    from consult.app import create_app

    for i in range(3):
        make_user("patient", login=f"1390000000{i}")
    path = settings.data_dir / "consult.db"
    await aiohttp_client(create_app(settings))
    deadline = time.monotonic() + 20
    rows = []
    while time.monotonic() < deadline:
        conn = sqlite3.connect(path)
        try:
            has_table = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'sqlite_stat1'").fetchone()
            rows = conn.execute("SELECT tbl, idx FROM sqlite_stat1").fetchall() if has_table else []
        finally:
            conn.close()
        if rows:
            break
        await asyncio.sleep(0.1)
    assert "users" in {tbl for tbl, _idx in rows}, rows


def test_optimize_is_bounded_and_repeatable(tmp_path):
    from consult.core.db import optimize_sync

    path = tmp_path / "c.db"
    migrate(path)
    db = Database(path)
    try:
        ran = db.write_sync(optimize_sync)
        assert ran in ("optimize", "analyze")
        assert db.write_sync(optimize_sync) == ran
        limit = db.read_sync(lambda d: d.execute("PRAGMA analysis_limit").fetchone()[0])
        assert limit == 0  # a per-connection setting: the writer's, not left on other connections
    finally:
        db.close()


def test_a_nul_in_a_looked_up_value_finds_nothing(database: Database):
    """A hostile value (a NUL in a URL path) is an ordinary miss on both engines, not an error
    (PostgreSQL's text cannot hold NUL: the adapter sends U+FFFD instead)."""
    sql = "SELECT id FROM users WHERE username = ? OR phone = ?"
    found = database.read_sync(lambda d: d.execute(sql, ["a\x00b", "\x00"]).fetchall())
    assert found == []
