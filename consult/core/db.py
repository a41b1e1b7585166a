"""SQLite access that never blocks the event loop.

Reads run in a small thread pool, each thread with its own connection. Every write goes
through one writer thread inside ``BEGIN IMMEDIATE``; the function's result, or its
exception, travels back to whoever awaited the write (Datasette's pattern).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import sqlite_utils

log = logging.getLogger(__name__)
T = TypeVar("T")


def connect(path: Path | str, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
    else:
        conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA busy_timeout = 5000")
    conn.execute("PRAGMA foreign_keys = ON")
    if not readonly:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
    return conn


def run_in_transaction(db: sqlite_utils.Database, fn: Callable[[sqlite_utils.Database], T]) -> T:
    conn = db.conn
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = fn(db)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return result


class Database:
    def __init__(self, path: Path, read_threads: int = 3) -> None:
        self.path = Path(path)
        self._local = threading.local()
        self._readers = ThreadPoolExecutor(read_threads, thread_name_prefix="db-read")
        self._writes: queue.Queue[Any] = queue.Queue()
        self._writer: threading.Thread | None = None
        self._closed = False

    # -- reads -------------------------------------------------------------------------
    def _read_db(self) -> sqlite_utils.Database:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite_utils.Database(connect(self.path, readonly=True))
            self._local.db = db
            self._local_all().append(db)
        return db

    def _local_all(self) -> list[sqlite_utils.Database]:
        if not hasattr(self, "_all_readers"):
            self._all_readers: list[sqlite_utils.Database] = []
        return self._all_readers

    async def execute_fn(self, fn: Callable[[sqlite_utils.Database], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._readers, lambda: fn(self._read_db()))

    async def query(self, sql: str, params: Any = ()) -> list[sqlite3.Row]:
        return await self.execute_fn(lambda db: db.execute(sql, params).fetchall())

    async def query_one(self, sql: str, params: Any = ()) -> sqlite3.Row | None:
        return await self.execute_fn(lambda db: db.execute(sql, params).fetchone())

    # -- writes ------------------------------------------------------------------------
    def _start_writer(self) -> None:
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_loop, name="db-writer", daemon=True)
            self._writer.start()

    def _write_loop(self) -> None:
        db = sqlite_utils.Database(connect(self.path))
        try:
            while True:
                task = self._writes.get()
                if task is None:
                    return
                fn, loop, future = task
                try:
                    result = run_in_transaction(db, fn)
                except BaseException as exc:  # travels back to the awaiting coroutine
                    if not loop.is_closed():
                        loop.call_soon_threadsafe(_set_exception, future, exc)
                else:
                    if not loop.is_closed():
                        loop.call_soon_threadsafe(_set_result, future, result)
        finally:
            db.conn.close()

    async def execute_write_fn(self, fn: Callable[[sqlite_utils.Database], T]) -> T:
        if self._closed:
            raise RuntimeError("database is closed")
        self._start_writer()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._writes.put((fn, loop, future))
        return await future

    def write_sync(self, fn: Callable[[sqlite_utils.Database], T]) -> T:
        """For the CLI and migrations: a write outside any event loop."""
        db = sqlite_utils.Database(connect(self.path))
        try:
            return run_in_transaction(db, fn)
        finally:
            db.conn.close()

    def read_sync(self, fn: Callable[[sqlite_utils.Database], T]) -> T:
        db = sqlite_utils.Database(connect(self.path))
        try:
            return fn(db)
        finally:
            db.conn.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._writer is not None:
            self._writes.put(None)
            self._writer.join(timeout=10)
        self._readers.shutdown(wait=True)
        for db in self._local_all():
            db.conn.close()


def _set_result(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
