"""Which database engine the suite runs on: SQLite (default) or PostgreSQL.

``CONSULT_TEST_ENGINE=postgresql`` runs every test against PostgreSQL: each test gets its own
database, copied from a template that was migrated once for the session (a copy takes
milliseconds; migrating takes a second). Tests that are about the SQLite file itself (backup of
the file, a full disk under SQLite, the WAL) carry ``@pytest.mark.sqlite_only``.
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
from collections.abc import Callable, Iterator

import pytest

ENGINE = os.environ.get("CONSULT_TEST_ENGINE", "sqlite")
if ENGINE not in ("sqlite", "postgresql"):
    raise RuntimeError(f"CONSULT_TEST_ENGINE must be sqlite or postgresql, not {ENGINE!r}")
_numbers = itertools.count(1)
_to_drop: list[str] = []  # the previous tests' databases (see make_database_url)
__all__ = ["database_url", "make_database_url", "postgres_template"]


def on_postgresql() -> bool:
    return ENGINE == "postgresql"


@pytest.fixture(scope="session")
def postgres_template(request: pytest.FixtureRequest) -> Iterator[DatabaseSupply]:
    """The schema migrated once, and a `DatabaseSupply` of copies of it for the tests
    (`postgres_server` is the session's throwaway PostgreSQL, tests/harness/postgres.py)."""
    from consult.core.migrations import migrate
    from consult.core.pg import PgDatabase

    server = request.getfixturevalue("postgres_server")
    name = f"consult_migrated_{os.getpid()}"
    server.create_database(name)
    db = PgDatabase(server.socket_url(name))
    try:
        migrate(db)
    finally:
        db.close()
    supply = DatabaseSupply(server, name)
    yield supply
    supply.close()


@pytest.fixture
def make_database_url(request: pytest.FixtureRequest) -> Iterator[Callable[[], str]]:
    """``make() -> url``: on PostgreSQL a fresh, migrated database per call (dropped after the
    test); on SQLite an empty string (each data_dir has its own file)."""
    if not on_postgresql():
        yield lambda: ""
        return
    supply: DatabaseSupply = request.getfixturevalue("postgres_template")
    # Databases of earlier tests are dropped now, not at their own teardown: pytest may close a
    # test's app (its client fixture) after this fixture's teardown, and an app whose database
    # vanished under it waits for connections while it shuts down.
    while _to_drop:
        supply.drop(_to_drop.pop())
    made: list[str] = []

    def make() -> str:
        name = supply.take()
        made.append(name)
        return supply.server.socket_url(name)

    yield make
    _to_drop.extend(made)


class DatabaseSupply:
    """Fresh copies of the migrated template, made ahead of the tests that take them.

    Copying a database takes PostgreSQL a few tenths of a second (it copies the system
    catalogues too), on every test of the PostgreSQL pass. A thread of its own, with one
    connection, keeps `ahead` copies ready and drops the ones earlier tests used, while the
    current test runs; a test still gets a database nobody has touched.
    """

    def __init__(self, server, template: str, ahead: int = 2) -> None:
        self.server = server
        self.template = template
        self._ready: queue.Queue[str | BaseException] = queue.Queue()
        self._work: queue.Queue[tuple[str, str] | None] = queue.Queue()
        for _ in range(ahead):
            self._work.put(("make", ""))
        self._thread = threading.Thread(target=self._run, name="pg-database-supply", daemon=True)
        self._thread.start()

    def take(self, timeout_s: float = 120.0) -> str:
        """A fresh database's name (another is made to replace it)."""
        self._work.put(("make", ""))
        try:
            got = self._ready.get(timeout=timeout_s)
        except queue.Empty:
            raise RuntimeError(f"no fresh PostgreSQL database within {timeout_s:.0f} s") from None
        if isinstance(got, BaseException):
            raise RuntimeError(f"copying the template database failed: {got}") from got
        return got

    def drop(self, name: str) -> None:
        self._work.put(("drop", name))

    def close(self) -> None:
        """Stop the thread (the session's server, and every database in it, goes next)."""
        self._work.put(None)
        self._thread.join(timeout=60)

    def _run(self) -> None:
        conn = None
        while (item := self._work.get()) is not None:
            op, name = item
            try:
                if conn is None or conn.closed:
                    conn = self.server.connect()
                if op == "make":
                    name = f"consult_test_{os.getpid()}_{next(_numbers)}"
                    conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{self.template}"')
                    self._ready.put(name)
                else:
                    conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            except Exception as exc:  # reported to the test that takes the database
                if conn is not None:
                    conn.close()
                    conn = None
                if op == "make":
                    self._ready.put(exc)
        if conn is not None:
            conn.close()


@pytest.fixture
def database_url(make_database_url: Callable[[], str]) -> str:
    """Empty on SQLite (the file in data_dir); on PostgreSQL a fresh database for this test."""
    return make_database_url()
