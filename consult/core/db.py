"""SQLite access that never blocks the event loop.

Reads run in a small thread pool, each thread with its own connection. Every write goes
through one writer thread inside ``BEGIN IMMEDIATE``; the function's result, or its
exception, travels back to whoever awaited the write (Datasette's pattern).

The writer never dies and never leaves a write waiting: if its connection cannot be opened it
fails every pending write with ``DatabaseUnavailable`` (503) and tries again with a capped
exponential backoff (at once if a write arrives after the backoff); a connection left in a bad
state (a ROLLBACK that failed, an I/O error) is replaced. A full disk, from SQLite or the OS,
reaches the caller as ``StorageFull`` (507).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import sqlite_utils

from consult.core.errors import DatabaseUnavailable, storage_error

log = logging.getLogger(__name__)
T = TypeVar("T")

try:
    import psycopg as _psycopg
except ImportError:  # PostgreSQL is optional; SQLite is always there
    _psycopg = None

# What domain code catches, whichever engine answers: a constraint refused a row, or the database
# failed the statement.
IntegrityError: tuple[type[Exception], ...] = (sqlite3.IntegrityError,) + (
    (_psycopg.IntegrityError,) if _psycopg else ()
)
DatabaseError: tuple[type[Exception], ...] = (sqlite3.Error,) + ((_psycopg.Error,) if _psycopg else ())


# Page cache of each read connection, in KiB (SQLite's negative cache_size): 32 MiB at most per
# reader thread (3 by default: 96 MiB at most for the pool, reached only as pages are read).
# SQLite's default, 2 MiB, held less than one admin list's index and table pages at 1,000,000
# sessions, so pages it had just read came again from the OS (~0.25 ms a list page).
READER_CACHE_KIB = 32 * 1024


def connect(path: Path | str, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
    else:
        conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA busy_timeout = 5000")
    conn.execute("PRAGMA foreign_keys = ON")
    if readonly:
        conn.execute(f"PRAGMA cache_size = -{READER_CACHE_KIB}")
    else:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
    return conn


def skip_locked(db: Any) -> str:
    """What ends a SELECT whose rows this transaction is about to change, taking them for itself.

    On PostgreSQL ``FOR UPDATE SKIP LOCKED``: the rows are locked until the transaction ends and
    rows another transaction holds are passed over, not waited for, so two nodes claiming work at
    once take different rows. SQLite has one writer, so nothing is needed (and its grammar has no
    FOR UPDATE): the empty string. ``db`` is the handle the domain function was given.
    """
    return " FOR UPDATE SKIP LOCKED" if getattr(db, "engine", "sqlite") == "postgresql" else ""


# Keyed locks, in the one order every transaction takes them (see `lock_keys`): a transaction
# may take a key only after every key it already holds, so no two transactions can each hold
# what the other waits for. The audit chain's key comes last of all.
LOCK_KINDS = {"doctor": 1, "patient": 2, "audit": 9}
_LOCK_SPACE = 0x436F6E00  # "Con\0" + the kind's rank: the first int of PostgreSQL's 2-int key


def lock_key(kind: str, ident: int = 0) -> tuple[int, int]:
    """The stable 2-int advisory-lock key of (kind, id): ids beyond 32 bits wrap, which only
    makes two ids share a lock (more waiting, never less safety)."""
    return _LOCK_SPACE + LOCK_KINDS[kind], (int(ident) + 2**31) % 2**32 - 2**31


def lock_keys(db: Any, *keys: tuple[str, int]) -> None:
    """Serialise this write transaction with every other one holding any of ``keys`` (``(kind, id)``
    pairs, e.g. ``("doctor", 7), ("patient", 12)``) until it ends.

    On PostgreSQL transaction-scoped advisory locks (``pg_advisory_xact_lock(int, int)``), taken in
    the fixed order of `LOCK_KINDS` (doctor, then patient, the audit chain last) and, within a
    kind, by id; a key that would come before one the transaction already holds is a programming
    error (it could deadlock) and raises ``RuntimeError``. They are what a write that skips the
    cluster's write lock (``execute_write_fn(fn, exclusive=False)``) serialises on instead, for the
    reads its decision rests on. The whole order, for every write transaction on PostgreSQL:

        cluster write lock (exclusive writes only) -> keyed locks -> the audit lock (last)

    On SQLite, which has one writer, it does nothing. ``db`` is the handle the domain function was
    given; domain code calls this without knowing the engine.
    """
    if getattr(db, "engine", "sqlite") != "postgresql":
        return
    db.advisory_xact_locks(sorted({lock_key(kind, ident) for kind, ident in keys}))


def run_in_transaction(db: sqlite_utils.Database, fn: Callable[[sqlite_utils.Database], T]) -> T:
    """``fn(db)`` inside ``BEGIN IMMEDIATE``: committed if it returns, rolled back if it raises.

    A COMMIT that fails (busy, disk full, I/O error) is rolled back too: the transaction is
    never left open, and the caller sees the COMMIT's error, not the ROLLBACK's.
    """
    conn = db.conn
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = fn(db)
        conn.execute("COMMIT")
    except BaseException:
        rollback_quietly(conn)
        raise
    return result


@contextlib.contextmanager
def savepoint(db: Any, name: str) -> Iterator[None]:
    """Inside a write transaction: what the block writes is rolled back alone if it raises (the
    exception goes on), the rest of the transaction stays. On PostgreSQL this also brings back a
    transaction a refused statement aborted. ``name`` is a plain identifier of the caller's."""
    db.execute(f"SAVEPOINT {name}")
    try:
        yield
    except BaseException:
        db.execute(f"ROLLBACK TO {name}")
        db.execute(f"RELEASE {name}")
        raise
    db.execute(f"RELEASE {name}")


# Rows ANALYZE samples per index: statistics good enough for the planner, in milliseconds even
# at millions of rows (SQLite's own advice for PRAGMA optimize on long-lived connections).
ANALYSIS_LIMIT = 1000


def optimize_sync(db: sqlite_utils.Database) -> str:
    """Keep the query planner's statistics current, at a bounded cost; returns what ran.

    On SQLite 3.46+ this is ``PRAGMA optimize=0x10002``, which analyses every table whose
    statistics are missing or stale. Older versions (Debian 12 ships 3.40) only analyse tables that
    this connection has queried, so the writer (which mostly inserts) would never refresh the
    statistics the readers' queries need: there a bounded ``ANALYZE`` does the same job.
    """
    if getattr(db, "engine", "sqlite") == "postgresql":
        return "autovacuum"  # PostgreSQL's autovacuum daemon keeps the statistics itself
    db.execute(f"PRAGMA analysis_limit = {ANALYSIS_LIMIT}")
    if sqlite3.sqlite_version_info >= (3, 46, 0):
        db.execute("PRAGMA optimize = 0x10002")
        return "optimize"
    db.execute("ANALYZE")
    return "analyze"


async def keep_statistics(db: Database, every_s: float) -> None:
    """Run `optimize_sync` now and then every `every_s` seconds (0: once), through the writer."""
    while True:
        started = time.monotonic()
        try:
            ran = await db.execute_write_fn(optimize_sync)
            log.info("planner statistics refreshed (%s) in %.0f ms", ran, (time.monotonic() - started) * 1000)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("refreshing planner statistics failed")
        if every_s <= 0:
            return
        await asyncio.sleep(every_s)


def rollback_quietly(conn: sqlite3.Connection) -> bool:
    """End any open transaction; True if the connection is clean afterwards.

    SQLite may already have rolled back by itself (SQLITE_FULL, SQLITE_IOERR); a second ROLLBACK
    would then raise and hide the error that matters.
    """
    try:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        return not conn.in_transaction
    except sqlite3.Error:
        log.exception("ROLLBACK failed")
        return False


@dataclass
class WriterStatus:
    """What the writer thread is doing, for ``/healthz`` and the logs."""

    state: str = "idle"  # idle (no write yet), up, down (retrying), closed
    since: float = field(default_factory=time.time)
    error: str | None = None  # the last failure to open the connection, while down
    failures: int = 0  # failed connection attempts in a row
    reconnects: int = 0  # connections replaced since start

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# SQLite result codes after which the writer's connection is not trusted any more.
_BROKEN_CODES = frozenset(
    {sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_CANTOPEN}
)


class Database:
    def __init__(
        self,
        path: Path | None,
        read_threads: int = 3,
        *,
        retry_initial_s: float = 0.05,
        retry_max_s: float = 5.0,
    ) -> None:
        # None: no SQLite file at all (PgDatabase). The SQLite connections below then refuse to
        # open rather than create a database file wherever the process happens to run.
        self.path = Path(path) if path is not None else None
        self._local = threading.local()
        self._readers = ThreadPoolExecutor(read_threads, thread_name_prefix="db-read")
        self._writes: queue.Queue[Any] = queue.Queue()
        self._writer: threading.Thread | None = None
        self._writer_lock = threading.Lock()
        self._closed = False
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.status = WriterStatus()
        self.writer_attempted = threading.Event()  # set once the writer tried to connect

    # -- the engine: what a subclass for another database replaces ----------------------
    engine = "sqlite"
    _errors: tuple[type[BaseException], ...] = (sqlite3.Error, OSError)

    def describe(self) -> str:
        return str(self.path)

    def _sqlite_path(self) -> Path:
        if self.path is None:
            raise RuntimeError(f"{type(self).__name__} has no SQLite file to open")
        return self.path

    def _connect_reader(self) -> Any:
        return sqlite_utils.Database(connect(self._sqlite_path(), readonly=True))

    def _connect_writer(self) -> Any:
        return sqlite_utils.Database(connect(self._sqlite_path()))

    def _transaction(self, db: Any, fn: Callable[[Any], T], exclusive: bool = True) -> T:
        # SQLite: BEGIN IMMEDIATE is the one write lock, and every transaction takes it.
        return run_in_transaction(db, fn)

    def _broken(self, db: Any, exc: BaseException) -> bool:
        return _connection_broken(db, exc)

    def _close_handle(self, db: Any) -> None:
        _close_quietly(db)

    def _map_error(self, exc: BaseException) -> BaseException | None:
        return storage_error(exc)

    # -- reads -------------------------------------------------------------------------
    def _read_db(self) -> sqlite_utils.Database:
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._connect_reader()
            self._local.db = db
            self._local_all().append(db)
        return db

    def _local_all(self) -> list[sqlite_utils.Database]:
        if not hasattr(self, "_all_readers"):
            self._all_readers: list[sqlite_utils.Database] = []
        return self._all_readers

    async def execute_fn(self, fn: Callable[[sqlite_utils.Database], T]) -> T:
        loop = asyncio.get_running_loop()
        # The caller's context variables (the request's language) go with the call: a message
        # made on the reader thread is in the language of whoever asked for the read.
        ctx = contextvars.copy_context()
        future: asyncio.Future[T] = loop.create_future()

        def run() -> None:
            # The answer comes back the way the writer's does (`_deliver`): one callback on the
            # loop, not run_in_executor's pair of chained futures (every request reads its session).
            try:
                result = ctx.run(self._run_read, fn)
            except BaseException as exc:
                _deliver(loop, future, exc=exc)
            else:
                _deliver(loop, future, result=result)

        self._readers.submit(run)
        try:
            return await future
        except self._errors as exc:
            mapped = self._map_error(exc)
            if mapped is None:
                raise
            raise mapped from exc

    def _run_read(self, fn: Callable[[Any], T]) -> T:
        return fn(self._read_db())

    async def query(self, sql: str, params: Any = ()) -> list[sqlite3.Row]:
        return await self.execute_fn(lambda db: db.execute(sql, params).fetchall())

    async def query_one(self, sql: str, params: Any = ()) -> sqlite3.Row | None:
        return await self.execute_fn(lambda db: db.execute(sql, params).fetchone())

    # -- writes ------------------------------------------------------------------------
    def start_writer(self) -> None:
        """Start the writer thread (again, should it ever have ended)."""
        with self._writer_lock:
            if self._closed:
                return
            if self._writer is None or not self._writer.is_alive():
                if self._writer is not None:
                    log.error("database writer thread had ended; starting a new one")
                self._writer = threading.Thread(target=self._write_loop, name="db-writer", daemon=True)
                self._writer.start()

    _start_writer = start_writer

    def _open_writer(self) -> sqlite_utils.Database | None:
        """One attempt to open the writer's connection; None (and the state 'down') if it fails."""
        try:
            db = self._connect_writer()
        except Exception as exc:
            failures = self.status.failures + 1
            if self.status.state != "down" or failures in (1, 10) or failures % 100 == 0:
                log.error("database writer cannot open %s (attempt %d): %s", self.describe(), failures, exc)
            self.status = WriterStatus(
                "down",
                since=self.status.since if self.status.state == "down" else time.time(),
                error=f"{type(exc).__name__}: {exc}",
                failures=failures,
                reconnects=self.status.reconnects,
            )
            self.writer_attempted.set()
            return None
        if self.status.state == "down":
            log.warning("database writer connected again after %d failed attempts", self.status.failures)
        reconnects = self.status.reconnects + (1 if self.status.state in ("up", "down") else 0)
        self.status = WriterStatus("up", reconnects=reconnects)
        self.writer_attempted.set()
        return db

    def _write_loop(self) -> None:
        db: sqlite_utils.Database | None = None
        delay = self.retry_initial_s
        next_try = 0.0  # monotonic time of the next connection attempt while down
        try:
            while True:
                try:
                    if db is None and time.monotonic() >= next_try:
                        db = self._open_writer()
                        if db is None:
                            next_try = time.monotonic() + delay
                            delay = min(delay * 2, self.retry_max_s)
                            if self._fail_pending():
                                return
                        else:
                            delay = self.retry_initial_s
                    timeout = None if db is not None else max(0.0, next_try - time.monotonic())
                    try:
                        task = self._writes.get(timeout=timeout)
                    except queue.Empty:
                        continue
                    if task is None:
                        return
                    fn, exclusive, ctx, loop, future = task
                    if db is None and time.monotonic() >= next_try:
                        db = self._open_writer()  # a write is waiting: try now, not after a sleep
                        if db is None:
                            next_try = time.monotonic() + delay
                            delay = min(delay * 2, self.retry_max_s)
                        else:
                            delay = self.retry_initial_s
                    if db is None:
                        _deliver(loop, future, exc=self._unavailable())
                        continue
                    try:
                        # In the caller's context: a translated error raised by fn speaks the
                        # language of the request that asked for the write.
                        result = ctx.run(self._transaction, db, fn, exclusive)
                    except BaseException as exc:  # travels back to the awaiting coroutine
                        _deliver(loop, future, exc=exc)
                        if self._broken(db, exc):
                            log.error("database writer replaces its connection after: %r", exc)
                            self._close_handle(db)
                            db = None
                            next_try = 0.0
                    else:
                        _deliver(loop, future, result=result)
                except Exception:  # never a dead writer: whatever happened, serve the next write
                    log.exception("database writer: unexpected error")
                    time.sleep(0.01)
        finally:
            if db is not None:
                self._close_handle(db)
            self.status = WriterStatus("closed", reconnects=self.status.reconnects)

    def _unavailable(self) -> DatabaseUnavailable:
        exc = DatabaseUnavailable()
        exc.detail = self.status.error  # type: ignore[attr-defined]
        return exc

    def _fail_pending(self) -> bool:
        """Fail every queued write at once rather than keep it waiting; True if closing."""
        while True:
            try:
                task = self._writes.get_nowait()
            except queue.Empty:
                return False
            if task is None:
                return True
            _fn, _exclusive, _ctx, loop, future = task
            _deliver(loop, future, exc=self._unavailable())

    async def execute_write_fn(
        self, fn: Callable[[sqlite_utils.Database], T], *, exclusive: bool = True
    ) -> T:
        """``fn(db)`` in a write transaction on the writer thread; its result or its exception.

        ``exclusive=False`` is for a transaction that needs no cluster-wide order because it
        locks what it relies on itself: a job claim (one UPDATE over rows selected with
        `skip_locked`), a hold (`lock_keys` on its doctor and patient; the UNIQUE index decides
        the slot). On PostgreSQL it does not take the cluster's write lock, so it neither waits
        for it nor holds up the writes that take it. It still runs on this node's one writer
        thread. SQLite ignores it (one writer anyway).
        """
        if self._closed:
            raise RuntimeError("database is closed")
        self.start_writer()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._writes.put((fn, exclusive, contextvars.copy_context(), loop, future))
        try:
            return await future
        except self._errors as exc:
            mapped = self._map_error(exc)
            if mapped is None:
                raise
            raise mapped from exc

    def write_sync(self, fn: Callable[[sqlite_utils.Database], T]) -> T:
        """For the CLI and migrations: a write outside any event loop."""
        db = self._connect_writer()
        try:
            return self._transaction(db, fn)
        finally:
            self._close_handle(db)

    def read_sync(self, fn: Callable[[sqlite_utils.Database], T]) -> T:
        db = self._connect_writer()
        try:
            return fn(db)
        finally:
            self._close_handle(db)

    def close(self) -> None:
        if self._closed:
            return
        with self._writer_lock:
            self._closed = True
        if self._writer is not None:
            self._writes.put(None)
            self._writer.join(timeout=10)
        self._readers.shutdown(wait=True)
        for db in self._local_all():
            self._close_handle(db)


def _deliver(
    loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any], *, result: Any = None, exc: Any = None
) -> None:
    try:
        if exc is not None:
            loop.call_soon_threadsafe(_set_exception, future, exc)
        else:
            loop.call_soon_threadsafe(_set_result, future, result)
    except RuntimeError:  # the loop is closed: nobody is waiting any more
        pass


def _connection_broken(db: sqlite_utils.Database, exc: BaseException) -> bool:
    """Whether the writer should open a new connection after ``exc``."""
    if db.conn.in_transaction:  # not even ROLLBACK worked
        return True
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(exc, sqlite3.DatabaseError) and code is not None and code & 0xFF in _BROKEN_CODES


def _close_quietly(db: sqlite_utils.Database) -> None:
    try:
        db.conn.close()
    except sqlite3.Error:
        log.exception("closing the writer's connection failed")


def _set_result(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
