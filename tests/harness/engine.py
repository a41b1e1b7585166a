"""Which database engine the suite runs on: SQLite (default) or PostgreSQL.

``CONSULT_TEST_ENGINE=postgresql`` runs every test against PostgreSQL: each test gets its own
database, copied from a template that was migrated once for the session (a copy takes
milliseconds; migrating takes a second). Tests that are about the SQLite file itself (backup of
the file, a full disk under SQLite, the WAL) carry ``@pytest.mark.sqlite_only``.
"""

from __future__ import annotations

import itertools
import os
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
def postgres_template(request: pytest.FixtureRequest) -> Iterator[tuple[object, str]]:
    """(server, template database name): the schema migrated once, copied for each test
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
    yield server, name
    while _to_drop:
        server.drop_database(_to_drop.pop())
    server.drop_database(name)


@pytest.fixture
def make_database_url(request: pytest.FixtureRequest) -> Iterator[Callable[[], str]]:
    """``make() -> url``: on PostgreSQL a fresh, migrated database per call (dropped after the
    test); on SQLite an empty string (each data_dir has its own file)."""
    if not on_postgresql():
        yield lambda: ""
        return
    server, template = request.getfixturevalue("postgres_template")
    # Databases of earlier tests are dropped now, not at their own teardown: pytest may close a
    # test's app (its client fixture) after this fixture's teardown, and an app whose database
    # vanished under it waits for connections while it shuts down.
    while _to_drop:
        server.drop_database(_to_drop.pop())
    made: list[str] = []

    def make() -> str:
        name = server.create_database(f"consult_test_{os.getpid()}_{next(_numbers)}", template=template)
        made.append(name)
        return server.socket_url(name)

    yield make
    _to_drop.extend(made)


@pytest.fixture
def database_url(make_database_url: Callable[[], str]) -> str:
    """Empty on SQLite (the file in data_dir); on PostgreSQL a fresh database for this test."""
    return make_database_url()
