"""PostgreSQL behind the same handle the domain code already uses.

Domain functions are written once, in the portable subset of SQL both engines share, with
SQLite's ``?`` and ``:name`` placeholders; they receive a handle with ``execute(sql, params)``
and never learn which engine answers. For PostgreSQL this module supplies that handle:

- `translate` rewrites a statement once (cached): placeholders to psycopg's ``%s`` /
  ``%(name)s``, ``LIKE`` to ``ILIKE`` (SQLite's LIKE ignores case), two-argument ``max``/``min``
  to ``GREATEST``/``LEAST``, ``CAST(... AS REAL)`` to double precision, ``group_concat(x, sep)``
  to ``string_agg(x, sep)`` (the domain always names the separator: string_agg needs it),
  ``length(CAST(x AS BLOB))`` (SQLite's length in bytes) to ``octet_length(x)``.
- `Row` answers by position and by column name, like ``sqlite3.Row``.
- Python ints go to the server untyped, so the column decides (SQLite stores what it is given;
  an id passed to a TEXT column must not fail); ``numeric`` results (SUM, AVG) come back as int
  or float, never Decimal; a NUL in a string (which PostgreSQL's text cannot hold) is sent as U+FFFD.
- Inside a write transaction every data-changing statement runs under a savepoint: a domain
  function that catches a constraint violation (a slot just taken) carries on in the same
  transaction, as it does on SQLite, instead of finding the transaction aborted.
- `Handle.advisory_xact_locks` takes the keyed locks of ``core.db.lock_keys`` in one order (see
  `WRITE_LOCK_KEY` for the whole order) and forgets those a ROLLBACK TO a savepoint released.

`schema_statements` turns the SQLite schema the migrations build into PostgreSQL DDL, so the
two engines share one migration history (see ``consult.core.migrations``).
"""

from __future__ import annotations

import logging
import re
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from functools import lru_cache
from typing import Any, TypeVar

import psycopg
import psycopg_pool
from psycopg import pq
from psycopg.adapt import Dumper, Loader
from psycopg.types.string import StrDumperUnknown
from psycopg_pool import ConnectionPool

from consult.core.db import Database
from consult.core.errors import DatabaseUnavailable, StorageFull, storage_error

log = logging.getLogger(__name__)
T = TypeVar("T")

# Every write transaction on PostgreSQL takes this transaction-scoped advisory lock first: writes
# are serialised across all nodes exactly as SQLite's one writer serialises them on one node,
# which is what the domain code's read-then-write transactions rely on. The exceptions are the
# transactions asked for with ``exclusive=False`` (job claims, holds), which lock their rows, or
# take keyed locks (core/db.lock_keys), themselves. Lock order in every write transaction:
#   this cluster lock (exclusive writes only) -> keyed locks (doctor, then patient)
#   -> the audit chain's lock (taken right before appending, held to the end: always last).
# The keyed locks use PostgreSQL's 2-int key space, which never overlaps this 1-bigint key.
WRITE_LOCK_KEY = 0x436F6E73  # "Cons"
# What PostgreSQL fails a transaction with for its own reasons, not the request's: run it again.
RETRIED_ERRORS = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)
TRANSACTION_RETRIES = 2


# -- statements --------------------------------------------------------------------------------

_TOKEN = re.compile(
    r"""
    (?P<str>'(?:[^']|'')*')            # a string literal
  | (?P<ident>"(?:[^"]|"")*")          # a quoted identifier
  | (?P<comment>--[^\n]*)              # a line comment
  | (?P<numbered>\?\d+)                # numbered placeholder (?1, ?2: SQLite's)
  | (?P<qmark>\?)                      # positional placeholder
  | (?P<named>(?<![:\w]):[A-Za-z_]\w*) # named placeholder
  | (?P<pct>%)                         # psycopg's own placeholder character
    """,
    re.VERBOSE,
)
_LIKE = re.compile(r"\bNOT\s+LIKE\b|\bLIKE\b", re.IGNORECASE)
_MAX2 = re.compile(r"\b(max|min)\(\s*([^(),]+?)\s*,\s*([^(),]+?)\s*\)", re.IGNORECASE)
_CREATE_TABLE = re.compile(r"\s*CREATE\s+TABLE\b", re.IGNORECASE)
_ADD_COLUMN = re.compile(r"\s*ALTER\s+TABLE\s+\S+\s+ADD\s+COLUMN\b", re.IGNORECASE)
_CAST_REAL = re.compile(r"\bAS\s+REAL\b", re.IGNORECASE)
_GROUP_CONCAT = re.compile(r"\bgroup_concat\s*\(", re.IGNORECASE)
_BYTE_LENGTH = re.compile(r"\blength\(\s*CAST\(\s*([\w.]+)\s+AS\s+BLOB\s*\)\s*\)", re.IGNORECASE)


def _rewrite_code(code: str) -> str:
    """What changes between the engines, in the parts of a statement outside literals."""
    code = _LIKE.sub(lambda m: "NOT ILIKE" if m.group(0).upper().startswith("NOT") else "ILIKE", code)
    code = _MAX2.sub(
        lambda m: f"{'GREATEST' if m.group(1).lower() == 'max' else 'LEAST'}({m.group(2)}, {m.group(3)})",
        code,
    )
    code = _GROUP_CONCAT.sub("string_agg(", code)
    code = _BYTE_LENGTH.sub(r"octet_length(\1)", code)
    return _CAST_REAL.sub("AS DOUBLE PRECISION", code)


@lru_cache(maxsize=4096)
def translate(sql: str) -> str:
    """``sql`` in SQLite's dialect (as the domain writes it) → PostgreSQL with psycopg placeholders."""
    if _CREATE_TABLE.match(sql) or _ADD_COLUMN.match(sql):
        sql = _table_ddl(sql)
    out: list[str] = []
    pos = 0
    code: list[str] = []

    def flush_code() -> None:
        if code:
            out.append(_rewrite_code("".join(code)))
            code.clear()

    for m in _TOKEN.finditer(sql):
        code.append(sql[pos : m.start()])
        pos = m.end()
        kind = m.lastgroup
        if kind == "qmark":
            code.append("%s")
        elif kind == "numbered":
            code.append(f"%(_{m.group(0)[1:]})s")  # the list of values becomes a dict (Handle)
        elif kind == "named":
            code.append(f"%({m.group(0)[1:]})s")
        elif kind == "pct":
            code.append("%%")
        else:
            flush_code()
            text = m.group(0)
            if kind == "comment":
                text = ""
            out.append(text.replace("%", "%%"))
    code.append(sql[pos:])
    flush_code()
    return "".join(out)


_WRITES = ("INSERT", "UPDATE", "DELETE", "REPLACE", "WITH")
# A domain function's own savepoints (payments: SAVEPOINT confirm_visit ... ROLLBACK TO it): a
# rollback to a savepoint releases the advisory locks taken since, so the handle forgets them too.
_SAVEPOINT_OP = re.compile(
    r"\s*(SAVEPOINT|ROLLBACK\s+TO(?:\s+SAVEPOINT)?|RELEASE(?:\s+SAVEPOINT)?)\s+(\w+)\s*$", re.IGNORECASE
)


def _changes_data(sql: str) -> bool:
    head = sql.lstrip()[:8].upper()
    return head.startswith(_WRITES)


# -- values ------------------------------------------------------------------------------------


class _UntypedIntDumper(Dumper):
    """An int as text of unknown type: PostgreSQL takes the type from the column it meets."""

    oid = 0

    def dump(self, obj: int) -> bytes:
        return str(int(obj)).encode()


class _NulSafeStrDumper(StrDumperUnknown):
    """A str as psycopg sends it, except that NUL, which PostgreSQL's text cannot hold (psycopg
    refuses it with DataError), becomes U+FFFD: a lookup by a hostile value (a NUL in a URL path)
    finds nothing, as on SQLite, instead of failing the request."""

    def dump(self, obj: str) -> Any:
        return super().dump(obj.replace("\x00", "\ufffd") if "\x00" in obj else obj)


class _NumericLoader(Loader):
    def load(self, data: Any) -> int | float:
        text = bytes(data).decode()
        return int(text) if text.lstrip("-").isdigit() else float(text)


def configure(conn: psycopg.Connection) -> None:
    conn.adapters.register_dumper(int, _UntypedIntDumper)
    conn.adapters.register_dumper(bool, _UntypedIntDumper)
    conn.adapters.register_dumper(str, _NulSafeStrDumper)
    conn.adapters.register_loader("numeric", _NumericLoader)


class Row(Sequence):
    """A result row by position or by name, like ``sqlite3.Row`` (``dict(row)`` works)."""

    __slots__ = ("_index", "_values")

    def __init__(self, values: Sequence[Any], index: dict[str, int]) -> None:
        self._values = values
        self._index = index

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return self._values[self._index[key]]
        return self._values[key]

    def __len__(self) -> int:
        return len(self._values)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._values)

    def keys(self) -> list[str]:
        return list(self._index)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Row):
            return tuple(self._values) == tuple(other._values) and self._index == other._index
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self._values))

    def __repr__(self) -> str:
        return f"Row({dict(zip(self._index, self._values, strict=False))!r})"


def row_factory(cursor: psycopg.Cursor) -> Any:
    desc = cursor.description
    if desc is None:
        return tuple
    index = {d.name: i for i, d in enumerate(desc)}
    return lambda values: Row(values, index)


# -- the handle the domain code sees --------------------------------------------------------------


class Cursor:
    """The part of ``sqlite3.Cursor`` the domain uses: fetchone, fetchall, iteration, rowcount."""

    __slots__ = ("_cur",)

    def __init__(self, cur: psycopg.Cursor) -> None:
        self._cur = cur

    def fetchone(self) -> Row | None:
        return self._cur.fetchone() if self._cur.description is not None else None

    def fetchall(self) -> list[Row]:
        return self._cur.fetchall() if self._cur.description is not None else []

    def __iter__(self) -> Iterator[Row]:
        return iter(self.fetchall())

    @property
    def rowcount(self) -> int:
        return self._cur.rowcount

    @property
    def description(self) -> Any:
        return self._cur.description

    @property
    def lastrowid(self) -> int:
        raise AttributeError("lastrowid is SQLite's; use INSERT ... RETURNING id")


class ConnInfo:
    """``handle.conn``: what the domain may ask of the connection (whether a transaction is open)."""

    __slots__ = ("_conn",)

    def __init__(self, conn: psycopg.Connection) -> None:
        self._conn = conn

    @property
    def in_transaction(self) -> bool:
        return self._conn.info.transaction_status != pq.TransactionStatus.IDLE


class Handle:
    """A PostgreSQL connection dressed as the SQLite handle domain functions receive."""

    engine = "postgresql"

    def __init__(self, conn: psycopg.Connection, *, writing: bool = False) -> None:
        self.raw = conn
        self.conn = ConnInfo(conn)
        self.writing = writing
        self._savepoint = 0
        self.xact_keys: set[tuple[int, int]] = set()  # keyed locks held by the open transaction
        self._savepoints: list[tuple[str, frozenset[tuple[int, int]]]] = []  # (name, keys held then)

    def begun(self) -> None:
        """A transaction began: it holds no keyed lock and no savepoint yet."""
        self.xact_keys.clear()
        self._savepoints.clear()

    def _track_savepoint(self, sql: str) -> None:
        m = _SAVEPOINT_OP.match(sql)
        if m is None:
            return
        op, name = m.group(1).upper(), m.group(2).lower()
        if op == "SAVEPOINT":
            self._savepoints.append((name, frozenset(self.xact_keys)))
            return
        at = next(
            (i for i in range(len(self._savepoints) - 1, -1, -1) if self._savepoints[i][0] == name), None
        )
        if at is None:
            return
        if op.startswith("ROLLBACK"):  # the savepoint stays; the locks taken since are gone
            self.xact_keys = set(self._savepoints[at][1])
            del self._savepoints[at + 1 :]
        else:
            del self._savepoints[at:]

    def advisory_xact_locks(self, keys: Sequence[tuple[int, int]]) -> None:
        """Take these 2-int advisory locks (sorted) until the transaction ends; see core/db.lock_keys."""
        if not (self.writing and self.conn.in_transaction):
            raise RuntimeError("keyed locks are taken inside a write transaction")
        new = [k for k in keys if k not in self.xact_keys]
        if new and self.xact_keys and min(new) < max(self.xact_keys):
            raise RuntimeError(f"lock order: {min(new)} after {max(self.xact_keys)} could deadlock")
        for key in new:
            self.raw.execute("SELECT pg_advisory_xact_lock(%s, %s)", list(key))
            self.xact_keys.add(key)

    def execute(self, sql: str, params: Any = ()) -> Cursor:
        query = translate(sql)
        cur = self.raw.cursor(row_factory=row_factory)
        args = params if params else None
        if args is not None and not isinstance(args, dict) and "%(_" in query:
            args = {f"_{i}": value for i, value in enumerate(args, 1)}
        if self.writing and self.conn.in_transaction and _changes_data(sql):
            self._savepoint += 1
            name = f"consult_sp{self._savepoint}"
            cur.execute(f"SAVEPOINT {name}")
            try:
                cur.execute(query, args)
            except BaseException:
                try:
                    self.raw.execute(f"ROLLBACK TO SAVEPOINT {name}")
                except psycopg.Error:
                    pass
                raise
            finally:
                self._savepoint -= 1
            self.raw.execute(f"RELEASE SAVEPOINT {name}")
            return Cursor(cur)
        cur.execute(query, args)
        if self.writing and self.conn.in_transaction:
            self._track_savepoint(sql)
        return Cursor(cur)

    def executemany(self, sql: str, rows: Any) -> None:
        for row in rows:
            self.execute(sql, row)


# A write waits this long for the cluster's write lock or a row lock, as SQLite's busy timeout
# does, then fails as "database unavailable" (503) instead of hanging the request.
LOCK_TIMEOUT_MS = 5000
POOL_WAIT_S = 5.0  # longest wait for a reader connection (the database gone, the pool exhausted)


def connect(url: str, *, autocommit: bool = True) -> psycopg.Connection:
    conn = psycopg.connect(url, autocommit=autocommit, connect_timeout=10)
    configure(conn)
    conn.execute(f"SET lock_timeout = {LOCK_TIMEOUT_MS}")
    return conn


# -- schema --------------------------------------------------------------------------------------

_PK_ALIAS = re.compile(r"\bINTEGER\s+PRIMARY\s+KEY(\s+AUTOINCREMENT)?(?!\s+REFERENCES)", re.IGNORECASE)
_TYPES = [
    (re.compile(r"\bINTEGER\b", re.IGNORECASE), "BIGINT"),
    (re.compile(r"\bREAL\b", re.IGNORECASE), "DOUBLE PRECISION"),
    (re.compile(r"\bBLOB\b", re.IGNORECASE), "BYTEA"),
]
_WITHOUT_ROWID = re.compile(r"\)\s*WITHOUT\s+ROWID\s*$", re.IGNORECASE)
_REFERENCES = re.compile(r"\bREFERENCES\s+\"?(\w+)\"?", re.IGNORECASE)


def _table_ddl(sql: str) -> str:
    sql = _WITHOUT_ROWID.sub(")", sql.strip())
    parts: list[str] = []
    pos = 0
    for m in _TOKEN.finditer(sql):
        if m.lastgroup in ("str", "ident", "comment"):
            parts.append(_column_types(sql[pos : m.start()]))
            parts.append("" if m.lastgroup == "comment" else m.group(0))
            pos = m.end()
    parts.append(_column_types(sql[pos:]))
    return "".join(parts)


def _column_types(code: str) -> str:
    code = _PK_ALIAS.sub("BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY", code)
    for pattern, replacement in _TYPES:
        code = pattern.sub(replacement, code)
    return code


def _schema_rows(sqlite_db: sqlite3.Connection) -> list[tuple[str, str, str, str]]:
    return sqlite_db.execute(
        "SELECT type, name, tbl_name, sql FROM sqlite_master WHERE sql IS NOT NULL"
        " AND name NOT LIKE 'sqlite_%' ORDER BY rowid"
    ).fetchall()


def table_order(sqlite_db: sqlite3.Connection) -> list[str]:
    """The tables of a SQLite database, each after every table it references."""
    tables = {name: sql for kind, name, _t, sql in _schema_rows(sqlite_db) if kind == "table"}
    ordered: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in ordered or name in visiting or name not in tables:
            return
        visiting.add(name)
        for ref in _REFERENCES.findall(tables[name]):
            if ref != name:
                visit(ref)
        visiting.discard(name)
        ordered.append(name)

    for name in tables:
        visit(name)
    return ordered


def schema_statements(sqlite_db: sqlite3.Connection) -> list[str]:
    """PostgreSQL DDL for every table and index of a SQLite database, tables in dependency order."""
    rows = _schema_rows(sqlite_db)
    tables = {name: sql for kind, name, _t, sql in rows if kind == "table"}
    statements = [_table_ddl(tables[name]) for name in table_order(sqlite_db)]
    statements += [sql.strip() for kind, _n, _t, sql in rows if kind == "index"]
    return statements


def reset_identities(handle: Handle) -> None:
    """After rows were copied in with their ids: every identity continues after its highest id."""
    cols = handle.execute(
        "SELECT table_name, column_name FROM information_schema.columns"
        " WHERE table_schema = current_schema() AND is_identity = 'YES'"
    ).fetchall()
    for table, column in cols:
        handle.raw.execute(
            f"SELECT setval(pg_get_serial_sequence('\"{table}\"', '{column}'),"  # noqa: S608
            f' GREATEST((SELECT max("{column}") FROM "{table}"), 0) + 1, false)'
        )


# -- the engine ------------------------------------------------------------------------------------


def redact(url: str) -> str:
    """The URL for logs: never the password."""
    return re.sub(r"(//[^:/@]+:)[^@]*@", r"\1***@", url)


class PgDatabase(Database):
    """`Database` on PostgreSQL: reads from a psycopg pool, writes through the one writer thread.

    Each write transaction first takes `WRITE_LOCK_KEY` (a transaction-scoped advisory lock), so
    writes from every node are serialised as SQLite serialises them: the domain's
    read-then-write transactions stay correct when two nodes write at once. A non-exclusive write
    (``execute_write_fn(fn, exclusive=False)``) skips it: job claims (``FOR UPDATE SKIP LOCKED``)
    and holds (keyed locks on the doctor and the patient, core/db.lock_keys; the partial UNIQUE
    index refuses a second visit on a slot). Lock order, cluster lock -> keyed locks -> audit lock,
    is written at `WRITE_LOCK_KEY`.
    """

    engine = "postgresql"

    def __init__(self, url: str, read_threads: int = 3, **kwargs: Any) -> None:
        super().__init__(None, read_threads, **kwargs)  # no SQLite file: never Path("postgresql")
        self.url = url
        self._errors = (psycopg.Error, OSError)
        self._pool: ConnectionPool | None = None
        self._pool_lock = threading.Lock()

    def describe(self) -> str:
        return redact(self.url)

    def _reader_pool(self) -> ConnectionPool:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ConnectionPool(
                    self.url,
                    min_size=1,
                    max_size=max(1, self._readers._max_workers),
                    kwargs={"autocommit": True},
                    configure=configure,
                    check=ConnectionPool.check_connection,
                    timeout=POOL_WAIT_S,  # then "database unavailable" (503), not a hung request
                    name="consult-read",
                    open=True,
                )
            return self._pool

    def _run_read(self, fn: Callable[[Any], T]) -> T:
        with self._reader_pool().connection() as conn:
            return fn(Handle(conn))

    def _connect_reader(self) -> Handle:
        return Handle(connect(self.url))

    def _connect_writer(self) -> Handle:
        return Handle(connect(self.url), writing=True)

    def _transaction(self, db: Handle, fn: Callable[[Any], T], exclusive: bool = True) -> T:
        """``fn(db)`` in one transaction; run again from the start when PostgreSQL chose it as a
        deadlock's victim (or failed it for serialisation), at most `TRANSACTION_RETRIES` times.

        Writes that skip the cluster lock can deadlock with those that take it (an exclusive
        write that appended to the audit chain, waiting for a row a hold inserted; the hold
        waiting for the audit lock): PostgreSQL breaks the cycle by failing one, which says
        nothing about the request, so it is retried rather than answered with a 503.
        """
        for attempt in range(TRANSACTION_RETRIES + 1):
            try:
                return self._transaction_once(db, fn, exclusive)
            except RETRIED_ERRORS as exc:
                if attempt == TRANSACTION_RETRIES:
                    raise
                log.warning("write transaction retried (%s): %s", type(exc).__name__, exc)
        raise AssertionError("unreachable")

    def _transaction_once(self, db: Handle, fn: Callable[[Any], T], exclusive: bool) -> T:
        raw = db.raw
        raw.execute("BEGIN")
        db.begun()
        try:
            if exclusive:  # else fn's own row locks keep it correct (see Database.execute_write_fn)
                raw.execute("SELECT pg_advisory_xact_lock(%s)", [WRITE_LOCK_KEY])
            result = fn(db)
            raw.execute("COMMIT")
        except BaseException:
            try:
                if db.conn.in_transaction and not raw.closed:
                    raw.execute("ROLLBACK")
            except psycopg.Error:
                log.exception("ROLLBACK failed")
            raise
        return result

    def _broken(self, db: Handle, exc: BaseException) -> bool:
        return db.raw.closed or db.raw.broken or db.conn.in_transaction

    def _close_handle(self, db: Handle) -> None:
        try:
            db.raw.close()
        except psycopg.Error:
            log.exception("closing a PostgreSQL connection failed")

    def _map_error(self, exc: BaseException) -> BaseException | None:
        if isinstance(exc, psycopg.errors.DiskFull):
            return StorageFull()
        if isinstance(exc, psycopg.OperationalError | psycopg_pool.PoolTimeout):
            return DatabaseUnavailable()
        return storage_error(exc)

    def close(self) -> None:
        super().close()
        if self._pool is not None:
            self._pool.close()
